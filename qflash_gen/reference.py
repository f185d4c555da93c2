"""The bit-exact integer oracle of the kernel, and a float64 reference for SQNR.

`reference_int8` follows the kernel's key-tile schedule (tiles of ``config.block_n``; one tile
when ``block_n >= N``), its integer exp2 variant, its rescale strategy and its rounding, in int64
torch on whatever device the inputs are on, with each scale group's constants (per tensor, per
head or per (batch, head): ``quant.KernelParams``) and the float bias converted per group as the
kernel does (``quant.bias_to_int``).  Matrix products go through float64, which is exact
here (|q.k| <= D * 2**14, |p . v| <= block_n * 16383 * 128, far below 2**53), so the same code
runs on CPU and CUDA.  With ``acc_bits=32`` it also checks every intermediate against the int32
range and raises OverflowError where the kernel would wrap.
"""

from __future__ import annotations

import math

import torch

from qflash_gen.config import KernelConfig, single_pass
from qflash_gen.quant import KernelParams, batch_bias, bias_to_int

NEG = -(2**30)
MASKED = -(2**29)
Q15 = 1 << 15
INT32_MAX = 2**31 - 1


def lut_table(lut_bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """T[i] = round(2**15 * 2**(-i / 2**lut_bits)) for f = i / 2**lut_bits in [0, 2), int32."""
    n = 1 << lut_bits
    vals = [round(Q15 * 2.0 ** (-i / n)) for i in range(2 * n)]
    return torch.tensor(vals, dtype=torch.int32, device=device)


def _const(ints: torch.Tensor, i: int, like: torch.Tensor) -> torch.Tensor:
    """Constant ``i`` of each scale group (``ints``: (..., 4), the groups broadcastable to (B, H))
    shaped to broadcast against ``like`` ((B, H, ...)), as int64."""
    c = ints[..., i].to(device=like.device, dtype=torch.int64)
    if c.numel() == 1:
        return c.reshape(())  # one group: a scalar broadcasts against anything
    c = c.reshape((1,) * (2 - c.dim()) + tuple(c.shape)) if c.dim() < 2 else c
    return c.reshape(tuple(c.shape) + (1,) * (like.dim() - 2))


def _quotient_mulshift(y, r_, mq, hf):
    y = torch.minimum(y, 16 * r_ - 1)
    q = (y * mq) >> 26  # floor(y/R), or one less: then f lands in [1, 2)
    r = y - q * r_
    return q, (r * hf) >> 16


def exp2_q15(y: torch.Tensor, ints: torch.Tensor, config: KernelConfig, lut: torch.Tensor | None = None):
    """Integer E ~= 2**15 * 2**(-y/R) for int64 ``y >= 0`` (templates/exp2.py.jinja, exactly)."""
    if bool((y < 0).any()):
        raise ValueError("exp2_q15 expects y >= 0")
    r_, mq, hf = (_const(ints, i, y) for i in range(3))
    variant = config.exp_variant
    if variant == "idiv":
        y = torch.minimum(y, 16 * r_ - 1)
        q = y // r_
        f = ((y - q * r_) << 14) // r_
    else:
        q, f = _quotient_mulshift(y, r_, mq, hf)
    if variant in ("shift", "idiv"):
        g = Q15 - f
    elif variant == "poly2":
        t = 11012 - ((2820 * f) >> 14)
        g = Q15 - ((f * t) >> 13)
    else:  # lut
        table = (lut if lut is not None else lut_table(config.lut_bits, y.device)).to(torch.int64)
        g = table[f >> (14 - config.lut_bits)]
    return g >> q


def requant_p(e: torch.Tensor, config: KernelConfig) -> torch.Tensor:
    """Q15 weight -> softmax numerator 0..p_max, rounded half up (the template's _requant_p)."""
    return (e * config.p_max + 16384) >> 15


def softmax_p(y: torch.Tensor, ints: torch.Tensor, config: KernelConfig, lut: torch.Tensor | None = None):
    """The numerator p ~= p_max * 2**(-y/R) fed to P @ V (templates/exp2.py.jinja's _softmax_p)."""
    if config.exp_variant != "shift":
        return requant_p(exp2_q15(y, ints, config, lut), config)
    if bool((y < 0).any()):
        raise ValueError("softmax_p expects y >= 0")
    r_, mq = (_const(ints, i, y) for i in range(2))
    hp = (config.p_max * 16384 + r_ - 1) // r_
    y = torch.minimum(y + 15 * r_, 31 * r_ - 1)  # the kernel adds 15R to the row max
    # q + 15 as the kernel's high-half multiply by MQ32 = 64 MQ (2**32 - 1 when R = 1):
    # (y * MQ) >> 26 for every R >= 2
    mq32 = torch.clamp(mq * 64, max=2**32 - 1)
    qq = (y * mq32) >> 32
    t = config.p_max * 32768 - (y - qq * r_) * hp
    _check(t, config, "shift numerator")
    if bool((t < 0).any()):
        raise AssertionError("shift numerator t < 0: the quotient bound failed")
    return t >> qq


def rescale(x: torch.Tensor, alpha: torch.Tensor, ints: torch.Tensor, config: KernelConfig) -> torch.Tensor:
    """x * alpha / 2**15 rounded half away from zero (templates/rescale.py.jinja, exactly)."""
    mag = x.abs()
    if config.rescale == "split":
        # the exact Q15 product, as shift with 15 bits; the kernel forms it from the 15-bit halves
        # of |x| (mag >> 15) * alpha and ((mag & 32767) * alpha + 2**14) >> 15, never above |x|
        _check((mag >> 15) * alpha, config, "rescale product")
        mag = (mag >> 15) * alpha + (((mag & 32767) * alpha + 16384) >> 15)
    elif config.rescale == "shift":
        b = config.rescale_bits
        a = alpha if b == 15 else (alpha + (1 << (14 - b))) >> (15 - b)
        prod = mag * a + (1 << (b - 1))
        _check(prod, config, "rescale product")
        mag = prod >> b
    else:
        r_ = _const(ints, 0, x)
        a = (alpha * r_ + 16384) >> 15
        prod = mag * a + (r_ >> 1)
        _check(prod, config, "rescale product")
        mag = prod // r_
    return torch.where(x < 0, -mag, mag)


def _check(t: torch.Tensor, config: KernelConfig, what: str) -> None:
    if config.acc_bits == 32 and t.numel() and int(t.abs().max()) > INT32_MAX:
        raise OverflowError(f"{config.short()}: {what} exceeds int32 ({int(t.abs().max())})")


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.int64)


