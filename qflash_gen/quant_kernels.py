"""Fused dynamic quantization for the float call path: two Triton launches instead of ~30 torch ops.

``quantize_qkv(q, k, v, head_dim, scale)`` returns int8 copies of q, k, v, their per-tensor scales
and the kernel's integer constants, bit for bit what ``quant.dynamic_scale``, ``quant.quantize``
and ``quant.make_params`` compute (the reference path keeps using those; tests compare the two):

1. ``_absmax3``: max |x| over the finite elements of each tensor, as float32 bits, by atomic max
   (non-negative floats order like their int32 bit patterns).
2. ``_quantize3``: scale = amax / 127 (1 where amax == 0); int8 = rint(clamp(x * (1 / scale), ±127)),
   NaN → 0; program (0, 0) also writes the scales and the constants R, MQ, HF, OUT_MUL, 1/SQ,
   1/SK, 1/SV.

(Static, calibrated scales need neither step: the attention kernel quantizes float inputs as
it loads them; see ``launch.launch_static``.)

v8 comes back key-major (``quant.key_major``'s layout), which the attention kernel loads without
a byte transpose; q8 and k8 are contiguous.  Each float op is the IEEE one torch performs
(``div_rn`` for amax / 127 and 1 / scale, one multiply per element; round half to even by adding
1.5·2**23 and reading the integer off the bits, exact for |y| <= 127), so CPU (interpreter) and
GPU give torch's bits.  No host sync.
This is not a template: the attention kernel, its template hash and the tuning DB don't see it.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from qflash_gen.config import R_MAX
from qflash_gen.quant import LOG2E, KernelParams, padded_keys

BLOCK = 4096
RNE_MAGIC = 12582912.0  # 1.5 * 2**23: y + M - M rounds y to an integer, ties to even, in fp32


@triton.jit
def _absmax3(Q, K, V, AMAX_BITS, n_elements, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    which = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_elements
    if which == 0:
        x = tl.load(Q + offs, mask=m, other=0.0)
    elif which == 1:
        x = tl.load(K + offs, mask=m, other=0.0)
    else:
        x = tl.load(V + offs, mask=m, other=0.0)
    ax = tl.abs(x.to(tl.float32))
    ax = tl.where(ax <= 3.4028234663852886e38, ax, 0.0)  # <= FLT_MAX drops +-Inf and NaN
    tl.atomic_max(AMAX_BITS + which, tl.max(ax.to(tl.int32, bitcast=True), axis=0))


@triton.jit
def _to_int8(x, inv):
    y = x.to(tl.float32) * inv
    y = tl.where(y == y, y, 0.0)  # NaN -> 0
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)  # +-Inf -> +-127
    # round half to even: the bits of y + RNE_MAGIC minus the magic's bits (|y| <= 127)
    return ((y + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000).to(tl.int8)


@triton.jit
def _quant_one(X, Y, offs, m, inv):
    tl.store(Y + offs, _to_int8(tl.load(X + offs, mask=m, other=0.0), inv), mask=m)


@triton.jit
def _quant_v(V, V8, pid, inv, BH, N, NP, D: tl.constexpr, TK: tl.constexpr):
    """Tile pid of V (TK keys x D of one head) to the key-major int8 V8 (quant.key_major: row
    pitch NP).  Triton routes the tile through shared memory so both sides stay coalesced."""
    tiles = tl.cdiv(N, TK)
    bh = pid // tiles
    if bh < BH:
        offs_n = (pid % tiles) * TK + tl.arange(0, TK)
        offs_d = tl.arange(0, D)
        m = (offs_n < N)[:, None]
        x = tl.load(V + bh * N * D + offs_n[:, None] * D + offs_d[None, :], mask=m, other=0.0)
        tl.store(V8 + bh * D * NP + offs_d[None, :] * NP + offs_n[:, None], _to_int8(x, inv), mask=m)


@triton.jit
def _scale_of(AMAX_BITS, i):
    amax = tl.load(AMAX_BITS + i).to(tl.float32, bitcast=True)
    return tl.where(amax > 0.0, tl.div_rn(amax, 127.0), 1.0)


@triton.jit
def _quantize3(
    Q, K, V, Q8, K8, V8, AMAX_BITS, SCALES, INTS, FLOATS, n_elements, c_log2e_bits, BH, N, NP,
    R_MAX: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    which = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_elements
    if which == 0:
        _quant_one(Q, Q8, offs, m, tl.div_rn(1.0, _scale_of(AMAX_BITS, 0)))
    elif which == 1:
        _quant_one(K, K8, offs, m, tl.div_rn(1.0, _scale_of(AMAX_BITS, 1)))
    else:
        _quant_v(V, V8, pid, tl.div_rn(1.0, _scale_of(AMAX_BITS, 2)), BH, N, NP, D, BLOCK // D)
    if (pid == 0) & (which == 0):
        sq = _scale_of(AMAX_BITS, 0)
        sk = _scale_of(AMAX_BITS, 1)
        sv = _scale_of(AMAX_BITS, 2)
        tl.store(SCALES + 0, sq)
        tl.store(SCALES + 1, sk)
        tl.store(SCALES + 2, sv)
        # quant.make_params, op for op: S = (c*log2e) * sq * sk in float64; R = floor(1/S + 1/2)
        s = c_log2e_bits.to(tl.float64, bitcast=True) * sq.to(tl.float64) * sk.to(tl.float64)
        inv = tl.where(s > 0.0, 1.0 / s, R_MAX * 1.0)  # float64 "/" is div.rn.f64: IEEE
        r = tl.floor(inv + 0.5)
        r = tl.minimum(tl.maximum(r, 1.0), R_MAX * 1.0).to(tl.int32)
        tl.store(INTS + 0, r)
        tl.store(INTS + 1, (1 << 26) // r)
        tl.store(INTS + 2, (1 << 30) // r)
        tl.store(INTS + 3, 0)
        tl.store(FLOATS + 0, sv)  # OUT_MUL = sv
        tl.store(FLOATS + 1, tl.div_rn(1.0, sq))
        tl.store(FLOATS + 2, tl.div_rn(1.0, sk))
        tl.store(FLOATS + 3, tl.div_rn(1.0, sv))


def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The fused path handles contiguous tensors (the torch path takes any strides)."""
    return q.is_contiguous() and k.is_contiguous() and v.is_contiguous()


