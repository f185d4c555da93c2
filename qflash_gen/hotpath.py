"""The eager hot path of ``qflash_gen.attention``: a repeated call replayed from its plan.

A patched model calls attention with the same shapes, strides, dtypes and options at every layer
of every forward.  Everything such a call's two launches need apart from its data pointers (the
checks, the tuning DB's pick, the quantizer's kernel and grid, the packed arguments of both
kernels, both CompiledKernels) is a function of that *signature*.  The first checked call of a
signature records a :class:`Plan` (built on placeholder buffers of the same layout: the kernels'
specialization depends on dtypes and 16-byte alignment only); a repeated call allocates one int8
workspace (q8, k8, the key-major v8, the dynamic scale table) and its output, puts the pointers into the recorded argument
lists and calls the two CompiledKernels' launchers (as ``fastlaunch.run`` and
``launch.launch_fast`` do).  Same kernels, same arguments: the same bits as the checked path.

Why: on the device machine's H200 VM one checked call cost 128 µs of host time at ViT-B b=1
(``tools/profile_call.py``; SDPA: 17 µs), so an eager model at batch 1 waited on Python
(docs/perf-notes.md, tenth session).

Taken only where the recorded path is exactly what the checked path would run: CUDA with the
Triton of ``fastlaunch``, no ``out``, no ``check_finite``, q, k, v with unit channel stride, a
float32 additive bias or none; dynamic scales (``api.attention``) or a static scale table
(``ops.attention_static_impl``, the calibrated modules).  A tuning DB write (``db.generation()``)
or ``kernel.clear_cache()`` drops every plan.  Anything else takes the checked path.
"""

from __future__ import annotations

import threading

import torch
from triton import knobs as _knobs
from triton.runtime import driver as _driver

from qflash_gen import codegen, fastlaunch, launch, quant, quant_kernels
from qflash_gen import db as tuning_db

_ALIGN = 128  # workspace offsets (bytes): every int8 buffer and the table 16-byte aligned, as torch's
_MAX_PLANS = 256
_plans: dict = {}
_generation = [tuning_db.generation()]
_lock = threading.Lock()
_F32 = torch.float32


