"""``get_kernel(shape)``: the tuned kernel for a workload on a GPU, and a lean call path.

Lookup ladder (``Kernel.why`` says which step answered):

1. ``"exact"``: the DB holds this GPU's entry for the workload key.
2. ``"nearest:<key>"``: an entry on this GPU with the same N, D, masking and dtypes, from the
   nearest B*H bucket (``keys.nearest_key``), whose config passes ``check_workload(N, D)``.
3. ``"sibling:<gpu>:exact"`` / ``"sibling:<gpu>:nearest:<key>"``: steps 1 and 2 in the DB of
   another known GPU of the same compute capability (``gpu.KNOWN_GPUS`` order; an H200 whose
   own file is stale or empty takes the H100's tuned configs).  Tuned configs compile and give
   the same bits on any GPU of the architecture; only their speed was measured elsewhere.
   MIG slices and unknown names have no siblings.
4. Steps 1 to 3 over the entries measured with another Triton major.minor of this template,
   then over those of another template whose config maps onto this ``KernelConfig`` (fields
   it knows, values it accepts, ``check_workload`` passed: ``db.parse``); ``why`` ends with
   what differs, e.g. ``"exact:triton-3.6"`` or ``"sibling:h100:exact:template-8da88910"``.  The
   kernel's bits do not depend on either (oracle equality is a property of the template and
   the config); only the speed ranking may have moved.
5. ``"default"``: ``config.default_config(N, D)``, the verified safe default (also on machines
   without CUDA when no ``gpu=`` is named: ``Kernel.gpu == "cpu"``).

It never tunes.  A fallback (2 to 5) is logged once per (GPU, key) on logger
``qflash_gen.kernel``.  Kernels are cached in-process per (DB, GPU, key); a write to the DB from
this process drops the cache (``db.generation()``), writes from other processes are seen after
``clear_cache()`` or a restart.

The call path (``Kernel.__call__``) does no host sync and no DB work: the rendered module, the
N/D it is valid for and (for Python-float scales) the integer kernel constants are prepared once,
so a call is a few attribute checks plus the Triton launch.  Warm a kernel up (one call) before
capturing it in a CUDA graph: the first call compiles, and float scales are turned into device
constants on first use.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from qflash_gen import checks, codegen, hotpath, launch, quant
from qflash_gen import db as tuning_db
from qflash_gen.config import KernelConfig, default_config, fits
from qflash_gen.gpu import KNOWN_GPUS, check_gpu_name, current_gpu
from qflash_gen.keys import WorkloadKey, nearest_key, workload_key

logger = logging.getLogger("qflash_gen.kernel")

CPU = "cpu"
"""Pseudo-GPU of a machine without CUDA: no DB, the safe default (the kernel runs there only
through ``TRITON_INTERPRET=1``)."""

_INT8 = torch.int8


@functools.lru_cache(maxsize=1)
def _multi_gpu() -> bool:
    """More than one visible CUDA device: only then can a tensor sit on a non-current device
    (torch.cuda.current_device() costs about a microsecond per call on the hot path)."""
    return torch.cuda.device_count() > 1


_OUT_DTYPES = frozenset(checks.OUT_DTYPES)
_FLOAT_IN = frozenset(checks.FLOAT_DTYPES)
_PARAMS_CACHE_MAX = 16  # distinct float-scale triples remembered per kernel


class Kernel:
    """The kernel chosen for one workload key on one GPU.

    Attributes:
        config: the KernelConfig it runs.
        key: the WorkloadKey it was looked up for (N and D of every call must match it).
        gpu: short name of the GPU it was looked up for (``"cpu"``: no DB); a sibling's
            entry (``why`` ``"sibling:..."``) came from that card's file, named by ``origin``.
        why: ``"exact"``, ``"nearest:<key>"``, ``"sibling:<gpu>:..."``, any of those ending in
            ``":triton-X.Y"`` / ``":template-<hash8>"`` (an entry of another Triton or
            template), or ``"default"``.
        entry: the DB entry behind ``config`` (None for ``"default"``); ``origin`` its file.
        source: the rendered Triton source (``codegen.render(config)``).
    """

    __slots__ = ("config", "key", "gpu", "why", "entry", "origin", "_n", "_d", "_module", "_params", "__dict__")

    def __init__(
        self,
        config: KernelConfig,
        key: WorkloadKey,
        gpu: str,
        why: str,
        entry: tuning_db.Entry | None = None,
        origin: Path | None = None,
    ) -> None:
        self.config = config
        self.key = key
        self.gpu = gpu
        self.why = why
        self.entry = entry
        self.origin = origin
        self._n = key.n
        self._d = key.d
        self._module: ModuleType | None = None
        self._params: dict[tuple, quant.KernelParams] = {}

    def __repr__(self) -> str:
        return f"Kernel(gpu={self.gpu!r}, key={self.key.to_str()!r}, why={self.why!r}, config={self.config.short()!r})"

    @functools.cached_property
    def source(self) -> str:
        return codegen.render(self.config)

    @property
    def module(self) -> ModuleType:
        """The imported rendered module (rendered, written and imported on first use)."""
        if self._module is None:
            self._module = codegen.load(self.config)
        return self._module

    # -- call path ------------------------------------------------------------------------------
    def __call__(
        self,
        q8: torch.Tensor,
        k8: torch.Tensor,
        v8: torch.Tensor,
        scales: tuple,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
        *,
        float_bias: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention on int8 (B, H, N, D) tensors with scales ``(sq, sk, sv)``, or on
        float16/bfloat16/float32 tensors with static (calibrated) scales ``(sq, sk, sv)``.

        Same meaning as ``qflash_gen.attention_int8`` (scales: Python floats, float tensors
        broadcastable to (B, H) (per tensor, per head, per (batch, head)), or a
        ``quant.KernelParams``; ``scale``: softmax scale, default 1/sqrt(D);
        ``attn_mask``/``float_bias``: SDPA-style bias), with this kernel's config.  N and D must be
        the key's; any B and H work.  ``out`` (optional, any strides) receives the result, e.g. a
        static buffer for CUDA-graph capture.  Python-float scales are checked and their table is
        cached; device tensors are used as they are (no host sync either way).  ``out_dtype``
        defaults to int8 for int8 inputs and to the input dtype for float inputs.

        Float inputs are quantized at the given scales exactly as ``quant.quantize`` does (the
        oracle is ``quant.quantize_groups`` of each, then this call on int8): inside the kernel's
        loads where one query block covers N, else by the one-launch quantizer first
        (``launch.launch_static``).
        """
        try:
            shape = q8.shape
            device = q8.device
            in_dtype = q8.dtype
            fast = (
                (in_dtype is _INT8 or in_dtype in _FLOAT_IN)
                and k8.dtype is in_dtype
                and v8.dtype is in_dtype
                and len(shape) == 4
                and shape[2] == self._n
                and shape[3] == self._d
                and k8.shape == shape
                and v8.shape == shape
                and k8.device == device
                and v8.device == device
            )
        except AttributeError:
            fast = False
        if not fast:
            self._explain_bad_input(q8, k8, v8)
        if device.type != "cuda" and not checks.interpreter_active():
            raise ValueError(
                f"q8 is on {device}: the kernel needs CUDA tensors, or TRITON_INTERPRET=1 to run on CPU "
                f"through Triton's interpreter (this kernel was looked up for gpu={self.gpu!r})"
            )
        if out_dtype is None:
            out_dtype = in_dtype
        if out_dtype not in _OUT_DTYPES:
            raise ValueError(f"out_dtype={out_dtype} is not supported; supported: {checks.OUT_DTYPES}")
        if out is not None:
            self._check_out(out, shape, out_dtype, device)
        params = self.params_for(scales, scale, device, (shape[0], shape[1]))
        bias = None
        if attn_mask is not None or float_bias is not None:
            checks.check_float_bias(attn_mask, float_bias, shape, device)
            bias = quant.additive_bias(attn_mask, float_bias)
        module = self._module if self._module is not None else self.module
        on_other_gpu = _multi_gpu() and device.type == "cuda" and device.index != torch.cuda.current_device()
        with torch.cuda.device(device) if on_other_gpu else contextlib.nullcontext():
            if in_dtype is not _INT8:
                return launch.launch_static(module, self.config, q8, k8, v8, params, bias, out, out_dtype, fast=True)
            return launch.launch_fast(module, self.config, q8, k8, v8, params, bias, out, out_dtype)

    def params_for(
        self, scales, scale: float | None, device: torch.device, bh: tuple[int, int] = (1, 1)
    ) -> quant.KernelParams:
        """The scale table of ``scales`` (sq, sk, sv) and softmax ``scale`` on ``device``, checked
        to broadcast over ``bh`` = (B, H); cached per triple when the scales are Python floats
        (device-tensor scales are stacked on the device each call); a KernelParams as it is."""
        if type(scales) in (tuple, list) and len(scales) == 3:
            sq, sk, sv = scales
            if type(sq) is float and type(sk) is float and type(sv) is float:
                key = (sq, sk, sv, scale, device)
                params = self._params.get(key)
                if params is None:
                    params = quant.make_params(sq, sk, sv, head_dim=self._d, scale=scale, device=device)
                    if len(self._params) >= _PARAMS_CACHE_MAX:
                        self._params.clear()  # scales that change every call: cheap, and race-free
                    self._params[key] = params
                return params
        return quant.params_of(scales, self._d, scale, device, bh)

    def _check_out(self, out: torch.Tensor, shape: torch.Size, out_dtype: torch.dtype, device: torch.device) -> None:
        if not isinstance(out, torch.Tensor) or out.shape != shape or out.dtype != out_dtype or out.device != device:
            got = (tuple(out.shape), out.dtype, out.device) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"out must be a {tuple(shape)} {out_dtype} tensor on {device}, got {got}")

    def _explain_bad_input(self, q8, k8, v8) -> None:
        """Slow path: the same checks as attention_int8 (clear messages), then the key's N and D."""
        checks.check_qkv(q8, k8, v8, (torch.int8, *checks.FLOAT_DTYPES), "a Kernel call")
        if not (q8.dtype == k8.dtype == v8.dtype):
            raise ValueError(f"q, k, v must share one dtype; got {q8.dtype}, {k8.dtype}, {v8.dtype}")
        n, d = q8.shape[2], q8.shape[3]
        raise ValueError(
            f"q8 has N={n}, D={d} but this kernel is for N={self._n}, D={self._d} ({self.key.to_str()}): "
            f"its config was chosen and overflow-checked for that N and D; get_kernel(q8.shape) for this one"
        )


