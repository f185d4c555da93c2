"""Fused dynamic quantization for the float call path: two Triton launches instead of ~30 torch ops.

``quantize_qkv(q, k, v, head_dim, scale)`` returns int8 copies of q, k, v, their per-tensor scales
and the kernel's integer constants, bit for bit what ``quant.dynamic_scale``, ``quant.quantize``
and ``quant.make_params`` compute (the reference path keeps using those; tests compare the two):

1. ``_absmax3``: max |x| over the finite elements of each tensor, as float32 bits, by atomic max
   (non-negative floats order like their int32 bit patterns).
2. ``_quantize3``: scale = amax / 127 (1 where amax == 0); int8 = rint(clamp(x / scale, ±127)),
   NaN → 0; program (0, 0) also writes the scales and the constants R, MQ, HF, OUT_MUL.

Each float op is the IEEE one torch performs (``div_rn``; round-half-even by adding and removing
1.5·2**23, exact for |y| <= 127), so CPU (interpreter) and GPU give torch's bits.  No host sync.
This is not a template: the attention kernel, its template hash and the tuning DB don't see it.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from qflash_gen.config import R_MAX
from qflash_gen.quant import LOG2E, KernelParams

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
def _quant_one(X, Y, offs, m, scale):
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    y = tl.div_rn(x, scale)
    y = tl.where(y == y, y, 0.0)  # NaN -> 0
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)  # +-Inf -> +-127
    y = (y + 12582912.0) - 12582912.0  # round half to even (RNE_MAGIC)
    tl.store(Y + offs, y.to(tl.int8), mask=m)


@triton.jit
def _scale_of(AMAX_BITS, i):
    amax = tl.load(AMAX_BITS + i).to(tl.float32, bitcast=True)
    return tl.where(amax > 0.0, tl.div_rn(amax, 127.0), 1.0)


@triton.jit
def _quantize3(
    Q, K, V, Q8, K8, V8, AMAX_BITS, SCALES, INTS, FLOATS, n_elements, c_log2e_bits,
    R_MAX: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    which = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_elements
    if which == 0:
        _quant_one(Q, Q8, offs, m, _scale_of(AMAX_BITS, 0))
    elif which == 1:
        _quant_one(K, K8, offs, m, _scale_of(AMAX_BITS, 1))
    else:
        _quant_one(V, V8, offs, m, _scale_of(AMAX_BITS, 2))
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
        tl.store(FLOATS + 1, 0.0)


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
    q8, k8, v8 = (torch.empty(q.shape, dtype=torch.int8, device=dev) for _ in range(3))
    scales = torch.empty(3, dtype=torch.float32, device=dev)
    ints = torch.empty(4, dtype=torch.int32, device=dev)
    floats = torch.empty(2, dtype=torch.float32, device=dev)
    grid = (triton.cdiv(n, BLOCK), 3)
    _absmax3[grid](q, k, v, amax_bits, n, BLOCK=BLOCK)
    _quantize3[grid](
        q, k, v, q8, k8, v8, amax_bits, scales, ints, floats, n,
        _f64_bits(c * LOG2E), R_MAX=R_MAX, BLOCK=BLOCK,
    )  # fmt: skip
    return (q8, k8, v8), scales, KernelParams(ints=ints, floats=floats)
