"""The public call path: ``attention`` (float tensors) and ``attention_int8`` (int8 tensors).

Both check their inputs (:mod:`qflash_gen.checks`), pick a config (the tuning DB's for CUDA
tensors, through ``kernel.config_for_call``; the safe default elsewhere), quantize on the device
and launch the rendered kernel (:mod:`qflash_gen.launch`), or run the integer oracle with
``backend="reference"``: the same config, the same bits.
"""

from __future__ import annotations

import contextlib

import torch

from qflash_gen import checks, launch, quant, quant_kernels, reference
from qflash_gen.config import KernelConfig, check_workload, default_config
from qflash_gen.kernel import config_for_call

__all__ = ["attention", "attention_int8", "resolve_config"]


def resolve_config(
    config: KernelConfig | None,
    n: int,
    d: int,
    *,
    q: torch.Tensor | None = None,
    masked: bool = False,
    in_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype = torch.int8,
) -> KernelConfig:
    """The config a call runs: ``config`` checked for (N, D); None: the tuning DB's pick for a
    CUDA ``q`` (get_kernel's lookup, memoized per call shape), else the safe default (CPU, the
    interpreter, or no ``q``)."""
    if config is None:
        if q is not None and q.is_cuda:
            dtype = q.dtype if in_dtype is None else in_dtype
            return config_for_call(q, masked=masked, in_dtype=dtype, out_dtype=out_dtype)
        return default_config(n, d)
    if not isinstance(config, KernelConfig):
        raise ValueError(f"config must be a KernelConfig or None, got {type(config).__name__}")
    check_workload(config, n, d)
    return config


def run(config, q8, k8, v8, params, bias, out_dtype, backend, out=None) -> torch.Tensor:
    """Checked int8 inputs and their constants through ``backend``: the kernel (on CUDA, or on CPU
    through Triton's interpreter) or the integer oracle.  ``out`` receives the result if given."""
    if backend == "reference":
        result = reference.reference_int8(q8, k8, v8, params, config, bias=bias, out_dtype=out_dtype)
        return result if out is None else out.copy_(result)
    if q8.device.type != "cuda" and not checks.interpreter_active():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {q8.device}); set TRITON_INTERPRET=1 to run the "
            "kernel on CPU through Triton's interpreter, or use backend='reference'"
        )
    with on_device(q8.device):
        return launch.launch(config, q8, k8, v8, params, bias=bias, out=out, out_dtype=out_dtype)


def on_device(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device, else a no-op context."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def attention_int8(
    q8: torch.Tensor,
    k8: torch.Tensor,
    v8: torch.Tensor,
    scales: tuple,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    float_bias: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    out_dtype: torch.dtype = torch.int8,
    backend: str = "triton",
) -> torch.Tensor:
    """Integer attention on int8 (B, H, N, D) tensors with per-tensor scales ``(sq, sk, sv)``.

    Returns int8 at scale sv (``out_dtype=torch.int8``) or a float dtype (the value times sv).
    Scales may be Python floats or 0-d device tensors (no host sync either way)."""
    checks.check_backend(backend)
    checks.check_qkv(q8, k8, v8, (torch.int8,), "attention_int8")
    if out_dtype not in checks.OUT_DTYPES:
        raise ValueError(f"out_dtype={out_dtype} is not supported; supported: {checks.OUT_DTYPES}")
    if not isinstance(scales, (tuple, list)) or len(scales) != 3:
        raise ValueError("scales must be a tuple (sq, sk, sv) of floats or 0-d tensors")
    checks.check_float_bias(attn_mask, float_bias, q8.shape, q8.device)
    b, h, n, d = q8.shape
    if q8.numel() == 0:
        return torch.empty(q8.shape, dtype=out_dtype, device=q8.device)
    masked = attn_mask is not None or float_bias is not None
    cfg = resolve_config(config, n, d, q=q8, masked=masked, out_dtype=out_dtype)
    params = quant.make_params(*scales, head_dim=d, scale=scale, device=q8.device)
    bias = quant.bias_to_int(attn_mask, params, float_bias=float_bias)
    return run(cfg, q8, k8, v8, params, bias, out_dtype, backend)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    float_bias: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    backend: str = "triton",
    check_finite: bool = False,
) -> torch.Tensor:
    """softmax(scale * q k^T + mask) v with int8 Q K^T, integer softmax and int8 P V.

    q, k, v: float16/bfloat16/float32 (B, H, N, D), D in SUPPORTED_HEAD_DIMS; the result has the
    input dtype.  attn_mask follows SDPA (bool: True = attend; float: added to the logits) and
    ``float_bias`` adds a float bias on top of a bool mask (Swin).  Per-tensor scales are
    computed on the device (no host sync).  Non-finite inputs: with ``check_finite=True`` a
    ValueError (this syncs); otherwise NaN quantizes to 0 and +-Inf to +-127 of a scale taken
    from the finite values.  Fully masked rows give 0."""
    checks.check_backend(backend)
    checks.check_qkv(q, k, v, checks.FLOAT_DTYPES, "attention")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or None, got {type(scale).__name__}")
    checks.check_float_bias(attn_mask, float_bias, q.shape, q.device)
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if check_finite:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf")
    n, d = q.shape[2], q.shape[3]
    masked = attn_mask is not None or float_bias is not None
    if backend == "triton" and quant_kernels.supported(q, k, v) and (q.is_cuda or checks.interpreter_active()):
        # Fused: two launches quantize q, k, v and write the kernel constants (same bits as below).
        cfg = resolve_config(config, n, d, q=q, masked=masked, out_dtype=q.dtype)
        (q8, k8, v8), _, params = quant_kernels.quantize_qkv(q, k, v, d, scale)
        bias = quant.bias_to_int(attn_mask, params, float_bias=float_bias)
        return run(cfg, q8, k8, v8, params, bias, q.dtype, backend)
    sq, sk, sv = (quant.dynamic_scale(t) for t in (q, k, v))
    q8, k8, v8 = quant.quantize(q, sq), quant.quantize(k, sk), quant.quantize(v, sv)
    return attention_int8(
        q8, k8, v8, (sq, sk, sv), attn_mask, scale,
        float_bias=float_bias, out_dtype=q.dtype, backend=backend,
        config=resolve_config(config, n, d, q=q, masked=masked, out_dtype=q.dtype),
    )  # fmt: skip