# -- lookup ----------------------------------------------------------------------------------------
_kernels: dict[tuple, Kernel] = {}
_by_call: dict[tuple, KernelConfig] = {}
_by_args: dict[tuple, Kernel] = {}
_logged: set[tuple[str, str, str]] = set()
_lock = threading.RLock()
_cache_generation = -1
_BY_CALL_MAX = 4096
_FRONT_MAX = 4096


def clear_cache(*, log_again: bool = False) -> None:
    """Forget every Kernel built in this process (e.g. after another process wrote the DB);
    ``log_again``: also forget which fallbacks were logged, so each is logged once more."""
    hotpath.clear()
    with _lock:
        _kernels.clear()
        _by_call.clear()
        _by_args.clear()
        if log_again:
            _logged.clear()


def _check_generation() -> None:
    global _cache_generation
    gen = tuning_db.generation()
    if gen != _cache_generation:
        with _lock:
            _kernels.clear()
            _by_call.clear()
            _by_args.clear()
            _cache_generation = gen


def siblings(gpu: str, database: tuning_db.TuningDB) -> list[str]:
    """Other known GPUs of ``gpu``'s compute capability that have a DB file, in ``KNOWN_GPUS``
    order (none for a name outside it: MIG slices, unknown cards)."""
    spec = KNOWN_GPUS.get(gpu)
    if spec is None:
        return []
    have = set(database.gpus())
    return [g for g, s in KNOWN_GPUS.items() if g != gpu and s.cc == spec.cc and g in have]


