"""The timed worker warms the GPU again after an idle gap and retakes a bimodal timing.

An H200 study's batches started with timings 2-6x slow and p80 - p20 spreads of 15-25 µs (vit_b
b=1, a ~9 µs kernel) after the GPU idled while the batch compiled: the worker had warmed only
before its first timing.  The device calls are faked here: a clock, a warm-up, a timer."""

from __future__ import annotations

import time

import pytest
import torch

from qflash_gen.config import KernelConfig
from qflash_gen.tune.measure import Measurement, Protocol, ShapeSpec, gpu_jobs
from qflash_gen.tune.measure.base import (
    GPU_CLOCK_TARGET,
    GPU_IDLE_REWARM_S,
    GPU_WARMUP_NOTE,
    SPREAD_RETRIES,
    SPREAD_RETRY_FRACTION,
)

CUDA = torch.device("cuda")  # never touched: the fakes replace every device call
SHAPE = ShapeSpec.of("vit_b", 1)


class FakeTime:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _rewarm(now: FakeTime) -> tuple[gpu_jobs.IdleRewarm, list[str]]:
    warmed: list[str] = []

    def warm(device):
        warmed.append(device.type)
        return {"ran": True, "ms": 120.0, "chunks": 30, "sm_clock_mhz": [345.0, 1800.0]}

    return gpu_jobs.IdleRewarm(now=now, warm=warm), warmed


# -- warming again after an idle gap --------------------------------------------------------------


def test_warms_before_the_first_timing_and_after_an_idle_gap_not_between_back_to_back_jobs():
    now = FakeTime()
    rewarm, warmed = _rewarm(now)
    first = rewarm.before_timing(CUDA)
    assert first["cause"] == "first timing" and first["ran"] and len(warmed) == 1
    for _ in range(5):  # back-to-back jobs: each ends a timing well within the idle limit
        now.t += 0.3
        assert rewarm.before_timing(CUDA) is None
        rewarm.busy()
    now.t += GPU_IDLE_REWARM_S + 3.0  # a batch compiled ahead, the GPU idle meanwhile
    again = rewarm.before_timing(CUDA)
    assert again["cause"] == f"idle {GPU_IDLE_REWARM_S + 3.0:.1f} s" and len(warmed) == 2
    now.t += 0.5  # the warm-up itself kept the GPU busy: no second one right after it
    assert rewarm.before_timing(CUDA) is None and len(warmed) == 2


def test_a_failed_warm_up_is_recorded_and_does_not_fail_the_job():
    def broken(device):
        raise RuntimeError("cuBLAS unavailable")

    got = gpu_jobs.IdleRewarm(now=FakeTime(), warm=broken).before_timing(CUDA)
    assert got == {"ran": False, "why": "RuntimeError: cuBLAS unavailable", "cause": "first timing"}


def test_run_job_warms_after_an_idle_gap_and_reports_it(monkeypatch):
    now = FakeTime()
    rewarm, warmed = _rewarm(now)
    monkeypatch.setattr(gpu_jobs, "rewarm", rewarm)
    latencies = iter([9.0, 9.1, None, 9.0])

    def measure_one(cfg, shape, protocol):
        now.t += 0.2
        lat = next(latencies)
        if lat is None:
            return Measurement.failed("compile error")
        return Measurement(latency_us=lat, spread_us=0.3, sqnr_db=40.0, correct=True)

    monkeypatch.setattr(gpu_jobs, "measure_one", measure_one)
    job = {"op": "measure", "config": KernelConfig().to_dict(), "shapes": [SHAPE.to_dict()], "protocol": {}}
    assert gpu_jobs.run_job(job)["warmup"]["cause"] == "first timing"
    assert "warmup" not in gpu_jobs.run_job(job)  # back to back
    now.t += 0.9  # 0.9 s since the last timing, then a failed candidate: no timing, the gap grows
    assert "warmup" not in gpu_jobs.run_job(job)
    got = gpu_jobs.run_job(job)
    assert got["warmup"]["cause"] == "idle 1.1 s" and len(warmed) == 2
    assert got["measurements"][0]["latency_us"] == 9.0


# -- warming until the clock is up ----------------------------------------------------------------


def test_warm_up_stops_once_the_sm_clock_reaches_the_target():
    reads = iter([345.0, 345.0, 900.0, 1500.0, 1800.0, 1980.0])
    chunks = []
    got = gpu_jobs.warm_up(CUDA, chunk=lambda: chunks.append(1), clock=reads.__next__, max_mhz=1980.0)
    assert got["stopped"] == "clock" and got["target_mhz"] == pytest.approx(GPU_CLOCK_TARGET * 1980.0)
    assert got["sm_clock_mhz"] == [345.0, 1800.0]  # 1800 >= 0.9 * 1980: no chunk after it
    assert got["chunks"] == len(chunks) == 4  # cuBLAS's start, then one per read below the target


