"""Unfused integer attention in the style of I-ViT: the baseline tools/bench.py measures qflash-gen against.

Integer ViT pipelines (I-ViT and other int8-GEMM inference stacks) run attention as separate
steps with the N x N intermediates in global memory.  This module does that with qflash-gen's
own integer math, so the benchmark isolates what fusing the steps buys.  Three Triton launches
per call:

1. ``_qk``: S = Q8 @ K8^T, int8 x int8 -> int32 tiles; writes S, int32 (B, H, N, N).
2. ``_softmax_rows``: per query row, the max m over all N scores, then the shift exp's
   numerators p ~= 16383 * 2**((s - m) / R) in 0..16383 and l = sum(p); writes p as two int8
   planes, p >> 7 and p & 127 ((B, H, N, N) each), and l, int32 (B, H, N).
3. ``_pv``: acc = (P_hi @ V) * 128 + P_lo @ V (two int8 dots into int32), then
   float32(acc) * (sv / float32(l)), one IEEE division per row, 0 where l == 0 -> (B, H, N, D).

Per call that materializes 6 bytes per score (S, P_hi, P_lo) and 4 per query row (l), each
written once and read once; the N x N planes are stored with rows padded to a multiple of 16
elements (N = 197: 208), so every row starts 16-byte aligned and loads and stores vectorize (a
GEMM library pads its leading dimension alike).  The output bits equal
``reference_int8(q8, k8, v8, params, config_for(N), out_dtype=...)``, the fused kernel's
single-pass arithmetic (block_n >= N: no online rescale), op for op; for N > 256, where no
single-pass config exists, it computes the same math with the max over all N keys.  A baseline
for the benchmark, not a product path: int8 inputs, no mask or bias, untuned tile sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qflash_gen.config import DEFAULT_CONFIG, KernelConfig
from qflash_gen.quant import KernelParams

HEAD_DIMS = (32, 64, 128)  # int8 tl.dot wants K >= 32; the fused kernel's head dims
ROW_ALIGN = 16  # elements per padded row of the N x N planes
NEG = tl.constexpr(-(2**30))  # score of a column past N: below every real score (|s| <= D * 2**14)
P_MAX = tl.constexpr(16383)  # 14-bit p (p_bits=14), as DEFAULT_CONFIG


def config_for(n: int) -> KernelConfig:
    """The single-pass config whose oracle ``ivit_attention`` matches at N = n: one key tile of N
    rounded up to a power of two (at least 32), the shift exp, 14-bit P."""
    block_n = max(32, triton.next_power_of_2(n))
    if block_n > 256:
        raise ValueError(f"N={n}: no single-pass KernelConfig beyond N=256 (block_n <= 256)")
    return DEFAULT_CONFIG.replace(block_m=64, block_n=block_n, exp_variant="shift", p_bits=14)


@triton.jit
def _qk(Q, K, S, N: tl.constexpr, NS: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """One (BM, BN) tile of S = Q @ K^T for one (batch, head); int32 out."""
    pid_m, pid_n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + bh.to(tl.int64) * N * D + rows[:, None] * D + offs_d[None, :], mask=(rows < N)[:, None], other=0)
    k = tl.load(K + bh.to(tl.int64) * N * D + cols[:, None] * D + offs_d[None, :], mask=(cols < N)[:, None], other=0)
    s = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
    ok = (rows < N)[:, None] & (cols < N)[None, :]
    tl.store(S + bh.to(tl.int64) * N * NS + rows[:, None] * NS + cols[None, :], s, mask=ok)


@triton.jit
def _softmax_rows(S, P_HI, P_LO, L, IntParams, N: tl.constexpr, NS: tl.constexpr, NP: tl.constexpr, BR: tl.constexpr):
    """BR whole score rows of one (batch, head) -> the integer softmax numerators and their sum.

    All operands of >>, // and the high-half multiply are non-negative, so compiled Triton and the
    interpreter agree; the formulas are templates/exp2.py.jinja's shift ``_softmax_p``."""
    pid_r, bh = tl.program_id(0), tl.program_id(1)
    R = tl.load(IntParams + 0)  # score units per halving, 1..65535
    MQ = tl.load(IntParams + 1)  # floor(2**26 / R)
    HP = (P_MAX * 16384 + R - 1) // R  # ceil(P_MAX * 2**14 / R)
    MQ32 = tl.minimum(MQ.to(tl.int64) * 64, 2**32 - 1).to(tl.uint32)  # 64 MQ; 2**32 - 1 at R = 1
    rows = pid_r * BR + tl.arange(0, BR)
    cols = tl.arange(0, NP)
    ok = (rows < N)[:, None] & (cols < N)[None, :]
    offs = bh.to(tl.int64) * N * NS + rows[:, None] * NS + cols[None, :]
    s = tl.load(S + offs, mask=ok, other=NEG)
    m = tl.max(s, axis=1)  # the row max over all N keys: no online rescale
    # y = (m - s) + 15R, clamped below 31R (beyond, p is 0); the quotient qq = q + 15
    y = tl.minimum((m + 15 * R)[:, None] - s, 31 * R - 1)
    qq = tl.umulhi(y.to(tl.uint32, bitcast=True), MQ32).to(tl.int32, bitcast=True)
    t = P_MAX * 32768 - (y - qq * R) * HP  # P_MAX * 2**15 * (1 - f/2), 0 <= t < 2**29
    p = tl.where(ok, t >> qq, 0)
    tl.store(P_HI + offs, (p >> 7).to(tl.int8), mask=ok)
    tl.store(P_LO + offs, (p & 127).to(tl.int8), mask=ok)
    tl.store(L + bh * N + rows, tl.sum(p, axis=1), mask=rows < N)


