"""Warming the GPU before a timing (the timed worker's, :mod:`.gpu_jobs`): an idle GPU sits at a
low SM clock (345 MHz on an H200, 1980 max), and timings taken right after came out slow.

* :func:`warm_up`: fp16 matmuls until NVML reads the SM clock at ``GPU_CLOCK_TARGET`` of its
  maximum, else for a fixed busy time, never past a bound;
* :class:`IdleRewarm`: when to warm (a process's first timing, or after ``GPU_IDLE_REWARM_S``
  without the GPU busy);
* :func:`sm_clock_mhz`, :func:`max_sm_clock_mhz`: the clock now and its maximum, where readable.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from qflash_gen.tune.measure.base import GPU_CLOCK_TARGET, GPU_IDLE_REWARM_S, GPU_WARMUP_MAX_S, GPU_WARMUP_S


def sm_clock_mhz() -> float | None:
    """The SM clock of this worker's GPU now (NVML through torch), or None where unreadable."""
    try:
        return float(torch.cuda.clock_rate())
    except Exception:  # noqa: BLE001 - no pynvml, no driver: the warm-up does without
        return None


@functools.cache
def max_sm_clock_mhz() -> float | None:
    """The highest SM clock of this worker's GPU, or None where unreadable: NVML's max clock
    (the handle :func:`torch.cuda.clock_rate` reads, ``CUDA_VISIBLE_DEVICES`` mapped), else the
    device property ``clock_rate`` (kHz, CUDA's peak clock).  Asked once per process."""
    try:
        import pynvml

        handle = torch.cuda._get_pynvml_handler()  # private in torch: the handle clock_rate reads
        mhz = float(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM))
        if mhz > 0:
            return mhz
    except Exception:  # noqa: BLE001 - no pynvml, no driver, no such query: try the property
        pass
    try:
        khz = float(torch.cuda.get_device_properties(torch.cuda.current_device()).clock_rate)
    except Exception:  # noqa: BLE001 - no CUDA, or a torch without it: warm for a fixed time
        return None
    return khz / 1e3 if khz > 0 else None


def _matmul_chunk(work: torch.Tensor, out: torch.Tensor) -> None:
    for _ in range(4):
        torch.mm(work, work, out=out)
    torch.cuda.synchronize()


def warm_up(
    device: torch.device,
    *,
    busy_s: float = GPU_WARMUP_S,
    max_s: float = GPU_WARMUP_MAX_S,
    chunk: Any = None,
    clock: Any = None,
    max_mhz: float | None = None,
) -> dict[str, Any]:
    """Busy the GPU with fp16 matmuls so that a timing does not meet an idle GPU's low clocks.

    Where the SM clock reads and its maximum is known, run chunks until the clock reads
    ``GPU_CLOCK_TARGET`` of the maximum; else for ``busy_s``; the whole warm-up, cuBLAS's start
    included, stops past ``max_s``.  Returns what it did: ``ms``, ``chunks``, the SM clock before
    and after (None where unreadable), ``target_mhz`` (None: fixed time) and why it ``stopped``
    (``clock``, ``time`` or ``bound``).  ``chunk`` and ``clock`` replace the device calls and
    ``max_mhz`` the device's maximum (tests; with ``clock`` given, no maximum unless ``max_mhz``)."""
    if device.type != "cuda" and chunk is None:
        return {"ran": False, "why": "no CUDA device"}
    if clock is None:
        clock = sm_clock_mhz
        max_mhz = max_mhz if max_mhz is not None else max_sm_clock_mhz()
    t0 = time.perf_counter()
    before = after = clock()
    target = GPU_CLOCK_TARGET * max_mhz if max_mhz and before is not None else None
    if chunk is None:
        work = torch.randn((4096, 4096), device=device, dtype=torch.float16)
        out = torch.empty_like(work)
        chunk = lambda: _matmul_chunk(work, out)  # noqa: E731
    chunk()  # the first one starts cuBLAS: not counted as busy time
    t1, chunks = time.perf_counter(), 1
    while True:
        now = time.perf_counter()
        if now - t0 >= max_s:
            stopped = "bound"
            break
        if target is None and now - t1 >= busy_s:
            stopped = "time"
            break
        if target is not None:
            after = clock()
            if after is not None and after >= target:
                stopped = "clock"
                break
        chunk()
        chunks += 1
    if target is None or stopped == "bound":
        after = clock()
    return {"ran": True, "ms": round((time.perf_counter() - t0) * 1e3, 1), "chunks": chunks,
            "sm_clock_mhz": [before, after], "target_mhz": target, "stopped": stopped}  # fmt: skip


class IdleRewarm:
    """When the timed worker warms the GPU before a ``measure`` job: before its first one, and
    again once more than ``idle_s`` passed since this process last kept the GPU busy (a timed
    measurement or a warm-up).  ``now`` and ``warm`` replace the clock and :func:`warm_up` (tests)."""

    def __init__(self, idle_s: float = GPU_IDLE_REWARM_S, *, now: Any = time.monotonic, warm: Any = None) -> None:
        self.idle_s = idle_s
        self.now = now
        self.warm = warm
        self.last_busy: float | None = None  # ``now()`` when the GPU was last busy (None: never)

    def before_timing(self, device: torch.device) -> dict[str, Any] | None:
        """Warm up if the GPU has been idle too long; what the warm-up did (with its ``cause``)
        or None when none was needed."""
        t = self.now()
        if self.last_busy is not None and t - self.last_busy <= self.idle_s:
            return None
        cause = "first timing" if self.last_busy is None else f"idle {t - self.last_busy:.1f} s"
        try:
            got = (self.warm or warm_up)(device)  # warm_up looked up now: tests replace it
        except Exception as exc:  # noqa: BLE001 - no warm-up is no reason to fail the candidate
            got = {"ran": False, "why": f"{type(exc).__name__}: {exc}"[:300]}
        self.busy()
        return {**got, "cause": cause}

    def busy(self) -> None:
        """The GPU was busy until now (a timing just ended)."""
        self.last_busy = self.now()
