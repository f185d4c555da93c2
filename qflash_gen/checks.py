"""Input checks of every public entry point (docs/design.md, "Bad input").

Each raises ValueError naming the argument and what is supported.  They run before any launch;
the kernel itself checks nothing.
"""

from __future__ import annotations

import os

import torch

from qflash_gen.keys import DTYPES, FLOAT_DTYPES

SUPPORTED_HEAD_DIMS = (32, 64, 128)
OUT_DTYPES = DTYPES  # int8, fp16, bf16, fp32
BACKENDS = ("triton", "reference")

__all__ = [
    "BACKENDS",
    "FLOAT_DTYPES",
    "OUT_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "check_backend",
    "check_float_bias",
    "check_head_dim",
    "check_kernel_device",
    "check_mask",
    "check_qkv",
    "interpreter_active",
    "mask_fits",
]


def interpreter_active() -> bool:
    """True when kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_kernel_device(device) -> None:
    """backend='triton' runs the kernel on CUDA, or on CPU through Triton's interpreter only."""
    if device.type != "cuda" and not interpreter_active():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 to run the "
            "kernel on CPU through Triton's interpreter, or use backend='reference'"
        )


def check_head_dim(d: int, what: str = "head_dim D") -> None:
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{what}={d} is not supported; supported: {SUPPORTED_HEAD_DIMS}")


def check_qkv(q, k, v, allowed: tuple[torch.dtype, ...], what: str) -> None:
    """q, k, v: tensors of rank 4 (B, H, N, D), one shape, one device, a dtype in ``allowed``
    and a supported head dim; ``what`` names the caller in the messages."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (B, H, N, D) like SDPA, got shape {tuple(t.shape)}")
        if t.dtype not in allowed:
            raise ValueError(f"{name} has dtype {t.dtype}; {what} supports {[str(d) for d in allowed]}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k, v must have the same shape (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim D={d} is not supported; supported: {SUPPORTED_HEAD_DIMS}")


def check_mask(mask, name: str, shape, device) -> None:
    """An SDPA-style mask or bias: None, or a bool / floating tensor on ``device`` that broadcasts
    to (B, H, N, N) for q's ``shape``; its batch axis may also be a divisor Z of B, batch z then
    reading row z % Z (Swin: the window index of z = image * Z + window)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"{name} must be bool (True = attend) or floating (added to logits), got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but q is on {device}")
    b, h, n, _ = shape
    if not mask_fits(tuple(mask.shape), (b, h, n)):
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} does not broadcast to (B, H, N, N) = {(b, h, n, n)} "
            "(nor has a batch axis dividing B)"
        )


def mask_fits(mask_shape: tuple[int, ...], bhn: tuple[int, int, int]) -> bool:
    """Whether a mask of ``mask_shape`` applies to a (B, H, N) call: rank <= 4, broadcastable to
    (Z, H, N, N) with Z = 1, B, or a divisor of B."""
    b, h, n = bhn
    if len(mask_shape) > 4:
        return False
    full = (1,) * (4 - len(mask_shape)) + tuple(mask_shape)
    z = full[0]
    if z < 1 or b % z:
        return False
    try:
        return torch.broadcast_shapes(full[1:], (h, n, n)) == (h, n, n)
    except RuntimeError:
        return False


def check_float_bias(attn_mask, float_bias, shape, device) -> None:
    """``attn_mask`` and ``float_bias`` together: both masks valid, and the float bias floating."""
    check_mask(attn_mask, "attn_mask", shape, device)
    check_mask(float_bias, "float_bias", shape, device)
    if float_bias is not None and float_bias.dtype == torch.bool:
        raise ValueError("float_bias must be floating; pass a bool mask as attn_mask")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose one of {BACKENDS}")
