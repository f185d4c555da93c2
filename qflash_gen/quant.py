"""Scales -> integer constants of the kernel, and int8 quantization.

Everything here is plain torch on the inputs' device: dynamic (per-call) scales never leave the
device, so the call path has no host sync (no ``.item()``) and can be captured in a CUDA graph.

The kernel computes the softmax in base 2 with one integer unit: R = round(1/S) score units per
halving, where S = c * log2(e) * sq * sk.  R is clamped to 1..R_MAX; a clamped R changes the
softmax temperature (inputs whose scales make S < 1/65535 are far smaller than any trained ViT's),
which the SQNR check reports.  A bias b (natural-log units, added to c * q.k as SDPA does) becomes
round(b * log2(e) * R) score units, so bias and scores share one scale.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from qflash_gen.config import R_MAX

LOG2E = 1.0 / math.log(2.0)
INT8_MAX = 127
BIAS_LIMIT = 2**28  # |integer bias| is clamped here; see NEG/MASKED in the template
MASKED_BIAS = -(2**30)  # integer bias value for a masked key (kernel treats <= -2**29 as masked)


@dataclasses.dataclass(frozen=True)
class KernelParams:
    """Device tensors the kernel reads at start (so scales can change without recompiling).

    ints:   int32 [R, MQ, HF, 0] with MQ = floor(2**26 / R), HF = floor(2**30 / R)
    floats: float32 [OUT_MUL, 1/SQ, 1/SK, 1/SV]: OUT_MUL = sv (float outputs: out = acc * (OUT_MUL / l));
            1/SQ... = ``reciprocal(sq)``..., read only by float inputs, which the kernel quantizes
            as it loads them (``quantize`` at these scales, bit for bit)
    """

    ints: torch.Tensor
    floats: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.ints.device


def _as_tensor(x: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    # A Python number becomes a fill kernel on the device, never a host-to-device copy: the
    # call stays capturable in a CUDA graph.
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float64).reshape(())
    return torch.full((), float(x), dtype=torch.float64, device=device)


def make_params(
    sq: float | torch.Tensor,
    sk: float | torch.Tensor,
    sv: float | torch.Tensor,
    head_dim: int,
    scale: float | None = None,
    *,
    device: torch.device | str | None = None,
) -> KernelParams:
    """Integer constants for scales ``sq, sk, sv`` (floats or 0-d device tensors; no sync)."""
    if device is None:
        device = next((t.device for t in (sq, sk, sv) if isinstance(t, torch.Tensor)), "cpu")
    device = torch.device(device)
    c = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not math.isfinite(c) or c <= 0:
        raise ValueError(f"scale={scale!r} must be a positive finite softmax scale")
    s = _as_tensor(c * LOG2E, device) * _as_tensor(sq, device) * _as_tensor(sk, device)
    inv = torch.where(s > 0, 1.0 / s, torch.full_like(s, float(R_MAX)))
    # R = floor(1/S + 1/2) (quant_kernels computes the same in-kernel, op for op)
    r = torch.nan_to_num(torch.floor(inv + 0.5), nan=R_MAX, posinf=R_MAX).clamp(1, R_MAX).to(torch.int64)
    mq = (1 << 26) // r
    hf = (1 << 30) // r
    ints = torch.stack([r, mq, hf, torch.zeros_like(r)]).to(torch.int32)
    sq32, sk32, sv32 = (_as_tensor(x, device).to(torch.float32) for x in (sq, sk, sv))
    floats = torch.stack([sv32, reciprocal(sq32), reciprocal(sk32), reciprocal(sv32)])
    return KernelParams(ints=ints, floats=floats)


def dynamic_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor symmetric int8 scale, a 0-d float32 device tensor: max|x| / 127.

    Non-finite elements are ignored; an all-zero tensor gets scale 1 (its int8 image is 0 either
    way, and no later step divides by the scale)."""
    finite = torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))
    amax = finite.abs().amax().to(torch.float32) if x.numel() else torch.zeros((), device=x.device)
    # Divide by a device tensor, not a Python number: on CUDA, torch turns "tensor / scalar" into a
    # multiply by the scalar's reciprocal (seen on an H100: scales one ulp off IEEE division, which
    # the fused kernels and the CPU compute).
    div = torch.full((), float(INT8_MAX), dtype=torch.float32, device=amax.device)
    return torch.where(amax > 0, amax / div, torch.ones_like(amax))


