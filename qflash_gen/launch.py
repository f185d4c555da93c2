"""Launching the rendered kernel: the argument tuple, the grid, and the three paths to Triton.

* :func:`launch_module` -- Triton's normal launch, ``module._qflash_fwd[grid](*args, **options)``
  with the arguments packed by :mod:`qflash_gen.codegen.signature` (any strides, a bias);
* :func:`launch_fast` -- CUDA: the CompiledKernel that Triton picked on the first call of a
  specialization is cached and called directly (measured 24 µs less host time per call on an
  H100 VM);
* :func:`launcher` -- one call bound once, for timing loops (the fast launch's lookups done once);
* :func:`launch_static` -- float q, k, v at static scales (quantized in the kernel's loads, or by
  ``quant_kernels.quantize_heads`` first).

No checks, no host sync: the callers (``qflash_gen.api``, ``Kernel.__call__``, the ops) check.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
from triton import knobs as _knobs
from triton.runtime import driver as _driver

from qflash_gen import codegen, fastlaunch, quant, quant_kernels, reference
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


def bias_layout(bias: torch.Tensor | None, b: int, h: int, n: int) -> tuple[torch.Tensor | None, tuple, int]:
    """The bias argument of a launch over (b, h): ``(tensor, strides, zmod)``.  ``bias`` is the
    float32 additive bias (``quant.additive_bias``), (Z, H|1, N, N) with Z = 1, b, or a divisor of
    b (batch z reads row z % Z: Swin's windows, z = image * Z + window), or of lower rank;
    size-1 axes get stride 0."""
    if bias is None:
        return None, NO_STRIDES, 1
    if bias.dtype != torch.float32:
        bias = bias.to(torch.float32)
    if bias.dim() < 4:
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    z = bias.shape[0]
    bias = bias.expand(z, h, n, n)
    strides = tuple(0 if bias.shape[i] == 1 else bias.stride(i) for i in range(4))
    return bias, strides, max(z, 1)


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
    inputs are quantized on load at the static scales of ``params`` (see ``launch_static``)."""
    return launch_module(codegen.load(config), config, q8, k8, v8, params, bias, out, out_dtype)


def pack_args(config, q8, k8, v8, params, bias, out, out_dtype) -> tuple:
    """The positional arguments of one launch (``signature.pack`` of this call's facts)."""
    b, h, n, d = q8.shape
    bias_arg, bias_strides, zmod = bias_layout(bias, b, h, n)
    table = params.scales
    return signature.pack(
        q8, k8, v8, out, table if bias_arg is None else bias_arg, params, params.strides(), zmod,
        lut_arg(config, q8.device, table), q8.stride(), k8.stride(), v8.stride(), out.stride(), bias_strides,
        h, n, d, bias is not None, out_dtype is not _INT8, v_keys(v8), config.tail_rows(n), config.heads_for(b * h),
    )  # fmt: skip


def grid(config: KernelConfig, b: int, h: int, n: int) -> tuple[int, int]:
    """(query blocks, head groups): programs of ``config`` for a (b, h, n) launch."""
    bm = config.block_m
    return ((n + bm - 1) // bm, b * h // config.heads_for(b * h))


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
    """``launch`` with the rendered module already loaded (``codegen.load(config)``): Triton's
    normal launch, any strides, a bias.  ``out`` may have any strides (e.g. a (B, N, H, D) buffer
    viewed as (B, H, N, D)); a new contiguous one is made when None."""
    b, h, n, d = q8.shape
    if out is None:
        out = torch.empty((b, h, n, d), dtype=out_dtype, device=q8.device)
    if n == 0 or b * h == 0:
        return out
    args = pack_args(config, q8, k8, v8, params, bias, out, out_dtype)
    module._qflash_fwd[grid(config, b, h, n)](*args, **signature.launch_options(config))
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
    """Float q, k, v (any strides) at the static scales of ``params``.  Where one query block
    covers N (Swin's windows), the kernel quantizes them as it loads them (one launch; each K, V
    quantized once).  Otherwise (ViT: several query blocks would each quantize the head's K and V
    again, 2.8x slower at ViT-B b=64 on an H200) ``quant_kernels.quantize_heads`` quantizes them
    first (static mode) and the int8 kernel runs: two launches.  Same bits either way
    (``quant.quantize`` at each group's scales).  ``fast``: CUDA may take ``launch_fast``.  No
    checks, no sync.  In-load quantization runs without ``max_regs`` and ``heads_per_program``
    (tuned on int8 inputs; the quantization needs registers a cap would spill)."""
    run = launch_fast if fast else launch_module
    n = q.shape[2]
    if n > config.block_m:
        q8, k8, v8, _ = quant_kernels.quantize_heads(q, k, v, params=params)
        return run(module, config, q8, k8, v8, params, bias, out, out_dtype)
    if config.max_regs or config.heads_per_program > 1:
        config = config.render_part()  # the same rendered module: both are launch fields
    return run(module, config, q, k, v, params, bias, out, out_dtype)


# -- direct launch of the compiled kernel (the CUDA hot path) ---------------------------------------
# Triton's `fn[grid](...)` re-derives, on every call, the specialization of every argument (pointer
# alignment, ints equal to 1 or divisible by 16, int widths) to find the compiled kernel.  Here the
# same facts are read off the packed arguments into a key; the CompiledKernel Triton picked for the
# first call with that key is cached and launched through its own launcher, as Triton does after its
# lookup.  The key is at least as fine as Triton's specialization, so a cached kernel is always the
# one Triton would pick.  Other Triton releases (whose internals differ) and the interpreter take
# the normal launch.
FAST_TRITON = fastlaunch.FAST_TRITON
_KINDS = tuple(p.kind for p in signature.PARAMS)
_PTR_AT = tuple(i for i, k in enumerate(_KINDS) if k == signature.POINTER)
_INT_AT = tuple(i for i, k in enumerate(_KINDS) if k == signature.INT)
_CONST_AT = tuple(i for i, k in enumerate(_KINDS) if k == signature.CONSTEXPR)
_I32 = 2**31


def specialization_key(args: tuple, config: KernelConfig) -> tuple:
    """What Triton's specialization of ``args`` depends on (dtypes and 16-byte alignment of the
    pointers; for ints: == 1, divisible by 16, 32-bit or not; the constexprs), and the register cap."""
    return (
        tuple(args[i].dtype for i in _PTR_AT),
        tuple(args[i].data_ptr() & 15 == 0 for i in _PTR_AT),
        tuple((v == 1, v & 15 == 0, -_I32 <= v < _I32) for v in (args[i] for i in _INT_AT)),
        tuple(args[i] for i in _CONST_AT),
        config.max_regs,
    )


def launch_fast(module, config, q8, k8, v8, params, bias, out, out_dtype) -> torch.Tensor:
    """``launch_module`` for CUDA tensors through the cached CompiledKernel (any strides, a bias);
    the first call of a specialization takes the normal launch and caches what Triton compiled."""
    b, h, n, d = q8.shape
    if out is None:
        out = torch.empty((b, h, n, d), dtype=out_dtype, device=q8.device)
    if not FAST_TRITON or q8.device.type != "cuda":
        return launch_module(module, config, q8, k8, v8, params, bias, out, out_dtype)
    if n == 0 or b * h == 0:
        return out
    args = pack_args(config, q8, k8, v8, params, bias, out, out_dtype)
    key = specialization_key(args, config)
    cache = module.__dict__.setdefault("_qflash_fast", {})
    compiled = cache.get(key)
    g0, g1 = grid(config, b, h, n)
    if compiled is None:
        module._qflash_fwd[(g0, g1)](*args, **signature.launch_options(config))  # compiles if needed
        cache[key] = compiled_for(module, config, args)
        return out
    stream = _driver.active.get_current_stream(q8.device.index)
    meta = compiled.launch_metadata((g0, g1, 1), stream, *args)
    compiled.run(
        g0, g1, 1, stream, compiled.function, compiled.packed_metadata, meta,
        _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook, *args,
    )  # fmt: skip
    return out


def launcher(module, config, q8, k8, v8, params, bias, out, out_dtype):
    """A call with no arguments that launches this exact kernel call again, everything looked up
    once (timing loops: the tuner's timed worker).  On CUDA with the Triton of ``launch_fast`` it
    calls the cached CompiledKernel's launcher with the packed arguments (the stream is read at
    each call, so a CUDA-graph capture on a side stream records it); elsewhere it is
    ``launch_module`` with these arguments.  The first call of a specialization compiles here.

    Why (issue 17): the normal launch spends 70-87 µs of host time per call on an H200 VM, longer
    than ``triton.testing.do_bench``'s L2 flush, so a kernel shorter than ~20 µs was timed as the
    host (57-71 µs, spreads 16-41 µs; bound: 6-13 µs, spreads under 1 µs)."""
    b, h, n, d = q8.shape
    args_all = (module, config, q8, k8, v8, params, bias, out, out_dtype)
    if not FAST_TRITON or q8.device.type != "cuda" or n == 0 or b * h == 0:
        return functools.partial(launch_module, *args_all)
    launch_fast(*args_all)  # caches the CompiledKernel of this specialization
    args = pack_args(config, q8, k8, v8, params, bias, out, out_dtype)
    compiled = module._qflash_fast[specialization_key(args, config)]
    g0, g1 = grid(config, b, h, n)
    run, function, packed = compiled.run, compiled.function, compiled.packed_metadata
    index, get_stream, hooks = q8.device.index, _driver.active.get_current_stream, _knobs.runtime

    def go() -> None:
        stream = get_stream(index)
        meta = compiled.launch_metadata((g0, g1, 1), stream, *args)
        run(g0, g1, 1, stream, function, packed, meta, hooks.launch_enter_hook, hooks.launch_exit_hook, *args)

    return go


def compiled_for(module, config, args):
    """The CompiledKernel Triton picks for ``args`` (warmup: looks up, launches nothing)."""
    compiled = module._qflash_fwd.warmup(*args, grid=(1,), **signature.launch_options(config))
    if hasattr(compiled, "result"):
        compiled = compiled.result()
    compiled._init_handles()
    return compiled