def signature(q, k, v, bias, scale, mode, config) -> tuple | None:
    """What a call's plan depends on, or None where the hot path does not apply.  ``bias``: the
    kernel's additive bias (float32) or None; ``mode``: ``("dynamic", smooth_k)`` or
    ``("static", table)``.  The 16-byte alignment of every pointer is in it (Triton specializes
    on it)."""
    if not (q.is_cuda and fastlaunch.FAST_TRITON) or q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        return None
    if bias is None:
        mask = None
    elif bias.dtype is _F32:
        mask = (bias.shape, bias.stride(), bias.device, bias.data_ptr() & 15)
    else:
        return None
    kind, arg = mode
    if kind == "static":  # the table's layout (its values are read by the kernels at each call)
        arg = (arg.shape, arg.stride(), arg.dtype, arg.device, arg.data_ptr() & 15)
    return (
        q.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
        (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15, mask, scale, kind, arg, config,
    )  # fmt: skip


_Q, _K, _V, _BIAS, _OUT, _TABLE = range(6)  # slots filled from the call; negative: -1 - workspace offset


class Plan:
    """One signature's launches (quantizer and attention, or the attention alone): per kernel the
    CompiledKernel, its grid and its argument list with *slots* where each call's pointers go (q,
    k, v, the bias, the output, the static table, or a byte offset into the workspace)."""

    def __init__(self, workspace: int, out_shape: tuple, out_dtype: torch.dtype, launches: list):
        self.workspace, self.out_shape, self.out_dtype, self.launches = workspace, out_shape, out_dtype, launches

    def __call__(self, q, k, v, bias, table=None) -> torch.Tensor:
        dev = q.device
        # ws stays referenced until every launch is queued: freed earlier, the allocator could
        # hand its bytes to buf (a first version did: wrong outputs at b=64)
        ws = torch.empty(self.workspace, dtype=torch.int8, device=dev)
        at = ws.data_ptr()
        buf = torch.empty(self.out_shape, dtype=self.out_dtype, device=dev)
        given, hooks = (q, k, v, bias, buf, table), _knobs.runtime
        stream = _driver.active.get_current_stream(dev.index)
        for compiled, grid, template, slots in self.launches:
            args = list(template)  # the template stays untouched (calls from several threads)
            for i, s in slots:
                args[i] = given[s] if s >= 0 else at - 1 - s
            meta = compiled.launch_metadata(grid, stream, *args)
            compiled.run(
                grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, meta,
                hooks.launch_enter_hook, hooks.launch_exit_hook, *args,
            )  # fmt: skip
        del ws  # queued: the allocator reuses it in stream order
        return buf.permute(0, 2, 1, 3)


def clear() -> None:
    """Forget every plan (``kernel.clear_cache`` calls this: the DB's picks may have changed)."""
    with _lock:
        _plans.clear()


def lookup(sig: tuple) -> Plan | None:
    """The plan recorded for ``sig`` (None: none yet, or the tuning DB changed since)."""
    gen = tuning_db.generation()
    if gen != _generation[0]:
        with _lock:
            _plans.clear()
            _generation[0] = gen
        return None
    return _plans.get(sig)


def record(sig, config, q, k, v, bias, out_dtype, *, smooth=True, scale=None, params=None) -> None:
    """Record the plan of a checked call that just ran (so its kernels are compiled and cached):
    ``config`` on q, k, v with ``bias`` (float32 or None); dynamic scales (``params`` None: k
    smoothed per ``smooth``, softmax scale ``scale``) or the static ``params`` of
    ``ops.attention_static_impl``.  Nothing is recorded where a tensor argument of a launch is
    not one of the call's (or the constant exp table), or a kernel is not in the fast launch's
    cache."""
    b, h, n, d = q.shape
    dev = q.device
    if len({id(q), id(k), id(v)}) < 3:  # one tensor in two roles: the slots would be ambiguous
        return
    out = torch.empty((b, n, h, d), dtype=out_dtype, device=dev).permute(0, 2, 1, 3)
    fixed = {id(q): _Q, id(k): _K, id(v): _V, id(out): _OUT}
    if bias is not None:
        fixed[id(bias)] = _BIAS
    if params is not None:
        fixed[id(params.scales)] = _TABLE
    lut = launch.lut_table(config.lut_bits, dev) if config.exp_variant == "lut" else None
    module, launches, size = codegen.load(config), [], 0
    fused = params is not None and n <= config.block_m  # launch_static's in-load quantization
    if not fused:
        q8 = torch.empty((b, h, n, d), dtype=torch.int8, device=dev)
        k8 = torch.empty_like(q8)
        v8 = quant_kernels.key_major_int8(q.shape, dev)
        parts = [q8, k8, v8]
        if params is None:
            params = quant.KernelParams(
                torch.empty((b, h, 4), dtype=_F32, device=dev), quant.softmax_constant(d, scale)
            )
            parts.append(params.scales)
        for t in parts:  # workspace offsets in this order, each _ALIGN-aligned
            storage = t.untyped_storage()
            fixed[id(t)] = -1 - (size + t.data_ptr() - storage.data_ptr())
            size += -(-storage.nbytes() // _ALIGN) * _ALIGN
        dynamic = len(parts) == 4
        fn, grid, args, kwargs = quant_kernels.quantizer_call(q, k, v, q8, k8, v8, params, dynamic, smooth)
        full, _, key = fastlaunch.bind(fn, args, kwargs)
        launches.append((fastlaunch.cached(fn, dev.index, key), tuple(grid) + (1,) * (3 - len(grid)), full))
    else:
        q8, k8, v8 = q, k, v
        if config.max_regs or config.heads_per_program > 1:
            config = config.render_part()  # as launch_static runs it: the same rendered module
    packed = launch.pack_args(config, q8, k8, v8, params, bias, out, out_dtype)
    compiled = module.__dict__.get("_qflash_fast", {}).get(launch.specialization_key(packed, config))
    launches.append((compiled, (*launch.grid(config, b, h, n), 1), packed))
    plan = []
    for compiled, grid, args in launches:
        slots = []
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor) or a is lut:
                continue
            if id(a) in fixed:
                slots.append((i, fixed[id(a)]))
            elif bias is not None and a.data_ptr() == bias.data_ptr() and a.dtype is _F32:  # bias_layout's view
                slots.append((i, _BIAS))
            else:
                return
        if compiled is None:
            return
        template = list(args)
        for i, _ in slots:
            template[i] = None  # the plan keeps no tensor of this call alive
        plan.append((compiled, grid, template, slots))
    with _lock:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        _plans[sig] = Plan(size, (b, n, h, d), out_dtype, plan)