def reciprocal(scale: float | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """float32(1) / float32(scale), one IEEE float32 division (a 0-d tensor on the scale's device)."""
    if isinstance(scale, torch.Tensor):
        scale_t = scale.to(device=device or scale.device, dtype=torch.float32)
    else:
        scale_t = torch.full((), float(scale), dtype=torch.float32, device=device or "cpu")
    return torch.ones_like(scale_t) / scale_t  # tensor / tensor: IEEE on CPU and CUDA


def quantize(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Symmetric int8: round-half-even(x * reciprocal(scale)) clamped to [-127, 127]; NaN -> 0,
    +-Inf -> +-127.  A multiply by the float32 reciprocal (not a division per element) is what the
    kernels can afford inside their loads; every path (torch, quant_kernels, the attention
    kernel's float inputs) computes exactly this."""
    return quantize_reciprocal(x, reciprocal(scale, x.device))


def quantize_reciprocal(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """``quantize`` given the float32 reciprocal of the scale (``KernelParams.floats[1:4]``)."""
    y = torch.nan_to_num(
        x.to(torch.float32) * inv.to(device=x.device, dtype=torch.float32), nan=0.0, posinf=INT8_MAX, neginf=-INT8_MAX
    )
    return torch.round(y).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


KEY_GROUP = 16  # keys per 16-byte vector of a key-major int8 V


def padded_keys(n: int) -> int:
    """N rounded up to a whole number of 16-key groups (at least one)."""
    return max(KEY_GROUP, -(-n // KEY_GROUP) * KEY_GROUP)


def key_major(v: torch.Tensor) -> torch.Tensor:
    """``v`` (B, H, N, D) copied into the key-major layout the kernel reads fastest: a (B, H, N, D)
    view with strides (H*D*Np, D*Np, 1, Np) of a (B, H, D, Np) buffer, Np = ``padded_keys(N)``.

    The int8 MMA P @ V wants V with keys innermost in shared memory; from the usual layout
    (D innermost) the kernel transposes it byte by byte, from this one it loads 16 keys per
    vector.  Keys N..Np-1 of the buffer are left unset: the kernel reads them but weights them by
    p = 0.  Any dtype; the same values as ``v`` (``torch.equal(key_major(v), v)``)."""
    b, h, n, d = v.shape
    buf = torch.empty((b, h, d, padded_keys(n)), dtype=v.dtype, device=v.device)
    view = buf[..., :n].transpose(-1, -2)
    view.copy_(v)
    return view


def bias_to_int(
    attn_mask: torch.Tensor | None,
    params: KernelParams,
    *,
    float_bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """SDPA-style ``attn_mask`` (bool: True = attend; float: added to the logits) -> int32 bias.

    ``float_bias`` may be given together with a bool mask (Swin: relative-position bias + shift
    mask).  Result is int32 in score units, masked keys at MASKED_BIAS, broadcastable like the
    inputs.  Runs on the device with no sync."""
    if attn_mask is None and float_bias is None:
        return None
    r = params.ints[0].to(torch.float64)
    bias = None
    if float_bias is not None:
        bias = _float_bias_to_int(float_bias, r)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            base = bias if bias is not None else torch.zeros((), dtype=torch.int32, device=attn_mask.device)
            bias = torch.where(attn_mask, base, torch.full((), MASKED_BIAS, dtype=torch.int32, device=base.device))
        else:
            mask_int = _float_bias_to_int(attn_mask, r)
            bias = mask_int if bias is None else _sat_add(bias, mask_int)
    return bias.to(torch.int32)


def _float_bias_to_int(b: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    x = b.to(torch.float64) * (LOG2E * r)
    neg_inf = torch.isneginf(x)
    x = torch.nan_to_num(x, nan=0.0, posinf=BIAS_LIMIT, neginf=-BIAS_LIMIT)
    out = torch.round(x).clamp(-BIAS_LIMIT, BIAS_LIMIT).to(torch.int32)
    return torch.where(neg_inf, torch.full_like(out, MASKED_BIAS), out)


def _sat_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    masked = (a <= MASKED_BIAS // 2) | (b <= MASKED_BIAS // 2)
    s = (a.to(torch.int64) + b.to(torch.int64)).clamp(-BIAS_LIMIT, BIAS_LIMIT).to(torch.int32)
    return torch.where(masked, torch.full_like(s, MASKED_BIAS), s)
