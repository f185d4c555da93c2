"""The public call path: ``attention`` (float tensors) and ``attention_int8`` (int8 tensors).

Both check their inputs (:mod:`qflash_gen.checks`), pick a config (the tuning DB's for CUDA
tensors, through ``kernel.config_for_call``; the safe default elsewhere), quantize on the device
and launch the rendered kernel (:mod:`qflash_gen.launch`), or run the integer oracle with
``backend="reference"``: the same config, the same bits.
"""

from __future__ import annotations

import contextlib

import torch

from qflash_gen import checks, codegen, hotpath, launch, quant, quant_kernels, reference
from qflash_gen.config import KernelConfig, check_workload, default_config
from qflash_gen.kernel import config_for_call

__all__ = ["attention", "attention_int8", "output_like", "resolve_config", "run"]


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
    """Checked int8 inputs and their scales through ``backend``: the kernel (on CUDA, or on CPU
    through Triton's interpreter) or the integer oracle.  ``bias``: the float32 additive bias
    (``quant.additive_bias``) or None.  ``out`` receives the result if given (any strides)."""
    if backend == "reference":
        result = reference.reference_int8(q8, k8, v8, params, config, bias=bias, out_dtype=out_dtype)
        return result if out is None else out.copy_(result)
    checks.check_kernel_device(q8.device)
    with on_device(q8.device):
        return launch.launch_fast(codegen.load(config), config, q8, k8, v8, params, bias, out, out_dtype)


def on_device(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device, else a no-op context."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def output_like(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (B, H, N, D) output for ``q``, laid out (B, N, H, D) in memory (as SDPA's flash backend
    lays out its output): ``out.transpose(1, 2).reshape(B, N, H * D)``, what a model does next, is
    then a view, not a copy.  The layout does not depend on q's strides, so a traced graph (the
    ops' fake implementations) knows it in advance."""
    b, h, n, d = q.shape
    return torch.empty((b, n, h, d), dtype=dtype, device=q.device).permute(0, 2, 1, 3)


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
    """Integer attention on int8 (B, H, N, D) tensors with scales ``(sq, sk, sv)``.

    Each scale is a Python float (finite, > 0: anything else is a ValueError) or a float tensor
    broadcastable to (B, H): 0-d for one scale per tensor, (H,) per head, (B, H) per (batch, head)
    (device tensors are not read on the host, so no check and no sync: a scale <= 0, NaN or inf
    there gives meaningless output, see ``quant.make_params``).  A ``quant.KernelParams`` (as
    ``quant_kernels.quantize_heads`` returns) is accepted too.  Returns int8 at scale sv
    (``out_dtype=torch.int8``) or a float dtype (the value times sv)."""
    checks.check_backend(backend)
    checks.check_qkv(q8, k8, v8, (torch.int8,), "attention_int8")
    if out_dtype not in checks.OUT_DTYPES:
        raise ValueError(f"out_dtype={out_dtype} is not supported; supported: {checks.OUT_DTYPES}")
    b, h, n, d = q8.shape
    params = quant.params_of(scales, d, scale, q8.device, (b, h))
    checks.check_float_bias(attn_mask, float_bias, q8.shape, q8.device)
    if q8.numel() == 0:
        return torch.empty(q8.shape, dtype=out_dtype, device=q8.device)
    bias = quant.additive_bias(attn_mask, float_bias)
    cfg = resolve_config(config, n, d, q=q8, masked=bias is not None, out_dtype=out_dtype)
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
    smooth_k: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T + mask) v with int8 Q K^T, integer softmax and int8 P V.

    q, k, v: float16/bfloat16/float32 (B, H, N, D) of any strides (e.g. views of a packed qkv
    projection), D in SUPPORTED_HEAD_DIMS; the result has the input dtype (laid out (B, N, H, D)
    in memory: ``output_like``).  attn_mask follows SDPA (bool: True = attend; float:
    added to the logits) and ``float_bias`` adds a float bias on top of a bool mask (Swin).  One
    scale per (batch, head) and tensor, computed on the device (no host sync), k first smoothed by
    its per-channel mean (``smooth_k``; exact for softmax): two launches, the quantizer
    (``quant_kernels.quantize_heads``) and the kernel.  Non-finite inputs: with
    ``check_finite=True`` a ValueError (this syncs); otherwise NaN quantizes to 0 and +-Inf to
    +-127 of a scale taken from the finite values.  Fully masked rows give 0.  ``out`` (optional,
    q's shape and dtype, any strides) receives the result.  A call repeating an earlier call's
    signature on CUDA replays that call's launches (:mod:`qflash_gen.hotpath`): same kernels,
    same bits, a fraction of the host time."""
    sig, hot_bias = None, attn_mask if float_bias is None else float_bias  # a float32 one is the kernel's bias
    if out is None and not check_finite and (attn_mask is None or float_bias is None) and backend == "triton":
        try:
            sig = hotpath.signature(q, k, v, hot_bias, scale, ("dynamic", smooth_k), config)
            plan = None if sig is None else hotpath.lookup(sig)
        except (AttributeError, TypeError):  # not tensors, or an unhashable argument: the checked path says why
            sig = plan = None
        if plan is not None:
            with on_device(q.device):
                return plan(q, k, v, hot_bias)
    checks.check_backend(backend)
    checks.check_qkv(q, k, v, checks.FLOAT_DTYPES, "attention")
    quant.softmax_constant(q.shape[-1], scale)  # refuses a bad softmax scale before any launch
    checks.check_float_bias(attn_mask, float_bias, q.shape, q.device)
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device}")
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if check_finite:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf")
    n, d = q.shape[2], q.shape[3]
    bias = quant.additive_bias(attn_mask, float_bias)
    cfg = resolve_config(config, n, d, q=q, masked=bias is not None, out_dtype=q.dtype)
    if backend == "reference":
        q8, k8, v8, params = quant.quantize_dynamic(q, k, v, d, scale, smooth=smooth_k)
        return run(cfg, q8, k8, v8, params, bias, q.dtype, backend, out=out)
    checks.check_kernel_device(q.device)
    with on_device(q.device):
        q8, k8, v8, params = quant_kernels.quantize_heads(q, k, v, scale, smooth=smooth_k)
        result = run(
            cfg, q8, k8, v8, params, bias, q.dtype, backend, out=output_like(q, q.dtype) if out is None else out
        )
        if sig is not None and bias is hot_bias:
            hotpath.record(sig, cfg, q, k, v, bias, q.dtype, smooth=smooth_k, scale=scale)
        return result