def _from_db(
    database: tuning_db.TuningDB, source: str, gpu: str, key: WorkloadKey, why_prefix: str = "", tier: str = tuning_db.FRESH
) -> Kernel | None:
    """The exact or nearest-bucket entry of ``tier`` for ``key`` in ``source``'s DB that fits N
    and D, as the Kernel run on ``gpu``; None when there is none."""
    located = database.located(source, tier)

    def why(step: str, entry: tuning_db.Entry) -> str:
        label = tuning_db.software_label(entry.software) if tier != tuning_db.FRESH else ""
        return f"{why_prefix}{step}" + (f":{label}" if label else "")

    hit = located.get(key)
    if hit is not None and fits(hit[0].config, key.n, key.d):
        return Kernel(hit[0].config, key, gpu, why("exact", hit[0]), hit[0], hit[1])
    usable = {k: v for k, v in located.items() if fits(v[0].config, key.n, key.d)}
    near = nearest_key(key, usable)
    if near is None:
        return None
    entry, origin = usable[near]
    return Kernel(entry.config, key, gpu, why(f"nearest:{near.to_str()}", entry), entry, origin)


def _climb(database: tuning_db.TuningDB, gpu: str, key: WorkloadKey) -> Kernel | None:
    """The ladder's DB steps (module doc): per tier, this GPU then its siblings."""
    others = siblings(gpu, database)
    for tier in tuning_db.TIERS:
        kern = _from_db(database, gpu, gpu, key, tier=tier)
        if kern is not None:
            return kern
        for other in others:
            kern = _from_db(database, other, gpu, key, why_prefix=f"sibling:{other}:", tier=tier)
            if kern is not None:
                return kern
    return None


