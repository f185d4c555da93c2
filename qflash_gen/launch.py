"""Launching the rendered kernel: the argument tuple, the grid, and the three paths to Triton.

* :func:`launch_module` -- Triton's normal launch, ``module._qflash_fwd[grid](*args, **options)``
  with the arguments packed by :mod:`qflash_gen.codegen.signature` (any strides, a bias);
* :func:`launch_fast` -- CUDA without a bias: the CompiledKernel that Triton picked on the first
  call is cached and called directly (measured 24 µs less host time per call on an H100 VM);
* :func:`launch_static` -- float q, k, v at static scales, quantized inside the kernel's loads.

No checks, no host sync: the callers (``qflash_gen.api``, ``Kernel.__call__``, the ops) check.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import triton
from triton import knobs as _knobs
from triton.runtime import driver as _driver

from qflash_gen import codegen, quant, reference
from qflash_gen.codegen import signature
from qflash_gen.config import KernelConfig

NO_STRIDES = (0, 0, 0, 0)
_INT8 = torch.int8


@functools.cache
def lut_table(lut_bits: int, device: torch.device) -> torch.Tensor:
    """The exp table of ``exp_variant="lut"`` on ``device`` (built once per device)."""
    return reference.lut_table(lut_bits, device)


def lut_arg(config: KernelConfig, device: torch.device, placeholder: torch.Tensor) -> torch.Tensor:
    """The LUT argument of a launch: the table for ``lut`` configs, else ``placeholder`` (never read)."""
    return lut_table(config.lut_bits, device) if config.exp_variant == "lut" else placeholder


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
        bias_arg, bias_strides = ints, NO_STRIDES
    else:
        bias_arg = bias.expand(b, h, n, n)
        bias_strides = bias_arg.stride()
    hpp = config.heads_for(b * h)
    args = signature.pack(
        q8, k8, v8, out, bias_arg, params, lut_arg(config, q8.device, ints),
        q8.stride(), k8.stride(), v8.stride(), out.stride(), bias_strides,
        h, n, d, bias is not None, out_dtype is not _INT8, v_keys(v8), config.tail_rows(n), hpp,
    )  # fmt: skip
    bm = config.block_m
    module._qflash_fwd[((n + bm - 1) // bm, b * h // hpp)](*args, **signature.launch_options(config))
    return out


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
        config = config.render_part()  # the same rendered module: both are launch fields
    if fast and bias is None:
        return launch_fast(module, config, q, k, v, params, out, out_dtype)
    return launch_module(module, config, q, k, v, params, bias, out, out_dtype)


# -- direct launch of the compiled kernel (CUDA hot path of kernel.Kernel) ---------------------------
# Triton's `fn[grid](...)` re-derives, on every call, the specialization of every argument (pointer
# alignment, ints equal to 1 or divisible by 16) to find the compiled kernel.  For contiguous inputs
# of one Kernel (fixed N and D) every stride follows from H, so the specialization is fixed by
# (H, dtypes, the register cap, the pointers' 16-byte alignment): the compiled kernel is cached under
# that key and launched through its own launcher, as Triton does after its lookup.  Anything else
# (bias, strided tensors, the interpreter, another Triton release) takes the normal launch.
FAST_TRITON = triton.__version__.startswith("3.6.")


def launch_fast(module, config, q8, k8, v8, params, out, out_dtype) -> torch.Tensor:
    """``launch_module`` without bias for CUDA tensors; falls back to it where the key can't cover.
    q8, k8, v8 are int8, or float (quantized on load at the scales in ``params.floats``)."""
    b, h, n, d = q8.shape
    if out is None:
        out = torch.empty((b, h, n, d), dtype=out_dtype, device=q8.device)
    if not (FAST_TRITON and q8.is_contiguous() and k8.is_contiguous() and out.is_contiguous()):
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
    # max_regs: configs that differ in it share the module (a launch field), not the binary
    key = (n, d, h, hpp, vk, config.max_regs, q8.dtype, out_dtype, tuple(p & 15 == 0 for p in ptrs))
    cache = module.__dict__.setdefault("_qflash_fast", {})
    compiled = cache.get(key)
    if compiled is None:
        launch_module(module, config, q8, k8, v8, params, None, out, out_dtype)  # compiles if needed
        cache[key] = compiled_for(module, config, q8, k8, v8, params, out, out_dtype, v_strides, vk)
        return out
    s_b, s_h = h * n * d, n * d  # the strides of contiguous (B, H, N, D) tensors
    args = signature.pack(
        q8, k8, v8, out, ints, params, lut_arg(config, q8.device, ints),
        (s_b, s_h, d, 1), (s_b, s_h, d, 1), v_strides, (s_b, s_h, d, 1), NO_STRIDES,
        h, n, d, False, out_dtype is not _INT8, vk, config.tail_rows(n), hpp,
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


def compiled_for(module, config, q8, k8, v8, params, out, out_dtype, v_strides, vk):
    """The CompiledKernel Triton picked for these arguments (warmup: looks up, launches nothing)."""
    b, h, n, d = q8.shape
    ints = params.ints
    s_b, s_h = h * n * d, n * d  # the strides launch_fast passes (the same as any contiguous tensor's
    qkv = (s_b, s_h, d, 1)  # except on size-1 dims, where no index ever multiplies them)
    args = signature.pack(
        q8, k8, v8, out, ints, params, lut_arg(config, q8.device, ints), qkv, qkv, v_strides, qkv, NO_STRIDES,
        h, n, d, False, out_dtype is not _INT8, vk, config.tail_rows(n), config.heads_for(b * h),
    )  # fmt: skip
    compiled = module._qflash_fwd.warmup(*args, grid=(1,), **signature.launch_options(config))
    if hasattr(compiled, "result"):
        compiled = compiled.result()
    compiled._init_handles()
    return compiled
