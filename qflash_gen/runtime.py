"""Public call path: input checks, quantization, launch of the rendered kernel, or the oracle.

``attention`` takes float tensors in SDPA layout (B, H, N, D) and returns the input dtype;
``attention_int8`` takes int8 tensors and their scales.  Both accept ``backend="reference"``,
which runs the integer oracle with the same config and returns the same bits.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
import triton
from triton import knobs as _knobs
from triton.runtime import driver as _driver

from qflash_gen import codegen, quant, quant_kernels, reference
from qflash_gen.config import DEFAULT_CONFIG, KernelConfig, check_workload, fits

SUPPORTED_HEAD_DIMS = (32, 64, 128)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
OUT_DTYPES = (torch.int8, torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("triton", "reference")


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_config(n_ctx: int, head_dim: int) -> KernelConfig:
    """The safe default for a shape: DEFAULT_CONFIG, widened to int64 where int32 could overflow."""
    if fits(DEFAULT_CONFIG, n_ctx, head_dim):
        return DEFAULT_CONFIG
    return DEFAULT_CONFIG.replace(acc_bits=64)


# -- input checks (DESIGN §9) --------------------------------------------------------------
def _check_qkv(q, k, v, allowed: tuple[torch.dtype, ...], what: str) -> None:
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


def _check_mask(mask, name: str, shape, device) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"{name} must be bool (True = attend) or floating (added to logits), got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but q is on {device}")
    b, h, n, _ = shape
    try:
        torch.broadcast_shapes(mask.shape, (b, h, n, n))
        ok = mask.dim() <= 4 and torch.broadcast_shapes(mask.shape, (b, h, n, n)) == (b, h, n, n)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to (B, H, N, N) = {(b, h, n, n)}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose one of {BACKENDS}")


def _resolve_config(
    config: KernelConfig | None,
    n: int,
    d: int,
    *,
    q: torch.Tensor | None = None,
    masked: bool = False,
    in_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype = torch.int8,
) -> KernelConfig:
    """``config`` checked for (N, D); None: the tuning DB's pick for CUDA ``q`` (get_kernel's
    lookup, memoized per call shape), else the safe default (CPU, interpreter, no ``q``)."""
    if config is None:
        if q is not None and q.is_cuda:
            from qflash_gen.kernel import config_for_call  # lazy: kernel imports this module

            dtype = q.dtype if in_dtype is None else in_dtype
            return config_for_call(q, masked=masked, in_dtype=dtype, out_dtype=out_dtype)
        return default_config(n, d)
    if not isinstance(config, KernelConfig):
        raise ValueError(f"config must be a KernelConfig or None, got {type(config).__name__}")
    check_workload(config, n, d)
    return config


@functools.cache
def _lut(lut_bits: int, device: torch.device) -> torch.Tensor:
    return reference.lut_table(lut_bits, device)


def launch(
    config: KernelConfig,
    q8: torch.Tensor,
    k8: torch.Tensor,
    v8: torch.Tensor,
    params: quant.KernelParams,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.int8,
) -> torch.Tensor:
    """Run the rendered kernel for ``config`` on checked int8 inputs (no checks, no sync); float
    inputs are quantized on load at the static scales in ``params.floats`` (see ``launch_static``)."""
    return launch_module(codegen.load(config), config, q8, k8, v8, params, bias, out, out_dtype)


def launch_module(
    module: ModuleType,
    config: KernelConfig,
    q8: torch.Tensor,
    k8: torch.Tensor,
    v8: torch.Tensor,
    params: quant.KernelParams,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.int8,
) -> torch.Tensor:
    """``launch`` with the rendered module already loaded (``codegen.load(config)``): the lean
    path of ``kernel.Kernel``, which loads once instead of hashing the config on every call."""
    b, h, n, d = q8.shape
    if out is None:
        out = torch.empty((b, h, n, d), dtype=out_dtype, device=q8.device)
    if n == 0 or b * h == 0:
        return out
    # Hot path (kernel.Kernel calls this on every launch): plain ints and tuples only.
    ints = params.ints
    if bias is None:
        bias_arg, bias_strides = ints, _NO_STRIDES
    else:
        bias_arg = bias.expand(b, h, n, n)
        bias_strides = bias_arg.stride()
    lut = _lut(config.lut_bits, q8.device) if config.exp_variant == "lut" else ints
    bm = config.block_m
    hpp = config.heads_for(b * h)
    module._qflash_fwd[((n + bm - 1) // bm, b * h // hpp)](
        q8, k8, v8, out,
        bias_arg, ints, params.floats, lut,
        *q8.stride(), *k8.stride(), *v8.stride(), *out.stride(), *bias_strides,
        h,
        N_CTX=n, HEAD_DIM=d, HAS_BIAS=bias is not None, OUT_FLOAT=out_dtype is not _INT8, V_KEYS=v_keys(v8),
        BLOCK_M=bm, BLOCK_N=config.block_n, HPP=hpp,
        num_warps=config.num_warps, num_stages=config.num_stages, **_maxnreg(config),
    )  # fmt: skip
    return out


def _maxnreg(config: KernelConfig) -> dict:
    return {"maxnreg": config.max_regs} if config.max_regs else {}


_NO_STRIDES = (0, 0, 0, 0)
_INT8 = torch.int8


def v_keys(v: torch.Tensor) -> int:
    """The kernel's V_KEYS for ``v``: ``quant.padded_keys(N)`` when v is key-major (unit key
    stride, a multiple-of-16 row pitch that holds the padded keys, storage that covers the last
    padded key), so its loads take whole 16-key vectors; else N."""
    b, h, n, d = v.shape
    if n < 2 or d < 2 or v.stride(2) != 1:
        return n
    np_, pitch = quant.padded_keys(n), v.stride(3)
    if pitch % quant.KEY_GROUP or pitch < np_:
        return n
    last = v.storage_offset() + (b - 1) * v.stride(0) + (h - 1) * v.stride(1) + (d - 1) * pitch + np_ - 1
    return np_ if last < v.untyped_storage().nbytes() // v.element_size() else n


# -- float inputs at static (calibrated) scales ---------------------------------------------------
def launch_static(
    module: ModuleType,
    config: KernelConfig,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: quant.KernelParams,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    fast: bool = False,
) -> torch.Tensor:
    """Float q, k, v (any strides) at static scales, quantized by the kernel as it loads them
    (``quant.quantize``'s bits, from the reciprocals in ``params.floats[1:4]``): one launch.
    Programs that share a head each quantize its K and V again; measured on an H100, that still
    beat a separate quantization launch on ViT-B (docs/perf-notes.md).  ``fast``: CUDA without
    bias may take ``launch_fast``.  No checks, no sync.  ``config.max_regs`` and
    ``config.heads_per_program`` are not applied: they are tuned on int8 inputs, and the in-load
    quantization needs registers a cap would spill (ViT-B on an H100: 128 µs uncapped, 230 µs at
    168 registers; with 2 heads per program, 169 µs)."""
    if config.max_regs or config.heads_per_program > 1:
        # the same rendered module: both are launch options
        config = config.replace(max_regs=0, heads_per_program=1)
    if fast and bias is None:
        return launch_fast(module, config, q, k, v, params, out, out_dtype)
    return launch_module(module, config, q, k, v, params, bias, out, out_dtype)


# -- direct launch of the compiled kernel (CUDA hot path of kernel.Kernel) ---------------------------
# Triton's `fn[grid](...)` re-derives, on every call, the specialization of all 29 arguments (pointer
# alignment, ints equal to 1 or divisible by 16) to find the compiled kernel.  For contiguous int8
# inputs of one Kernel (fixed N and D) every stride follows from H, so the specialization is fixed by
# (H, out dtype, the five pointers' 16-byte alignment): the compiled kernel is cached under that key
# and launched through its own launcher, as Triton does after its lookup.  Anything else (bias,
# strided tensors, the interpreter, another Triton release) takes the normal launch.
_FAST_TRITON = triton.__version__.startswith("3.6.")


def launch_fast(module, config, q8, k8, v8, params, out, out_dtype) -> torch.Tensor:
    """``launch_module`` without bias for CUDA tensors; falls back to it where the key can't cover.
    q8, k8, v8 are int8, or float (quantized on load at the scales in ``params.floats``)."""
    b, h, n, d = q8.shape
    if out is None:
        out = torch.empty((b, h, n, d), dtype=out_dtype, device=q8.device)
    if not (_FAST_TRITON and q8.is_contiguous() and k8.is_contiguous() and out.is_contiguous()):
        return launch_module(module, config, q8, k8, v8, params, None, out, out_dtype)
    if n == 0 or b * h == 0:
        return out
    if v8.is_contiguous():
        vk, v_strides = n, (h * n * d, n * d, d, 1)
    else:  # key-major (quant.key_major) exactly, or the normal launch
        vk = quant.padded_keys(n)
        v_strides = (h * d * vk, d * vk, 1, vk)
        if v8.stride() != v_strides or v_keys(v8) != vk:
            return launch_module(module, config, q8, k8, v8, params, None, out, out_dtype)
    ints = params.ints
    ptrs = (q8.data_ptr(), k8.data_ptr(), v8.data_ptr(), out.data_ptr(), ints.data_ptr(), params.floats.data_ptr())
    hpp = config.heads_for(b * h)
    key = (n, d, h, hpp, vk, q8.dtype, out_dtype, tuple(p & 15 == 0 for p in ptrs))
    cache = module.__dict__.setdefault("_qflash_fast", {})
    entry = cache.get(key)
    if entry is None:
        launch_module(module, config, q8, k8, v8, params, None, out, out_dtype)  # compiles if needed
        cache[key] = _compiled_for(module, config, q8, k8, v8, params, out, out_dtype, v_strides, vk)
        return out
    compiled, consts = entry
    lut = _lut(config.lut_bits, q8.device) if config.exp_variant == "lut" else ints
    s_b = h * n * d
    s_h = n * d
    args = (
        q8, k8, v8, out, ints, ints, params.floats, lut,
        s_b, s_h, d, 1, s_b, s_h, d, 1, *v_strides, s_b, s_h, d, 1, 0, 0, 0, 0, h, *consts,
    )  # fmt: skip
    bm = config.block_m
    grid = ((n + bm - 1) // bm, b * h // hpp, 1)
    stream = _driver.active.get_current_stream(q8.device.index)
    meta = compiled.launch_metadata(grid, stream, *args)
    compiled.run(
        grid[0], grid[1], 1, stream, compiled.function, compiled.packed_metadata, meta,
        _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook, *args,
    )  # fmt: skip
    return out


def _compiled_for(module, config, q8, k8, v8, params, out, out_dtype, v_strides, vk):
    """The CompiledKernel Triton picked for these arguments (warmup: looks up, launches nothing)."""
    b, h, n, d = q8.shape
    hpp = config.heads_for(b * h)
    consts = (n, d, False, out_dtype is not _INT8, vk, config.block_m, config.block_n, hpp)
    ints = params.ints
    lut = _lut(config.lut_bits, q8.device) if config.exp_variant == "lut" else ints
    s_b, s_h = h * n * d, n * d  # the strides launch_fast passes (the same as any contiguous tensor's
    strides = (s_b, s_h, d, 1) * 2 + v_strides + (s_b, s_h, d, 1)  # except on size-1 dims, where
    compiled = module._qflash_fwd.warmup(  # no index ever multiplies them)
        q8, k8, v8, out, ints, ints, params.floats, lut, *strides, 0, 0, 0, 0, h,
        N_CTX=n, HEAD_DIM=d, HAS_BIAS=False, OUT_FLOAT=out_dtype is not _INT8, V_KEYS=vk,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, HPP=hpp,
        num_warps=config.num_warps, num_stages=config.num_stages, grid=(1,), **_maxnreg(config),
    )  # fmt: skip
    if hasattr(compiled, "result"):
        compiled = compiled.result()
    compiled._init_handles()
    return compiled, consts


def _run(config, q8, k8, v8, params, bias, out_dtype, backend):
    if backend == "reference":
        return reference.reference_int8(q8, k8, v8, params, config, bias=bias, out_dtype=out_dtype)
    if q8.device.type != "cuda" and not interpreter_active():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {q8.device}); set TRITON_INTERPRET=1 to run the "
            "kernel on CPU through Triton's interpreter, or use backend='reference'"
        )
    with torch.cuda.device(q8.device) if q8.device.type == "cuda" else _nullctx():
        return launch(config, q8, k8, v8, params, bias=bias, out_dtype=out_dtype)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


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
    _check_backend(backend)
    _check_qkv(q8, k8, v8, (torch.int8,), "attention_int8")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype={out_dtype} is not supported; supported: {OUT_DTYPES}")
    if not isinstance(scales, (tuple, list)) or len(scales) != 3:
        raise ValueError("scales must be a tuple (sq, sk, sv) of floats or 0-d tensors")
    _check_mask(attn_mask, "attn_mask", q8.shape, q8.device)
    _check_mask(float_bias, "float_bias", q8.shape, q8.device)
    if float_bias is not None and float_bias.dtype == torch.bool:
        raise ValueError("float_bias must be floating; pass a bool mask as attn_mask")
    b, h, n, d = q8.shape
    if q8.numel() == 0:
        return torch.empty(q8.shape, dtype=out_dtype, device=q8.device)
    masked = attn_mask is not None or float_bias is not None
    cfg = _resolve_config(config, n, d, q=q8, masked=masked, out_dtype=out_dtype)
    params = quant.make_params(*scales, head_dim=d, scale=scale, device=q8.device)
    bias = quant.bias_to_int(attn_mask, params, float_bias=float_bias)
    return _run(cfg, q8, k8, v8, params, bias, out_dtype, backend)


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
    _check_backend(backend)
    _check_qkv(q, k, v, FLOAT_DTYPES, "attention")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or None, got {type(scale).__name__}")
    _check_mask(attn_mask, "attn_mask", q.shape, q.device)
    _check_mask(float_bias, "float_bias", q.shape, q.device)
    if float_bias is not None and float_bias.dtype == torch.bool:
        raise ValueError("float_bias must be floating; pass a bool mask as attn_mask")
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if check_finite:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf")
    n, d = q.shape[2], q.shape[3]
    masked = attn_mask is not None or float_bias is not None
    if backend == "triton" and quant_kernels.supported(q, k, v) and (q.is_cuda or interpreter_active()):
        # Fused: two launches quantize q, k, v and write the kernel constants (same bits as below).
        cfg = _resolve_config(config, n, d, q=q, masked=masked, out_dtype=q.dtype)
        (q8, k8, v8), _, params = quant_kernels.quantize_qkv(q, k, v, d, scale)
        bias = quant.bias_to_int(attn_mask, params, float_bias=float_bias)
        return _run(cfg, q8, k8, v8, params, bias, q.dtype, backend)
    sq, sk, sv = (quant.dynamic_scale(t) for t in (q, k, v))
    q8, k8, v8 = quant.quantize(q, sq), quant.quantize(k, sk), quant.quantize(v, sv)
    return attention_int8(
        q8, k8, v8, (sq, sk, sv), attn_mask, scale,
        float_bias=float_bias, out_dtype=q.dtype, backend=backend,
        config=_resolve_config(config, n, d, q=q, masked=masked, out_dtype=q.dtype),
    )  # fmt: skip