def _choose(database: tuning_db.TuningDB, gpu: str, key: WorkloadKey) -> Kernel:
    default = default_config(key.n, key.d)
    if gpu == CPU:
        return Kernel(default, key, gpu, "default")
    kern = _climb(database, gpu, key)
    if kern is not None and kern.why == "exact":
        return kern  # the one answer that is not logged
    if kern is None:
        kern = Kernel(default, key, gpu, "default")
    marker = (gpu, key.to_str(), kern.why)
    if marker not in _logged:
        _logged.add(marker)
        logger.info("%s on %s: no exact DB entry, using %s config %s", key.to_str(), gpu, kern.why, kern.config.short())
    return kern


def _resolve_gpu(gpu: str | None, database: tuning_db.TuningDB) -> str:
    if gpu is None:
        return current_gpu() if torch.cuda.is_available() else CPU
    if gpu == CPU or gpu in KNOWN_GPUS:
        return gpu
    return check_gpu_name(gpu, also=tuple(database.gpus()))


def _kernel_for(database: tuning_db.TuningDB, gpu: str, key: WorkloadKey) -> Kernel:
    _check_generation()
    cache_key = (database.dirs, gpu, key)
    kern = _kernels.get(cache_key)
    if kern is None:
        with _lock:
            kern = _kernels.get(cache_key)
            if kern is None:
                kern = _choose(database, gpu, key)
                _kernels[cache_key] = kern
    return kern


