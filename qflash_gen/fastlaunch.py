"""Launching any ``@triton.jit`` function through its cached CompiledKernel (the CUDA hot path).

Triton's ``fn[grid](*args, **kwargs)`` binds the arguments, re-derives every argument's
specialization (pointer dtype and 16-byte alignment; ints equal to 1, divisible by 16, 32-bit or
not) and looks the compiled kernel up, on every call: 70-87 µs of host time a call on the H200 VM
of the device machine (docs/perf-notes.md, ninth session), longer than most of the kernels a
patched model runs at batch 1.  :func:`run` reads the same facts off the arguments into a key and
calls the CompiledKernel Triton picked for the first call with that key through its own launcher,
as Triton does after its lookup.  The key is at least as fine as Triton's specialization (the
constexpr values and the launch options are in it), so the cached kernel is the one Triton would
pick.

``launch.launch_fast`` does the same for the attention kernel with a key built from its known
signature (:mod:`qflash_gen.codegen.signature`); this module serves the kernels without one (the
quantizer, :mod:`qflash_gen.quant_kernels`).  Other Triton releases (whose internals differ), the
interpreter and CPU tensors take the normal launch.
"""

from __future__ import annotations

import inspect

import torch
import triton
from triton import knobs as _knobs
from triton.runtime import driver as _driver

FAST_TRITON = triton.__version__.startswith("3.6.")  # the release whose launch internals run() calls
OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg"})  # compile options, not arguments
_I32 = 2**31
_CACHE: dict = {}  # (fn, device index, key) -> CompiledKernel


def enabled(device: torch.device) -> bool:
    """Whether :func:`run` takes the cached-kernel path for tensors on ``device``."""
    return FAST_TRITON and device.type == "cuda"


def _signature(fn) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """``fn``'s parameter names and which of them are constexprs (read once per function)."""
    sig = fn.__dict__.get("_qflash_sig")
    if sig is None:
        if hasattr(fn, "params"):  # a JITFunction
            sig = (tuple(p.name for p in fn.params), tuple(p.is_constexpr for p in fn.params))
        else:  # the interpreter's InterpretedFunction: the annotations of the Python function
            ps = inspect.signature(fn.fn).parameters.values()
            sig = (tuple(p.name for p in ps), tuple("constexpr" in str(p.annotation) for p in ps))
        fn._qflash_sig = sig
    return sig


def _spec(value, constexpr: bool):
    """What Triton's specialization of one argument depends on."""
    if constexpr or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() & 15 == 0
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return value == 1, value & 15 == 0, -_I32 <= value < _I32
    if isinstance(value, float):
        return "fp32"
    return type(value), value


def bind(fn, args: tuple, kwargs: dict) -> tuple[tuple, dict, tuple]:
    """(every argument in ``fn``'s parameter order, the launch options, the specialization key)."""
    names, const = _signature(fn)
    options = {k: v for k, v in kwargs.items() if k in OPTIONS}
    full = args + tuple(kwargs[name] for name in names[len(args) :])
    key = tuple(_spec(v, c) for v, c in zip(full, const, strict=True)) + tuple(sorted(options.items()))
    return full, options, key


def cached(fn, device_index: int, key: tuple):
    """The CompiledKernel :func:`run` cached for ``fn`` on a device under ``key`` (:func:`bind`'s
    third item), or None."""
    return _CACHE.get((fn, device_index, key))


def run(fn, grid: tuple, *args, **kwargs) -> None:
    """``fn[grid](*args, **kwargs)``; on CUDA with Triton 3.6 through the cached CompiledKernel of
    this call's specialization (its first call takes the normal launch, which compiles, and caches
    what Triton picked).  ``kwargs``: the remaining parameters by name (every one: defaults are not
    filled in) and the compile options (``num_warps``, ``maxnreg``, ...).  The first tensor
    argument names the device; the current stream is used, so a CUDA-graph capture records it."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    if not enabled(device):
        fn[grid](*args, **kwargs)
        return
    full, options, key = bind(fn, args, kwargs)
    slot = (fn, device.index, key)
    compiled = _CACHE.get(slot)
    g = tuple(grid) + (1,) * (3 - len(grid))
    if compiled is None:
        fn[grid](*args, **kwargs)  # compiles if needed
        compiled = fn.warmup(*args, grid=grid, **kwargs)  # looks up what that launch ran
        if hasattr(compiled, "result"):
            compiled = compiled.result()
        compiled._init_handles()
        _CACHE[slot] = compiled
        return
    stream = _driver.active.get_current_stream(device.index)
    meta = compiled.launch_metadata(g, stream, *full)
    hooks = _knobs.runtime
    compiled.run(
        g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, meta,
        hooks.launch_enter_hook, hooks.launch_exit_hook, *full,
    )  # fmt: skip