@triton.jit
def _pv(
    P_HI,
    P_LO,
    V,
    L,
    Out,
    Floats,
    N: tl.constexpr,
    NS: tl.constexpr,
    D: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
):
    """BM query rows of one (batch, head): acc = P @ V from the two int8 planes, then the float epilogue."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < N
    offs_d = tl.arange(0, D)
    p_base = bh.to(tl.int64) * N * NS + rows[:, None] * NS
    acc_hi = tl.zeros([BM, D], dtype=tl.int32)  # |acc_hi|, |acc_lo| <= N * 127 * 128
    acc_lo = tl.zeros([BM, D], dtype=tl.int32)
    for k0 in tl.range(0, N, BK):
        keys = k0 + tl.arange(0, BK)
        pk = row_ok[:, None] & (keys < N)[None, :]
        p_hi = tl.load(P_HI + p_base + keys[None, :], mask=pk, other=0)
        p_lo = tl.load(P_LO + p_base + keys[None, :], mask=pk, other=0)
        v = tl.load(
            V + bh.to(tl.int64) * N * D + keys[:, None] * D + offs_d[None, :], mask=(keys < N)[:, None], other=0
        )
        acc_hi = tl.dot(p_hi, v, acc_hi, out_dtype=tl.int32)
        acc_lo = tl.dot(p_lo, v, acc_lo, out_dtype=tl.int32)
    # The exact sum of p * v; int64 as the oracle's, so no N wraps it (int32 would hold N <= 1020).
    acc = acc_hi.to(tl.int64) * 128 + acc_lo
    l_i = tl.load(L + bh * N + rows, mask=row_ok, other=0)
    has_l = l_i > 0
    out_mul = tl.load(Floats + 0)  # sv
    inv_l = tl.math.div_rn(tl.full([BM], 1.0, tl.float32) * out_mul, tl.where(has_l, l_i, 1).to(tl.float32))
    of = acc.to(tl.float32) * tl.where(has_l, inv_l, 0.0)[:, None]
    if Out.dtype.element_ty == tl.bfloat16:
        # round to nearest even on the bits, as the fused kernel (the interpreter's cast truncates)
        bits = of.to(tl.uint32, bitcast=True)
        o = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        o = of.to(Out.dtype.element_ty)
    o_ptrs = Out + bh.to(tl.int64) * N * D + rows[:, None] * D + offs_d[None, :]
    tl.store(o_ptrs, o, mask=row_ok[:, None])


def intermediate_bytes(b: int, h: int, n: int) -> int:
    """Bytes of global memory one call allocates between its launches: S, P_hi, P_lo (rows padded), l."""
    return b * h * (n * _row_stride(n) * (4 + 1 + 1) + n * 4)


def _row_stride(n: int) -> int:
    return triton.cdiv(n, ROW_ALIGN) * ROW_ALIGN


def ivit_attention(
    q8: torch.Tensor,
    k8: torch.Tensor,
    v8: torch.Tensor,
    params: KernelParams,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Integer attention of int8 (B, H, N, D) q8, k8, v8 in three launches (see the module docstring).

    ``params``: per-tensor ``quant.make_params`` constants on the inputs' device.  Returns
    ``out_dtype`` (float16, bfloat16 or float32) (B, H, N, D), real-valued (the epilogue applies sv)."""
    if not (q8.dtype == k8.dtype == v8.dtype == torch.int8):
        raise TypeError("ivit_attention takes int8 q8, k8, v8")
    if not (q8.shape == k8.shape == v8.shape and q8.dim() == 4):
        raise ValueError(f"q8, k8, v8 must share one (B, H, N, D) shape, got {q8.shape}, {k8.shape}, {v8.shape}")
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"out_dtype={out_dtype}: float16, bfloat16 or float32")
    b, h, n, d = q8.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim D={d} is not supported; supported: {HEAD_DIMS}")
    dev = q8.device
    out = torch.empty((b, h, n, d), dtype=out_dtype, device=dev)
    if out.numel() == 0:
        return out
    bh = b * h
    q, k, v = (x.contiguous() for x in (q8, k8, v8))  # no copy for the usual contiguous inputs
    ints = params.ints.to(dev)
    floats = params.floats.to(dev)
    ns = _row_stride(n)  # the padding columns are never written nor read
    s = torch.empty((bh, n, ns), dtype=torch.int32, device=dev)
    p_hi = torch.empty((bh, n, ns), dtype=torch.int8, device=dev)
    p_lo = torch.empty((bh, n, ns), dtype=torch.int8, device=dev)
    l_sum = torch.empty((bh, n), dtype=torch.int32, device=dev)

    bm = bn = 64
    _qk[(triton.cdiv(n, bm), triton.cdiv(n, bn), bh)](q, k, s, N=n, NS=ns, D=d, BM=bm, BN=bn, num_warps=4)
    np_ = max(32, triton.next_power_of_2(n))
    br = max(1, min(64, 4096 // np_))  # rows per program: about 4K scores in flight
    _softmax_rows[(triton.cdiv(n, br), bh)](s, p_hi, p_lo, l_sum, ints, N=n, NS=ns, NP=np_, BR=br, num_warps=8)
    _pv[(triton.cdiv(n, bm), bh)](p_hi, p_lo, v, l_sum, out, floats, N=n, NS=ns, D=d, BM=bm, BK=64, num_warps=4)
    return out
