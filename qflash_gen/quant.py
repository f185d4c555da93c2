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
import functools
import math
import struct

import torch

from qflash_gen.config import R_MAX

LOG2E = 1.0 / math.log(2.0)
INT8_MAX = 127
# Smallest dynamic scale: inputs with max|x| below 127 * 2**-100 would get a subnormal scale whose
# float32 reciprocal is inf (the int8 values would be 0/inf garbage); they get this scale instead.
MIN_SCALE = 2.0**-100
BIAS_LIMIT = 2**28  # |integer bias| is clamped here; see NEG/MASKED in the template
MASKED_BIAS = -(2**30)  # integer bias value for a masked key (kernel treats <= -2**29 as masked)


@dataclasses.dataclass(frozen=True)
class KernelParams:
    """The scales a launch reads from device memory (so they can change without recompiling).

    scales:  float32 (..., 4), rows [sq, sk, sv, 0], one row per *scale group*, broadcastable to
             (B, H, 4): shape (4,) or (1, 1, 4) is one group for the whole call (per tensor),
             (1, H, 4) one per head, (B, H, 4) one per (batch, head) pair.  The kernel reads the
             row of the pair it runs at element offset z * stride_z + h * stride_h
             (:meth:`strides`) and derives that group's integer constants itself
             (:attr:`ints`, op for op).
    c_log2e: the softmax scale c (default 1/sqrt(D)) times log2(e), a Python float (float64).

    Float inputs (static scales) are quantized at ``reciprocal(s)`` of their group's scales, the
    output of float calls is ``acc * (sv / l)``.
    """

    scales: torch.Tensor
    c_log2e: float

    @property
    def device(self) -> torch.device:
        return self.scales.device

    @property
    def table(self) -> torch.Tensor:
        """``scales`` as a (B|1, H|1, 4) float32 tensor (a view where it can be one)."""
        t = self.scales
        return t.reshape((1,) * (3 - t.dim()) + tuple(t.shape)) if t.dim() < 3 else t

    def strides(self) -> tuple[int, int]:
        """Element strides of the groups over batch and head: 0 where one group serves the axis."""
        t = self.table
        return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 0)

    @functools.cached_property
    def c_bits(self) -> int:
        """``c_log2e``'s float64 bits as an int64 (how the kernel receives it)."""
        return struct.unpack("<q", struct.pack("<d", self.c_log2e))[0]

    @functools.cached_property
    def ints(self) -> torch.Tensor:
        """int32 (..., 4) [R, MQ, HF, 0] per group: S = c log2(e) sq sk in float64,
        R = floor(1/S + 1/2) clamped to 1..R_MAX (R_MAX where S <= 0 or is not finite),
        MQ = floor(2**26 / R), HF = floor(2**30 / R); the kernel computes the same ops."""
        t = self.scales
        sq, sk = t[..., 0].to(torch.float64), t[..., 1].to(torch.float64)
        s = torch.full((), self.c_log2e, dtype=torch.float64, device=t.device) * sq * sk
        inv = torch.where(s > 0, 1.0 / s, torch.full_like(s, float(R_MAX)))
        r = torch.nan_to_num(torch.floor(inv + 0.5), nan=R_MAX, posinf=R_MAX).clamp(1, R_MAX).to(torch.int64)
        return torch.stack([r, (1 << 26) // r, (1 << 30) // r, torch.zeros_like(r)], dim=-1).to(torch.int32)

    @functools.cached_property
    def floats(self) -> torch.Tensor:
        """float32 (..., 4) [OUT_MUL = sv, 1/sq, 1/sk, 1/sv] per group (``reciprocal``: IEEE)."""
        t = self.scales
        one = torch.ones_like(t[..., 0])
        return torch.stack([t[..., 2], one / t[..., 0], one / t[..., 1], one / t[..., 2]], dim=-1)


def softmax_constant(head_dim: int, scale: float | None = None) -> float:
    """c * log2(e) for the softmax scale c (default 1/sqrt(head_dim)); c must be finite and > 0."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"scale must be a float or None, got {type(scale).__name__}")
    c = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not math.isfinite(c) or c <= 0:
        raise ValueError(f"scale={scale!r} must be a positive finite softmax scale")
    return c * LOG2E


def _as_tensor(x: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    # A Python number becomes a fill kernel on the device, never a host-to-device copy: the
    # call stays capturable in a CUDA graph.
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32)
    return torch.full((), float(x), dtype=torch.float32, device=device)


def check_scale_value(name: str, x) -> None:
    """A Python scale must be a finite float > 0 (not a bool): 0, negative, NaN or inf scales give
    meaningless attention (uniform weights, flipped signs, inf outputs) without any error.
    Device tensors are not read (that would sync): see ``make_params``."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_complex():
            raise ValueError(f"scale {name} must be a float tensor, got {x.dtype}")
        return
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"scale {name}={x!r} must be a float > 0 or a float tensor")
    if not math.isfinite(float(x)) or float(x) <= 0:
        raise ValueError(f"scale {name}={x!r} must be finite and > 0")
    if float(x) < 1e-30:
        raise ValueError(f"scale {name}={x!r} is too small: its reciprocal overflows float32")


def make_params(
    sq: float | torch.Tensor,
    sk: float | torch.Tensor,
    sv: float | torch.Tensor,
    head_dim: int,
    scale: float | None = None,
    *,
    device: torch.device | str | None = None,
) -> KernelParams:
    """The scales of one launch: ``sq, sk, sv`` Python floats (checked: finite, > 0) or float
    tensors broadcastable to (B, H) (one group per element: 0-d = per tensor, (H,) or (1, H) per
    head, (B, H) per (batch, head)).  No host sync: a device tensor's values are not checked, and
    a scale <= 0, NaN or inf there runs with R = R_MAX (and an inf/NaN output where sv is)."""
    for name, x in (("sq", sq), ("sk", sk), ("sv", sv)):
        check_scale_value(name, x)
    if device is None:
        device = next((t.device for t in (sq, sk, sv) if isinstance(t, torch.Tensor)), "cpu")
    device = torch.device(device)
    c_log2e = softmax_constant(head_dim, scale)
    parts = [_as_tensor(x, device) for x in (sq, sk, sv)]
    shape = torch.broadcast_shapes(*(p.shape for p in parts))
    if len(shape) > 2:
        raise ValueError(f"scales of shape {tuple(shape)}: expected floats or tensors broadcastable to (B, H)")
    table = torch.stack([p.expand(shape) for p in parts] + [torch.zeros(shape, device=device)], dim=-1)
    return KernelParams(scales=table, c_log2e=c_log2e)


def params_of(scales, head_dim: int, scale, device: torch.device, bh: tuple[int, int]) -> KernelParams:
    """``scales`` (sq, sk, sv) as KernelParams (or a KernelParams, returned as is), checked to
    broadcast over the call's (B, H)."""
    if isinstance(scales, KernelParams):
        params = scales
    else:
        if not isinstance(scales, (tuple, list)) or len(scales) != 3:
            raise ValueError(
                f"scales must be a tuple (sq, sk, sv) of floats or float tensors broadcastable to (B, H), got {scales!r}"
            )
        params = make_params(*scales, head_dim=head_dim, scale=scale, device=device)
    groups = tuple(params.table.shape[:2])
    if any(g not in (1, x) for g, x in zip(groups, bh, strict=True)):
        raise ValueError(f"scales of shape {groups} (scale groups) do not broadcast to (B, H) = {bh}")
    if params.device != device:
        raise ValueError(f"scales are on {params.device} but q is on {device}")
    return params


def dynamic_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor symmetric int8 scale, a 0-d float32 device tensor: max|x| / 127.

    Non-finite elements are ignored; an all-zero tensor gets scale 1 (its int8 image is 0 either
    way, and no later step divides by the scale); a tiny one gets at least MIN_SCALE."""
    finite = torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))
    amax = finite.abs().amax().to(torch.float32) if x.numel() else torch.zeros((), device=x.device)
    # Divide by a device tensor, not a Python number: on CUDA, torch turns "tensor / scalar" into a
    # multiply by the scalar's reciprocal (seen on an H100: scales one ulp off IEEE division, which
    # the fused kernels and the CPU compute).
    div = torch.full((), float(INT8_MAX), dtype=torch.float32, device=amax.device)
    return torch.where(amax > 0, (amax / div).clamp_min(MIN_SCALE), torch.ones_like(amax))


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


def additive_bias(attn_mask: torch.Tensor | None, float_bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """One float32 additive bias (natural-log units, -inf at masked keys) from an SDPA-style
    ``attn_mask`` (bool: True = attend; float: added to the logits) and an optional ``float_bias``
    on top (Swin: relative-position bias + shift mask); broadcastable like the inputs.  The kernel
    reads this and converts it to score units itself, per scale group (:func:`bias_to_int`).
    Device ops, no sync."""
    if attn_mask is None and float_bias is None:
        return None
    fb = None if float_bias is None else float_bias.to(torch.float32)
    if attn_mask is None:
        return fb
    if attn_mask.dtype == torch.bool:
        base = fb if fb is not None else torch.zeros((), dtype=torch.float32, device=attn_mask.device)
        return torch.where(attn_mask, base, torch.full((), float("-inf"), device=attn_mask.device))
    mask = attn_mask.to(torch.float32)
    return mask if fb is None else fb + mask


def batch_bias(bias: torch.Tensor, b: int) -> torch.Tensor:
    """A bias whose batch axis Z divides ``b`` (row z % Z for batch z: Swin's windows) tiled to
    ``b`` rows; any other bias as it is (it broadcasts)."""
    if bias.dim() == 4 and bias.shape[0] not in (1, b):
        return bias.repeat(b // bias.shape[0], 1, 1, 1)
    return bias


def bias_to_int(
    attn_mask: torch.Tensor | None,
    params: KernelParams,
    *,
    float_bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The int32 score-unit bias the kernel derives from :func:`additive_bias` of ``attn_mask``
    and ``float_bias``, for each scale group of ``params``: round(b * log2(e) * R) in float64,
    half to even, NaN -> 0, clamped to +-BIAS_LIMIT, -inf (a masked key) -> MASKED_BIAS.
    Broadcast over the groups: (B|1, H|1, N, N) int32.  The oracle's view of the bias."""
    bias = additive_bias(attn_mask, float_bias)
    if bias is None:
        return None
    r = params.ints[..., 0].to(device=bias.device, dtype=torch.float64)
    return float_bias_to_int(bias, r[..., None, None])


def float_bias_to_int(b: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``bias_to_int`` for a float bias ``b`` and float64 ``r`` (R, broadcastable to ``b``)."""
    x = b.to(torch.float64) * (LOG2E * r)
    neg_inf = torch.isneginf(x)
    x = torch.nan_to_num(x, nan=0.0, posinf=BIAS_LIMIT, neginf=-BIAS_LIMIT)
    out = torch.round(x).clamp(-BIAS_LIMIT, BIAS_LIMIT).to(torch.int32)
    return torch.where(neg_inf, torch.full_like(out, MASKED_BIAS), out)


# -- per-group quantization (the torch oracle of quant_kernels) --------------------------------------
def group_scales(x: torch.Tensor) -> torch.Tensor:
    """``dynamic_scale`` of each (batch, head) slice of a (B, H, N, D) tensor: float32 (B, H)."""
    finite = torch.where(torch.isfinite(x), x.abs(), torch.zeros((), dtype=x.dtype, device=x.device))
    amax = finite.to(torch.float32).amax(dim=(2, 3))
    div = torch.full((), float(INT8_MAX), device=x.device)
    return torch.where(amax > 0, (amax / div).clamp_min(MIN_SCALE), torch.ones_like(amax))


def quantize_groups(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``quantize`` of a (B, H, N, D) tensor with one scale per (batch, head), ``scales``
    broadcastable to (B, H)."""
    inv = reciprocal(scales.to(device=x.device, dtype=torch.float32))
    return quantize_reciprocal(x, inv[..., None, None])


def smooth_k(k: torch.Tensor, sk: torch.Tensor) -> torch.Tensor:
    """k minus its per-(batch, head, channel) mean over the N tokens, in float32.  Softmax is
    unchanged (q . mean(k) is the same for every key of a row) while a component shared by all
    tokens no longer inflates k's scale.  The mean is taken on the int8 grid of ``sk`` (the
    first-pass scale), float32(sum of quantize(k, sk)) * sk / N, so every device computes the
    same bits: what quant_kernels does."""
    n = k.shape[2]
    total = quantize_groups(k, sk).to(torch.int32).sum(dim=2).to(torch.float32)  # exact: |sum| < 2**24
    mean = (total * sk[..., None]) / torch.full((), float(n), device=k.device)
    return k.to(torch.float32) - mean[:, :, None, :]


def quantize_dynamic(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, scale: float | None = None, *, smooth: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, KernelParams]:
    """int8 q, k, v and their KernelParams with one scale per (batch, head) each, k smoothed
    (:func:`smooth_k`) unless ``smooth=False``: the bits ``quant_kernels.quantize_heads`` writes
    (v here in the normal layout)."""
    sq, sv = group_scales(q), group_scales(v)
    sk = group_scales(k)
    if smooth:
        k = smooth_k(k, sk)
        sk = group_scales(k)
    params = make_params(sq, sk, sv, head_dim=head_dim, scale=scale)
    return quantize_groups(q, sq), quantize_groups(k, sk), quantize_groups(v, sv), params