def quantize_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, scale: float | None = None
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor, KernelParams]:
    """(q8, k8, v8), scales float32[3], KernelParams for contiguous float q, k, v of one shape."""
    c = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not math.isfinite(c) or c <= 0:
        raise ValueError(f"scale={scale!r} must be a positive finite softmax scale")
    dev = q.device
    n = q.numel()
    amax_bits = torch.zeros(3, dtype=torch.int32, device=dev)
    q8, k8 = (torch.empty(q.shape, dtype=torch.int8, device=dev) for _ in range(2))
    v8 = _key_major_int8(q.shape, dev)
    scales = torch.empty(3, dtype=torch.float32, device=dev)
    ints = torch.empty(4, dtype=torch.int32, device=dev)
    floats = torch.empty(4, dtype=torch.float32, device=dev)
    _absmax3[(triton.cdiv(n, BLOCK), 3)](q, k, v, amax_bits, n, BLOCK=BLOCK)
    _quantize3[_grid(q.shape)](
        q, k, v, q8, k8, v8, amax_bits, scales, ints, floats, n,
        _f64_bits(c * LOG2E), *_v_dims(q.shape), R_MAX=R_MAX, BLOCK=BLOCK, D=q.shape[3],
    )  # fmt: skip
    return (q8, k8, v8), scales, KernelParams(ints=ints, floats=floats)


def _key_major_int8(shape, device) -> torch.Tensor:
    """An int8 (B, H, N, D) view in quant.key_major's layout (padding keys unset)."""
    b, h, n, d = shape
    return torch.empty((b, h, d, padded_keys(n)), dtype=torch.int8, device=device)[..., :n].transpose(-1, -2)


def _v_dims(shape) -> tuple[int, int, int]:
    b, h, n, d = shape
    return b * h, n, padded_keys(n)


def _grid(shape) -> tuple[int, int]:
    """Flat BLOCK-element programs for q and k; (head, BLOCK // D-key tile) programs for v."""
    b, h, n, d = shape
    return (max(triton.cdiv(b * h * n * d, BLOCK), b * h * triton.cdiv(n, BLOCK // d)), 3)