def reference_int8(
    q8: torch.Tensor,
    k8: torch.Tensor,
    v8: torch.Tensor,
    params: KernelParams,
    config: KernelConfig,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.int8,
) -> torch.Tensor:
    """What the kernel returns for int8 (B, H, N, D) inputs, element for element.

    ``params``: the scale groups (``quant.make_params``); ``bias``: the float32 additive bias the
    kernel reads (``quant.additive_bias``; -inf = masked), broadcastable to (B, H, N, N), or None."""
    b, h, n, d = q8.shape
    out = torch.zeros((b, h, n, d), dtype=out_dtype, device=q8.device)
    if out.numel() == 0:
        return out
    ints = params.ints.to(q8.device)
    lut = lut_table(config.lut_bits, q8.device) if config.exp_variant == "lut" else None
    scores = _mm(q8, k8.transpose(-1, -2))  # (B, H, N, N)
    full_bias = None
    if bias is not None:
        full_bias = bias_to_int(batch_bias(bias, b), params).to(q8.device, torch.int64).expand(b, h, n, n)

    m = torch.full((b, h, n), NEG, dtype=torch.int64, device=q8.device)
    l_ = torch.zeros((b, h, n), dtype=torch.int64, device=q8.device)
    acc = torch.zeros((b, h, n, d), dtype=torch.int64, device=q8.device)
    one_tile = single_pass(config, n)
    for start in range(0, n, config.block_n):
        cols = slice(start, min(n, start + config.block_n))
        s = scores[..., cols]
        if full_bias is not None:
            bt = full_bias[..., cols]
            valid = bt > MASKED
            s = s + torch.where(valid, bt, 0)
        else:
            valid = torch.ones_like(s, dtype=torch.bool)
        m_new = torch.maximum(m, torch.where(valid, s, NEG).amax(-1))
        y = torch.where(valid, m_new[..., None] - s, 0)
        p = torch.where(valid, softmax_p(y, ints, config, lut), 0)
        pv = _mm(p, v8[..., cols, :])  # the kernel's (p_hi @ v) * 128 + p_lo @ v is this, exactly
        if one_tile:
            l_, acc = p.sum(-1), pv
        else:
            alpha = exp2_q15(m_new - m, ints, config, lut)
            l_ = rescale(l_, alpha, ints, config) + p.sum(-1)
            acc = rescale(acc, alpha[..., None], ints, config) + pv
        _check(acc, config, "acc")
        m = m_new

    has_l = l_ > 0
    if out_dtype == torch.int8:
        den = torch.where(has_l, l_, 1)[..., None]
        mag = acc.abs()
        _check(mag + (den >> 1), config, "int8 output rounding")
        o = (mag + (den >> 1)) // den
        o = torch.where(acc < 0, -o, o).clamp(-128, 127)
        return torch.where(has_l[..., None], o, 0).to(torch.int8)
    # float32, as the kernel: one IEEE division per row, one conversion and multiply per output
    out_mul = params.floats[..., 0].to(device=q8.device, dtype=torch.float32)
    out_mul = out_mul.reshape(()) if out_mul.numel() == 1 else out_mul.reshape(params.table.shape[:2])[..., None]
    inv_l = out_mul / torch.where(has_l, l_, 1).to(torch.float32)
    inv_l = torch.where(has_l, inv_l, torch.zeros((), dtype=torch.float32, device=q8.device))
    of = acc.to(torch.float32) * inv_l[..., None]
    return of.to(out_dtype)


def float_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    float_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 softmax(c q k^T + bias) v; fully masked rows give 0 (as the kernel does)."""
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    c = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = c * (q @ k.transpose(-1, -2))
    b = q.shape[0]
    if float_bias is not None:
        logits = logits + batch_bias(float_bias, b).to(torch.float64)
    if attn_mask is not None:
        attn_mask = batch_bias(attn_mask, b)
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.to(torch.float64)
    all_masked = torch.isneginf(logits).all(-1, keepdim=True)
    logits = torch.where(all_masked, torch.zeros_like(logits), logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.where(all_masked, torch.zeros_like(q[..., :1]), probs @ v)


SQNR_FLOOR_DB = 30.0
"""The accuracy floor (dB vs float64 attention): the tuner's default constraint (``--sqnr-floor``),
the line drawn on ``qflash-db report`` and the threshold the tests hold the kernel to."""


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |out - ref|^2) in dB (inf when equal)."""
    ref = ref.to(torch.float64)
    err = out.to(torch.float64) - ref
    num = float((ref * ref).sum())
    den = float((err * err).sum())
    if den == 0.0:
        return math.inf
    if num == 0.0:
        return -math.inf
    return 10.0 * math.log10(num / den)
