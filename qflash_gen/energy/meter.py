"""Energy per attention call, measured with NVML's total-energy counter.

The counter (``nvmlDeviceGetTotalEnergyConsumption``: millijoules since the driver loaded, Volta
and newer) is coarse in time: it moves in steps every few tens of milliseconds, and its value may
lag the work.  So one call (microseconds) is never measured alone.  The method:

1. **Loop.**  The callable is captured into a CUDA graph (``calls_per_unit`` calls back to back,
   about 2 ms of GPU time per replay) and the graph is replayed until at least ``min_seconds`` of
   GPU time (default 1 s) ran without a gap.  A loop that turns out shorter is extended (re-run
   with more replays); one that still falls short raises :class:`EnergyError`.
2. **Counter reads on its steps.**  Each read waits for the counter to change (a fresh step) and
   takes the host clock there, so a span starts and ends on counter updates.  After the loop the
   meter waits ``settle_s`` (default 0.1 s) before the closing step, so a lagging counter has
   folded in the end of the work.
3. **Idle.**  In each repeat the GPU's idle power is measured first, over a span as long as the
   loop (the process sleeps with the GPU idle and its CUDA context alive, same counter).
4. **Per call.**  ``span`` is the counter span (host clock), ``busy`` the loop's GPU time (CUDA
   events), ``E`` the counter's difference and ``P_idle`` the idle power::

       total      = (E - P_idle * (span - busy)) / calls    # the idle tails before/after removed
       above_idle = (E - P_idle * span) / calls              # what the work adds to the idle floor

   ``total`` is what a call costs while the card runs it (its share of the idle floor included);
   ``above_idle`` is the part that exists only because of the call.
5. **Repeats.**  ``repeats`` (default 3) rounds of idle + loop; the result is the median and the
   min/max of the rounds.  :meth:`EnergyMeter.measure_many` interleaves several callables in each
   round (one idle span per round, shared), so a comparison sees the same card state.

Where there is no counter (no pynvml, no NVIDIA driver, a GPU without the energy counter) every
entry point raises :class:`EnergyUnavailable` with the reason: no energy number is ever estimated.
The counter is injectable (:class:`EnergyCounter`: ``description`` and ``read_mj()``), and so are
the clock and the sleep, so the arithmetic is tested on a CPU with a fake counter.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from qflash_gen.energy.counter import UNAVAILABLE, EnergyCounter, EnergyError, EnergyUnavailable, open_counter

DEFAULT_MIN_SECONDS = 1.0
DEFAULT_REPEATS = 3
METHOD = (
    "NVML nvmlDeviceGetTotalEnergyConsumption (mJ), read on counter steps around >= {min_s:g} s of "
    "back-to-back CUDA-graph replay; idle power over a span as long (GPU idle, context alive) in each "
    "of {repeats} rounds; total = (E - P_idle*(span - busy))/calls, above_idle = (E - P_idle*span)/calls; "
    "median and min/max of the rounds"
)



# -- the work --------------------------------------------------------------------------------------
@runtime_checkable
class Work(Protocol):
    """Something to measure: ``run(units)`` executes ``units * calls_per_unit`` calls back to back,
    waits for them, and returns their busy (GPU) time in seconds; ``unit_s`` estimates one unit."""

    calls_per_unit: int
    unit_s: float

    def run(self, units: int) -> float: ...


class GraphWork:
    """``fn`` captured ``calls_per_unit`` times into one CUDA graph (about ``target_unit_s`` of GPU
    time per replay); :meth:`run` replays it back to back and times it with CUDA events."""

    def __init__(self, fn: Callable[[], Any], *, target_unit_s: float = 2e-3, max_calls_per_unit: int = 1000) -> None:
        import torch

        if not torch.cuda.is_available():
            raise EnergyUnavailable(f"{UNAVAILABLE}: CUDA-graph replay needs a CUDA GPU (none is present)")
        self._torch = torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        per_call = self._time(lambda: [fn() for _ in range(10)]) / 10  # eager: host-bound for tiny calls
        calls = int(min(max_calls_per_unit, max(1, round(target_unit_s / max(per_call, 1e-7)))))
        for _ in range(2):  # the eager estimate overstates tiny calls: resize once from the graph's own time
            self.calls_per_unit = calls
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                for _ in range(calls):
                    fn()
            self.graph.replay()
            torch.cuda.synchronize()
            self.unit_s = self.run(5) / 5
            calls = int(min(max_calls_per_unit, max(1, round(target_unit_s * calls / max(self.unit_s, 1e-7)))))
            if calls <= 2 * self.calls_per_unit:
                break

    def _time(self, fn: Callable[[], Any]) -> float:
        torch = self._torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3

    def run(self, units: int) -> float:
        def replay() -> None:
            for _ in range(units):
                self.graph.replay()

        return self._time(replay)


# -- samples and results ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class IdleSample:
    span_s: float
    energy_j: float

    @property
    def power_w(self) -> float:
        return self.energy_j / self.span_s


@dataclasses.dataclass(frozen=True)
class BusySample:
    calls: int
    busy_s: float
    span_s: float
    energy_j: float

    def per_call(self, idle_w: float) -> tuple[float, float]:
        """``(total µJ, above-idle µJ)`` per call given the idle power (see the module doc)."""
        total = self.energy_j - idle_w * (self.span_s - self.busy_s)
        above = self.energy_j - idle_w * self.span_s
        return total * 1e6 / self.calls, above * 1e6 / self.calls


@dataclasses.dataclass(frozen=True)
class EnergyResult:
    """Energy per call over ``repeats`` rounds: medians, and min/max as the spread."""

    uj_per_call: float
    uj_min: float
    uj_max: float
    above_idle_uj: float
    above_idle_min_uj: float
    above_idle_max_uj: float
    idle_w: float
    busy_w: float  # average power while the loop ran (total energy / busy time)
    us_per_call: float  # GPU time per call in the loop (graph replay, back to back, no L2 flush)
    calls: int
    repeats: int
    busy_s: float
    span_s: float
    min_seconds: float
    tick_s: float | None
    counter: str
    rounds: tuple[dict[str, float], ...] = ()

    @property
    def spread_uj(self) -> float:
        return self.uj_max - self.uj_min

    def to_dict(self, *, rounds: bool = True) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rounds"] = [dict(r) for r in self.rounds]
        if not rounds:
            out.pop("rounds")
        return out


def combine(busy: list[BusySample], idle: list[IdleSample], *, min_seconds: float, tick_s: float | None, counter: str):
    """One :class:`EnergyResult` from paired rounds (busy[i] with idle[i])."""
    if not busy or len(busy) != len(idle):
        raise ValueError(f"combine needs one idle sample per busy sample, got {len(busy)} and {len(idle)}")
    rounds = []
    for b, i in zip(busy, idle, strict=True):
        total, above = b.per_call(i.power_w)
        rounds.append(
            {
                "uj_per_call": total,
                "above_idle_uj": above,
                "idle_w": i.power_w,
                "busy_w": (b.energy_j - i.power_w * (b.span_s - b.busy_s)) / b.busy_s,
                "us_per_call": b.busy_s * 1e6 / b.calls,
                "calls": b.calls,
                "busy_s": b.busy_s,
                "span_s": b.span_s,
                "energy_j": b.energy_j,
                "idle_span_s": i.span_s,
                "idle_energy_j": i.energy_j,
            }
        )

    def col(name: str) -> list[float]:
        return [r[name] for r in rounds]

    med = statistics.median
    return EnergyResult(
        uj_per_call=med(col("uj_per_call")),
        uj_min=min(col("uj_per_call")),
        uj_max=max(col("uj_per_call")),
        above_idle_uj=med(col("above_idle_uj")),
        above_idle_min_uj=min(col("above_idle_uj")),
        above_idle_max_uj=max(col("above_idle_uj")),
        idle_w=med(col("idle_w")),
        busy_w=med(col("busy_w")),
        us_per_call=med(col("us_per_call")),
        calls=int(rounds[-1]["calls"]),
        repeats=len(rounds),
        busy_s=med(col("busy_s")),
        span_s=med(col("span_s")),
        min_seconds=min_seconds,
        tick_s=tick_s,
        counter=counter,
        rounds=tuple(rounds),
    )


# -- the meter -------------------------------------------------------------------------------------
class EnergyMeter:
    """Energy per call of :class:`Work` items on one counter (see the module doc for the method).

    Args:
        counter: the energy counter (:func:`open_counter`, or a fake).
        min_seconds: least GPU time of one loop (the counter's resolution must not matter).
        repeats: rounds of idle + loop.
        settle_s: wait after a loop before the closing counter step (the counter may lag).
        tick_timeout_s: longest wait for the counter to change; past it the counter is stuck.
        min_steps: the loop must last at least this many counter steps (resolution guard).
        min_delta_mj: a span's energy must be at least this many mJ (resolution guard).
        max_extend: how many times a loop shorter than ``min_seconds`` is re-run longer.
        clock, sleep: injectable for tests.
    """

    def __init__(
        self,
        counter: EnergyCounter,
        *,
        min_seconds: float = DEFAULT_MIN_SECONDS,
        repeats: int = DEFAULT_REPEATS,
        settle_s: float = 0.1,
        tick_timeout_s: float = 2.0,
        poll_s: float = 2e-4,
        min_steps: int = 5,
        min_delta_mj: int = 100,
        max_extend: int = 3,
        margin: float = 1.05,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not (min_seconds > 0 and math.isfinite(min_seconds)):
            raise ValueError(f"min_seconds={min_seconds!r} must be a positive number of seconds")
        if repeats < 1:
            raise ValueError(f"repeats={repeats!r} must be >= 1")
        self.counter = counter
        self.min_seconds = float(min_seconds)
        self.repeats = int(repeats)
        self.settle_s = settle_s
        self.tick_timeout_s = tick_timeout_s
        self.poll_s = poll_s
        self.min_steps = min_steps
        self.min_delta_mj = min_delta_mj
        self.max_extend = max_extend
        self.margin = margin
        self.clock = clock
        self.sleep = sleep
        self.tick_s: float | None = None
        self.required_s = self.min_seconds  # min_seconds, or longer where the counter is coarse

    # counter steps
    def _step(self) -> tuple[int, float]:
        """Wait for the counter to change; ``(new value mJ, host time)`` at the change."""
        v0 = self.counter.read_mj()
        t_start = self.clock()
        while True:
            self.sleep(self.poll_s)
            v = self.counter.read_mj()
            now = self.clock()
            if v != v0:
                if v < v0:
                    raise EnergyError(f"energy counter went backwards ({v0} -> {v} mJ): driver reloaded?")
                return v, now
            if now - t_start > self.tick_timeout_s:
                raise EnergyError(
                    f"the energy counter ({self.counter.description}) did not change in {self.tick_timeout_s:g} s; "
                    "it is stuck or too coarse to measure with"
                )

    def calibrate(self) -> float:
        """The counter's step period (median of 3 consecutive steps).  Where ``min_seconds`` would
        span fewer than ``min_steps`` steps, the required loop length grows to ``min_steps`` steps."""
        if self.tick_s is None:
            _, t = self._step()
            periods = []
            for _ in range(3):
                _, t2 = self._step()
                periods.append(t2 - t)
                t = t2
            self.tick_s = statistics.median(periods)
            self.required_s = max(self.min_seconds, self.min_steps * self.tick_s)
        return self.tick_s

    def _check_delta(self, delta_mj: int, span_s: float, what: str) -> None:
        if delta_mj < self.min_delta_mj:
            raise EnergyError(
                f"the energy counter advanced only {delta_mj} mJ over {span_s:.3f} s of {what} "
                f"(< {self.min_delta_mj} mJ): too coarse to measure with"
            )

    def idle(self, seconds: float) -> IdleSample:
        """Idle power: the counter over ``seconds`` of sleep with the GPU idle."""
        e0, t0 = self._step()
        self.sleep(seconds)
        e1, t1 = self._step()
        self._check_delta(e1 - e0, t1 - t0, "idle")
        return IdleSample(span_s=t1 - t0, energy_j=(e1 - e0) * 1e-3)

    def busy(self, work: Work, units: int) -> BusySample:
        """The counter over ``units`` units of ``work`` (no length check: see :meth:`loop`)."""
        e0, t0 = self._step()
        busy_s = float(work.run(units))
        self.sleep(self.settle_s)
        e1, t1 = self._step()
        self._check_delta(e1 - e0, t1 - t0, "work")
        return BusySample(calls=units * work.calls_per_unit, busy_s=busy_s, span_s=t1 - t0, energy_j=(e1 - e0) * 1e-3)

    def units_for(self, work: Work, seconds_per_unit: float | None = None) -> int:
        per = work.unit_s if seconds_per_unit is None else seconds_per_unit
        if not (per > 0 and math.isfinite(per)):
            raise EnergyError(f"the work's time per unit ({per!r} s) is not a positive number")
        return max(1, math.ceil(self.required_s * self.margin / per))

    def loop(self, work: Work, units: int) -> tuple[BusySample, int]:
        """:meth:`busy` with the resolution guard: a loop shorter than the required length
        (``min_seconds``, more on a coarse counter) of GPU time is run again with more units
        (``max_extend`` times), then refused (:class:`EnergyError`).
        Returns the sample and the units that reached the length (reuse them for later rounds)."""
        for attempt in range(self.max_extend + 1):
            sample = self.busy(work, units)
            if sample.busy_s >= self.required_s:
                return sample, units
            if attempt == self.max_extend:
                break
            per = sample.busy_s / units if sample.busy_s > 0 else 0.0
            grown = self.units_for(work, per) if per > 0 else units * 10
            units = max(units + 1, grown)
        raise EnergyError(
            f"the loop ran {sample.busy_s:.3f} s of GPU work ({sample.calls} calls), shorter than the required "
            f"{self.required_s:g} s, after {self.max_extend} extensions; refusing a number the counter's "
            "resolution would dominate"
        )

    def measure_many(self, works: Mapping[str, Work]) -> dict[str, EnergyResult]:
        """Each work's energy per call; the rounds interleave them, one idle span per round."""
        if not works:
            return {}
        tick = self.calibrate()
        units = {name: self.units_for(w) for name, w in works.items()}
        busy: dict[str, list[BusySample]] = {name: [] for name in works}
        idle: list[IdleSample] = []
        for _ in range(self.repeats):
            idle.append(self.idle(self.required_s * self.margin + self.settle_s))  # as long as a loop's span
            for name, work in works.items():
                sample, units[name] = self.loop(work, units[name])
                busy[name].append(sample)
        return {
            name: combine(busy[name], idle, min_seconds=self.required_s, tick_s=tick, counter=self.counter.description)
            for name in works
        }

    def measure(self, work: Work) -> EnergyResult:
        return self.measure_many({"work": work})["work"]


def measure_callables(
    fns: Mapping[str, Callable[[], Any]],
    *,
    counter: EnergyCounter | None = None,
    min_seconds: float = DEFAULT_MIN_SECONDS,
    repeats: int = DEFAULT_REPEATS,
) -> dict[str, EnergyResult]:
    """Energy per call of each CUDA callable (graph replay), interleaved in each round.

    ``counter`` defaults to NVML's for the current device (:class:`EnergyUnavailable` if none)."""
    own = counter is None
    counter = open_counter() if counter is None else counter
    try:
        works = {name: GraphWork(fn) for name, fn in fns.items()}
        return EnergyMeter(counter, min_seconds=min_seconds, repeats=repeats).measure_many(works)
    finally:
        if own and hasattr(counter, "close"):
            counter.close()


def measure_callable(fn: Callable[[], Any], **kwargs: Any) -> EnergyResult:
    """Energy per call of one CUDA callable (see :func:`measure_callables`)."""
    return measure_callables({"fn": fn}, **kwargs)["fn"]


def method(min_seconds: float = DEFAULT_MIN_SECONDS, repeats: int = DEFAULT_REPEATS) -> str:
    """One line describing the method, for tables and DB entries."""
    return METHOD.format(min_s=min_seconds, repeats=repeats)