def test_warm_up_toward_the_clock_target_is_bounded():
    t0 = time.perf_counter()
    got = gpu_jobs.warm_up(CUDA, chunk=lambda: time.sleep(0.002), clock=lambda: 1500.0, max_mhz=1980.0, max_s=0.1)
    assert got["stopped"] == "bound" and got["sm_clock_mhz"] == [1500.0, 1500.0]
    assert 0.1 <= time.perf_counter() - t0 < 0.2 and got["ms"] < 200


def test_warm_up_without_a_clock_or_its_maximum_runs_for_the_fixed_time():
    for clock, max_mhz in ((lambda: None, 1980.0), (lambda: 345.0, None)):
        got = gpu_jobs.warm_up(CUDA, chunk=lambda: time.sleep(0.002), clock=clock, max_mhz=max_mhz, busy_s=0.05)
        assert got["stopped"] == "time" and got["target_mhz"] is None and 50 <= got["ms"] < 200


# -- retaking a bimodal timing --------------------------------------------------------------------


def _timer(results):
    results = iter(results)
    return lambda fn, protocol, device: next(results)


def test_a_wide_spread_timing_is_taken_again_after_a_warm_up_and_the_retry_kept():
    warmed = []
    got = gpu_jobs.time_steady(
        None, Protocol(), CUDA, timer=_timer([(45.0, 20.0), (8.9, 0.4)]), warm=lambda d: warmed.append(d)
    )
    assert got == (8.9, 0.4, 1) and warmed == [CUDA]


def test_retries_are_bounded_and_the_last_timing_kept():
    results = [(50.0, 20.0), (40.0, 15.0), (30.0, 10.0), (9.0, 0.1)]
    got = gpu_jobs.time_steady(None, Protocol(), CUDA, timer=_timer(results), warm=lambda d: None)
    assert got == (*results[SPREAD_RETRIES][:2], SPREAD_RETRIES)


def test_a_narrow_spread_timing_is_not_retaken_nor_any_on_the_interpreter():
    never = lambda d: pytest.fail("no warm-up expected")  # noqa: E731
    narrow = (9.0, 9.0 * SPREAD_RETRY_FRACTION)  # at the limit: kept
    assert gpu_jobs.time_steady(None, Protocol(), CUDA, timer=_timer([narrow]), warm=never) == (*narrow, 0)
    wide = (9.0, 9.0)
    assert gpu_jobs.time_steady(None, Protocol(), torch.device("cpu"), timer=_timer([wide]), warm=never) == (*wide, 0)


def test_a_failed_retry_warm_up_still_retakes_the_timing():
    def broken(device):
        raise RuntimeError("out of memory")

    got = gpu_jobs.time_steady(None, Protocol(), CUDA, timer=_timer([(45.0, 20.0), (9.0, 0.2)]), warm=broken)
    assert got == (9.0, 0.2, 1)


# -- what is recorded -----------------------------------------------------------------------------

OLD = {"latency_us": 8.8, "spread_us": 0.05, "sqnr_db": 41.2, "correct": True, "error": None}


def test_measurement_round_trips_with_and_without_retries():
    plain = Measurement(latency_us=8.8, spread_us=0.05, sqnr_db=41.2, correct=True)
    assert plain.to_dict() == OLD  # as recorded before retries existed: tables and journals unchanged
    retried = Measurement(latency_us=8.8, spread_us=0.05, sqnr_db=41.2, correct=True, retries=2, energy_uj=3.5)
    assert retried.to_dict() == {**OLD, "energy_uj": 3.5, "retries": 2}
    for m in (plain, retried, Measurement.failed("compile error")):
        assert Measurement.from_dict(m.to_dict()) == m


def test_an_old_serialized_measurement_still_loads():
    m = Measurement.from_dict(OLD)
    assert m.retries == 0 and m.ok and m.latency_us == 8.8
    assert Measurement.from_dict({**OLD, "retries": None}).retries == 0


def test_the_provenance_note_says_what_the_worker_does_and_the_protocol_is_unchanged():
    assert "before any timing that follows > 1 s without one" in GPU_WARMUP_NOTE
    assert "taken again" in GPU_WARMUP_NOTE and "retries" in GPU_WARMUP_NOTE
    assert not any("retr" in k or "rewarm" in k for k in Protocol().to_dict())