def _key_of(shape: Sequence[int], dtype, masked, out_dtype) -> WorkloadKey:
    if isinstance(shape, torch.Tensor) or not isinstance(shape, Sequence):
        raise ValueError(f"shape must be a (B, H, N, D) sequence such as q.shape, got {type(shape).__name__}")
    dims = tuple(shape)
    if len(dims) != 4 or not all(isinstance(x, int) and not isinstance(x, bool) for x in dims):
        raise ValueError(f"shape={dims!r} must be four ints (B, H, N, D) like SDPA's q.shape")
    b, h, n, d = dims
    if d not in checks.SUPPORTED_HEAD_DIMS:
        raise ValueError(f"shape={dims!r}: head_dim D={d} is not supported; supported: {checks.SUPPORTED_HEAD_DIMS}")
    if n < 1:
        raise ValueError(f"shape={dims!r}: N={n} has no kernel (attention() returns an empty output for N=0)")
    if b * h == 0 and min(b, h) >= 0:
        b, h = 1, 1  # an empty batch never launches; key it as the smallest workload
    return workload_key((b, h, n, d), masked=masked, in_dtype=dtype, out_dtype=out_dtype)


def get_kernel(
    shape: Sequence[int],
    *,
    dtype: torch.dtype | str = torch.float16,
    masked: bool = False,
    out_dtype: torch.dtype | str | None = None,
    gpu: str | None = None,
    db: tuning_db.TuningDB | None = None,
) -> Kernel:
    """The kernel the DB picks for a (B, H, N, D) workload on ``gpu`` (default: the GPU present).

    ``dtype``/``out_dtype`` are the workload's input/output dtypes (``out_dtype=None``: same as
    ``dtype``), ``masked`` whether it carries a mask or bias; with N, D and the B*H bucket they
    form the DB key (``keys.workload_key``).  ``gpu`` names a GPU (``"h100"``, ...) to see what
    it would run, with or without CUDA here; a name that is neither known nor has a DB file
    raises ValueError listing the known ones.  Without CUDA and without ``gpu`` the answer is
    the safe default (``Kernel.gpu == "cpu"``).  ``db`` defaults to ``TuningDB.default()``
    (shipped + ``$QFLASH_GEN_DB``).  An empty batch (B*H = 0) is keyed as B*H = 1."""
    # Front cache on the raw arguments: a repeated get_kernel is one tuple and one dict lookup.
    args = None
    if not isinstance(shape, torch.Tensor) and isinstance(shape, Sequence):
        where = (os.environ.get(tuning_db.ENV_DB_DIR), _cuda_index()) if db is None else (db, gpu is None and _cuda_index())
        args = (tuple(shape), dtype, masked, out_dtype, gpu, where)
        if _cache_generation == tuning_db.generation():
            kern = _by_args.get(args)
            if kern is not None:
                return kern
    key = _key_of(shape, dtype, masked, out_dtype)
    database = tuning_db.TuningDB.default() if db is None else db
    if not isinstance(database, tuning_db.TuningDB):
        raise ValueError(f"db must be a qflash_gen.db.TuningDB or None, got {type(database).__name__}")
    kern = _kernel_for(database, _resolve_gpu(gpu, database), key)
    if args is not None:
        with _lock:
            if len(_by_args) >= _FRONT_MAX:
                _by_args.clear()
            _by_args[args] = kern
    return kern


def _cuda_index() -> int | None:
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def config_for_call(
    q: torch.Tensor,
    *,
    masked: bool,
    in_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> KernelConfig:
    """Config the runtime uses for a CUDA call on ``q`` (``attention``/``attention_int8`` with
    ``config=None``): ``get_kernel`` for the GPU ``q`` lives on, memoized per raw call shape so
    a repeated call costs one dict lookup."""
    b, h, n, d = q.shape
    call = (q.device, b * h, n, d, masked, in_dtype, out_dtype)
    if _cache_generation == tuning_db.generation():
        config = _by_call.get(call)
        if config is not None:
            return config
    key = workload_key((b, h, n, d), masked=masked, in_dtype=in_dtype, out_dtype=out_dtype)
    kern = _kernel_for(tuning_db.TuningDB.default(), current_gpu(q.device), key)
    with _lock:
        if len(_by_call) >= _BY_CALL_MAX:
            _by_call.clear()
        _by_call[call] = kern.config
    return kern.config
