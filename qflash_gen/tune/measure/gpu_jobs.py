"""The job code: what the isolated worker process runs for each candidate (see :mod:`.isolation`).

``run_job(job)`` handles three ops:

* ``measure``: for each shape, build (or reuse) fresh random inputs, launch the candidate once and
  compare it bit for bit with ``reference_int8`` (a mismatch fails the candidate, no timing), take
  the SQNR of its float output against float64 attention of the dequantized int8 inputs, then time
  it by the protocol (``triton.testing.do_bench`` median with the L2 flushed before every rep, or
  CUDA-graph replay).  The timed call is the launch bound once (``launch.launcher``, about 15 µs of
  host time on an H200 VM): through Triton's normal launch (70-87 µs of host time a call, longer
  than do_bench's L2 flush) kernels under ~20 µs were timed as the host, 57-71 µs with 16-41 µs
  spreads, against 6-13 µs with spreads under 1 µs bound (ninth session).
* ``compile``: launch once on a batch-1 instance of each shape, so Triton's on-disk cache holds the
  binary before the timed worker needs it (parallel precompilation).
* ``environment``: device, driver, CUDA, torch, Triton and template versions.

Before a ``measure`` job the worker process warms the GPU (:func:`.warmup.warm_up`: fp16 matmuls) when it
has timed nothing yet or when more than ``GPU_IDLE_REWARM_S`` passed since it last kept the GPU busy
(a timing or a warm-up; :class:`.warmup.IdleRewarm`): an idle GPU sits at a low SM clock (345 MHz on an
H200, 1980 max) and the first timings after it were 3-4x too slow, at the start of a study and
again at the start of each batch it had compiled ahead (the GPU idle meanwhile).  Where NVML reads
the SM clock and its maximum the warm-up runs until the clock reads ``GPU_CLOCK_TARGET`` of the
maximum, else for ``GPU_WARMUP_S``; never past ``GPU_WARMUP_MAX_S``.  A restarted worker is a new
process and warms again.  The job that warmed returns what it did under ``"warmup"``.

A timing whose spread (p80 - p20) exceeds ``SPREAD_RETRY_FRACTION`` of its median is taken again
after a short warm-up, at most ``SPREAD_RETRIES`` times (:func:`time_steady`, GPU only): the last
timing is kept and the measurement's ``retries`` says how many were taken.  That covers what the
idle rule misses (a clock that drops within a job).  In the ninth session's default run on an
H200, with the bound launch, none of 871 timings needed it.

With ``protocol.energy`` a ``measure`` job also takes the energy per call of every correct shape
(:mod:`qflash_gen.energy`: NVML's counter around >= ``energy_min_s`` s of CUDA-graph replay,
``energy_repeats`` rounds, the job's shapes interleaved in each round with one idle span).  Where
the counter is missing the candidate fails with the reason (``energy: ...``), never a made-up number.

On a machine without CUDA (tests) the same code runs the kernel through Triton's interpreter
(``TRITON_INTERPRET=1``) and "times" it with the wall clock: those numbers are labeled
``timing: cpu-interpreter`` and say nothing about a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import time
import zlib
from typing import Any

import torch

from qflash_gen import checks, codegen, launch, quant, reference
from qflash_gen.config import KernelConfig
from qflash_gen.keys import torch_dtype
from qflash_gen.tune.measure import warmup
from qflash_gen.tune.measure.base import (
    GPU_RETRY_WARMUP_S,
    SPREAD_RETRIES,
    SPREAD_RETRY_FRACTION,
    Measurement,
    Protocol,
    ShapeSpec,
)
from qflash_gen.tune.measure.warmup import IdleRewarm, max_sm_clock_mhz, sm_clock_mhz, warm_up  # noqa: F401 - re-exported

_FATAL_MARKERS = (
    "illegal memory access",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "device-side assert",
    "cuda error: an illegal",
)
_INPUT_CACHE_MAX = 16
_inputs_cache: dict[tuple, dict[str, Any]] = {}
_energy_meters: dict[tuple, Any] = {}  # (min_s, repeats) -> EnergyMeter on this worker's GPU (opened once)


def forget_energy_meters() -> None:
    """Drop the energy meters opened so far (the next energy job opens its counter again)."""
    _energy_meters.clear()


class WorkerFatal(RuntimeError):
    """This process's CUDA context is unusable: the worker must be replaced (see worker_main.py)."""

    fatal = True


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def swin_shift_mask(windows: int, window: int = 7, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Swin's shifted-window attention mask: ``(windows, N, N)`` bool, True = attend.

    The feature map is ``sqrt(windows) * window`` wide, cyclically shifted by ``window // 2``;
    tokens of a window attend only to tokens from the same region (Swin, Liu et al. 2021).  None
    when there is no shift (one window per image: Swin disables the shift there) or ``windows``
    is not a square."""
    side = math.isqrt(windows)
    if windows <= 1 or side * side != windows:
        return None
    size, shift = side * window, window // 2
    img = torch.zeros((size, size), dtype=torch.int64)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[hs, ws] = cnt
            cnt += 1
    ids = img.view(side, window, side, window).permute(0, 2, 1, 3).reshape(windows, window * window)
    return (ids[:, :, None] == ids[:, None, :]).to(device)


def _inputs(shape: ShapeSpec, seed: int, device: torch.device) -> dict[str, Any]:
    """Random int8 inputs of a shape and their float64 reference output (cached per shape)."""
    key = (*shape.match_key(), shape.windows, seed, str(device))
    got = _inputs_cache.get(key)
    if got is not None:
        return got
    if len(_inputs_cache) >= _INPUT_CACHE_MAX:
        _inputs_cache.pop(next(iter(_inputs_cache)))
    b, h, n, d = shape.shape
    g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(repr(shape.match_key()).encode()))
    q, k, v = (torch.randn((b, h, n, d), generator=g).to(device) for _ in range(3))
    sq, sk, sv = (quant.dynamic_scale(t) for t in (q, k, v))
    # v8 key-major: the layout the quantizers (quant_kernels) hand the kernel on the call path
    q8, k8, v8 = quant.quantize(q, sq), quant.quantize(k, sk), quant.key_major(quant.quantize(v, sv))
    params = quant.make_params(sq, sk, sv, head_dim=d, device=device)
    mask = float_bias = bias = None
    if shape.masked:
        float_bias = (torch.randn((1, h, n, n), generator=g) * 2.0).to(device)
        win = swin_shift_mask(shape.windows, device=device) if n == 49 else None
        if win is not None:
            mask = win.repeat(b // shape.windows, 1, 1).unsqueeze(1)  # (B, 1, N, N)
        bias = quant.additive_bias(mask, float_bias)  # float32, converted per group by the kernel
    qf, kf, vf = q8.double() * sq.double(), k8.double() * sk.double(), v8.double() * sv.double()
    ref = reference.float_attention(qf, kf, vf, attn_mask=mask, float_bias=float_bias)
    got = {"q8": q8, "k8": k8, "v8": v8, "params": params, "bias": bias, "ref": ref, "sv": sv}
    _inputs_cache[key] = got
    return got


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, int]:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False, a.numel()
    if a.is_floating_point():
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        same = a.view(view) == b.view(view)
    else:
        same = a == b
    bad = int((~same).sum())
    return bad == 0, bad


def _launch(cfg: KernelConfig, x: dict[str, Any], out: torch.Tensor) -> torch.Tensor:
    return launch.launch(cfg, x["q8"], x["k8"], x["v8"], x["params"], bias=x["bias"], out=out, out_dtype=out.dtype)


def _bound(cfg: KernelConfig, x: dict[str, Any], out: torch.Tensor) -> Any:
    """:func:`_launch` bound once (``launch.launcher``): what the timings call, so that they time
    the kernel, not Triton's per-call host work."""
    return launch.launcher(codegen.load(cfg), cfg, x["q8"], x["k8"], x["v8"], x["params"], x["bias"], out, out.dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _check_context(device: torch.device, exc: BaseException) -> None:
    """Raise WorkerFatal if ``exc`` left the CUDA context unusable."""
    text = str(exc).lower()
    if device.type != "cuda":
        return
    if any(m in text for m in _FATAL_MARKERS):
        raise WorkerFatal(f"CUDA context lost: {exc}") from exc
    try:
        torch.cuda.synchronize()
    except Exception as again:  # noqa: BLE001 - any failure here means the context is gone
        raise WorkerFatal(f"CUDA context lost after: {exc} ({again})") from exc


def _check_against_oracle(cfg: KernelConfig, x: dict[str, Any], out: torch.Tensor) -> str | None:
    try:
        want = reference.reference_int8(
            x["q8"], x["k8"], x["v8"], x["params"], cfg, bias=x["bias"], out_dtype=out.dtype
        )
    except OverflowError as exc:
        return f"overflow: {exc}"
    same, bad = _bits_equal(out, want)
    if not same:
        return f"output differs from the oracle in {bad} of {out.numel()} elements ({out.dtype})"
    return None


def _time(fn, protocol: Protocol, device: torch.device) -> tuple[float, float]:
    """(median, p80 - p20) in microseconds."""
    if device.type == "cuda":
        import triton.testing

        if protocol.timing == "cudagraph":
            q20, q50, q80 = triton.testing.do_bench_cudagraph(fn, rep=protocol.rep_ms, quantiles=[0.2, 0.5, 0.8])
        else:
            q20, q50, q80 = triton.testing.do_bench(
                fn, warmup=protocol.warmup_ms, rep=protocol.rep_ms, quantiles=[0.2, 0.5, 0.8]
            )
        return q50 * 1e3, (q80 - q20) * 1e3
    samples = []
    for _ in range(3):  # interpreter: wall clock, for the test of this code path only
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    return samples[1], samples[-1] - samples[0]


def _retry_warm_up(device: torch.device) -> dict[str, Any]:
    return warmup.warm_up(device, busy_s=GPU_RETRY_WARMUP_S, max_s=4 * GPU_RETRY_WARMUP_S)


def time_steady(
    fn, protocol: Protocol, device: torch.device, *, timer: Any = None, warm: Any = None
) -> tuple[float, float, int]:
    """(median, p80 - p20 in microseconds, retries): :func:`_time`, taken again after a short
    warm-up while the spread exceeds ``SPREAD_RETRY_FRACTION`` of the median, at most
    ``SPREAD_RETRIES`` times, on a GPU only (the interpreter's wall clock is noise anyway); the
    last timing is kept.  ``timer`` and ``warm`` replace ``_time`` and the warm-up (tests)."""
    timer = timer or _time
    latency, spread = timer(fn, protocol, device)
    retries = 0
    while device.type == "cuda" and retries < SPREAD_RETRIES and spread > SPREAD_RETRY_FRACTION * latency:
        try:
            (warm or _retry_warm_up)(device)
        except Exception:  # noqa: BLE001 - a failed warm-up still leaves the retry worth taking
            pass
        latency, spread = timer(fn, protocol, device)
        retries += 1
    return latency, spread, retries


def measure_one(cfg: KernelConfig, shape: ShapeSpec, protocol: Protocol) -> Measurement:
    """Correctness, SQNR and latency of one config on one shape (see the module doc)."""
    device = _device()
    if device.type == "cpu" and not checks.interpreter_active():
        return Measurement.failed("no CUDA device and TRITON_INTERPRET is not set")
    try:
        x = _inputs(shape, protocol.seed, device)
        b, h, n, d = shape.shape
        out_dtype = torch_dtype(protocol.out_dtype)
        out = torch.empty((b, h, n, d), dtype=out_dtype, device=device)
        _launch(cfg, x, out)  # compiles (or loads from Triton's cache) and runs
        _sync(device)
        wrong = _check_against_oracle(cfg, x, out)
        if wrong:
            return Measurement(latency_us=None, spread_us=None, sqnr_db=None, correct=False, error=wrong)
        if out.is_floating_point():
            sqnr = reference.sqnr_db(out, x["ref"])
        else:  # int8 out: the softmax's accuracy shows in the float output of the same config
            out16 = torch.empty((b, h, n, d), dtype=torch.float16, device=device)
            _launch(cfg, x, out16)
            _sync(device)
            wrong = _check_against_oracle(cfg, x, out16)
            if wrong:
                return Measurement(latency_us=None, spread_us=None, sqnr_db=None, correct=False, error=wrong)
            sqnr = reference.sqnr_db(out16, x["ref"])
        latency, spread, retries = time_steady(_bound(cfg, x, out), protocol, device)
        return Measurement(
            latency_us=latency, spread_us=spread, sqnr_db=sqnr, correct=True, error=None, retries=retries
        )
    except WorkerFatal:
        raise
    except Exception as exc:  # compile error, out of resources, ...: this candidate fails
        _check_context(device, exc)
        return Measurement.failed(f"{type(exc).__name__}: {str(exc).strip()[:500]}")


def _energy_meter(protocol: Protocol) -> Any:
    from qflash_gen import energy

    key = (protocol.energy_min_s, protocol.energy_repeats)
    meter = _energy_meters.get(key)
    if meter is None:
        counter = next((m.counter for m in _energy_meters.values()), None) or energy.open_counter()
        meter = energy.EnergyMeter(counter, min_seconds=protocol.energy_min_s, repeats=protocol.energy_repeats)
        _energy_meters[key] = meter
    return meter


def add_energy(
    cfg: KernelConfig, shapes: list[ShapeSpec], protocol: Protocol, measurements: list[Measurement]
) -> list[Measurement]:
    """The measurements with the energy per call of each correct one (see the module doc); a
    candidate whose energy cannot be measured fails with the reason."""
    from qflash_gen import energy

    todo = [i for i, m in enumerate(measurements) if m.ok]
    if not todo:
        return measurements
    device = _device()

    def failed(why: str) -> list[Measurement]:
        return [dataclasses.replace(m, error=f"energy: {why}"[:600]) if m.ok else m for m in measurements]

    try:
        meter = _energy_meter(protocol)
        works = {}
        for i in todo:
            x = _inputs(shapes[i], protocol.seed, device)
            out = torch.empty(shapes[i].shape, dtype=torch_dtype(protocol.out_dtype), device=device)
            works[str(i)] = energy.GraphWork(_bound(cfg, x, out))
        got = meter.measure_many(works)
    except (energy.EnergyUnavailable, energy.EnergyError) as exc:
        return failed(str(exc))
    except WorkerFatal:
        raise
    except Exception as exc:  # graph capture failed, ...: this candidate fails
        _check_context(device, exc)
        return failed(f"{type(exc).__name__}: {str(exc).strip()[:500]}")
    result = list(measurements)
    for i in todo:
        r = got[str(i)]
        result[i] = dataclasses.replace(
            measurements[i],
            energy_uj=r.uj_per_call,
            energy_spread_uj=r.spread_uj,
            above_idle_uj=r.above_idle_uj,
            idle_w=r.idle_w,
        )
    return result


def compile_one(cfg: KernelConfig, shapes: list[ShapeSpec], protocol: Protocol) -> dict[str, Any]:
    """Launch once per distinct (H, N, D, masked) on small inputs: fills Triton's disk cache.

    The small instance keeps what Triton specializes on (strides, H, the output dtype; batch 2
    keeps a broadcast bias's zero batch stride), so the timed worker hits the same cache entry."""
    device = _device()
    dtypes = [torch_dtype(protocol.out_dtype)]
    if protocol.out_dtype == "int8":
        dtypes.append(torch.float16)  # an int8 measurement also launches fp16 out for the SQNR
    done = set()
    for s in shapes:
        batch = min(s.batch, 2)
        small = ShapeSpec(s.workload, batch, batch * s.windows, s.h, s.n, s.d, s.masked)
        if small.match_key() in done:
            continue
        done.add(small.match_key())
        x = _inputs(small, protocol.seed, device)
        for dtype in dtypes:
            _launch(cfg, x, torch.empty(small.shape, dtype=dtype, device=device))
        _sync(device)
    return {"compiled": len(done)}


def environment() -> dict[str, Any]:
    """What produced the numbers: device, driver, CUDA, torch, Triton, template."""
    import triton

    from qflash_gen.version import __version__

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "qflash_gen": __version__,
        "template_sha256": codegen.template_hash(),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        from qflash_gen.gpu import current_gpu

        props = torch.cuda.get_device_properties(0)
        env.update(
            device=props.name,
            cc=f"{props.major}.{props.minor}",
            gpu=current_gpu(),
            sm_count=props.multi_processor_count,
            smem_per_block_optin=getattr(props, "shared_memory_per_block_optin", None),
        )
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env.update(device="cpu (Triton interpreter)", gpu=None)
    return env


rewarm = IdleRewarm()  # this worker process's (a test's fake target may shorten its idle_s)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """The worker target (``qflash_gen.tune.measure.gpu_jobs:run_job``)."""
    op = job.get("op", "measure")
    if op == "environment":
        return environment()
    cfg = KernelConfig.from_dict(job["config"])
    shapes = [ShapeSpec.from_dict(s) for s in job["shapes"]]
    protocol = Protocol.from_dict(job.get("protocol") or {})
    if op == "compile":
        return compile_one(cfg, shapes, protocol)
    if op != "measure":
        raise ValueError(f"unknown op {op!r}")
    warmed = rewarm.before_timing(_device())  # first timing of the process, or after an idle gap
    measurements = []
    for s in shapes:
        measurements.append(measure_one(cfg, s, protocol))
        if measurements[-1].latency_us is not None:  # timed: the GPU was busy until now
            rewarm.busy()
    if protocol.energy:
        measurements = add_energy(cfg, shapes, protocol, measurements)
        if any(m.ok for m in measurements):
            rewarm.busy()
    return {"measurements": [m.to_dict() for m in measurements], **({"warmup": warmed} if warmed else {})}
