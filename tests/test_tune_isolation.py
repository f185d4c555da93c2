"""Candidates run in a worker subprocess: a crash or a hang fails that candidate, nothing else."""

from __future__ import annotations

import textwrap

import optuna
import pytest

from qflash_gen.config import KernelConfig
from qflash_gen.tune.measure import GPUMeasurer, Protocol, ShapeSpec
from qflash_gen.tune.measure.isolation import IsolatedRunner, WorkerError
from qflash_gen.tune.space import Grid, SearchSpace
from qflash_gen.tune.study import run_study

FAKE_TARGET = textwrap.dedent(
    '''
    """Fake worker targets: misbehave on purpose (no torch, so a worker starts in ~0.1 s)."""
    import os
    import time


    def by_mode(job):
        mode = job["mode"]
        if mode == "abort":
            os.abort()  # SIGABRT, as a crashing compiler or driver would
        if mode == "hang":
            time.sleep(3600)
        if mode == "raise":
            raise RuntimeError("out of resources: shared memory (fake)")
        print("noise on stdout must not break the protocol")
        return {"pid": os.getpid(), "echo": job.get("value")}


    def by_config(job):
        """Like qflash_gen.tune.measure.gpu_jobs.run_job, with behaviour chosen by the config."""
        cfg = job["config"]
        if cfg["block_m"] == 32:
            os.abort()
        if cfg["block_m"] == 128 and cfg["num_warps"] == 2:
            time.sleep(3600)
        lat = 10.0 + cfg["block_m"] / 16 + 8 / cfg["num_warps"]
        m = {"latency_us": lat, "spread_us": 0.1, "sqnr_db": 40.0, "correct": cfg["num_warps"] != 8, "error": None}
        if not m["correct"]:
            m["error"] = "output differs from the oracle (fake)"
        return {"measurements": [m for _ in job["shapes"]]}
    '''
)


@pytest.fixture
def fake_target(tmp_path):
    path = tmp_path / "fake_target.py"
    path.write_text(FAKE_TARGET)
    return str(path)


def test_crash_and_hang_fail_alone(fake_target):
    with IsolatedRunner(f"{fake_target}:by_mode", timeout_s=2.0, startup_timeout_s=30) as runner:
        first = runner.run({"mode": "ok", "value": 1})
        crashed = runner.run({"mode": "abort"})
        after_crash = runner.run({"mode": "ok", "value": 2})
        hung = runner.run({"mode": "hang"})
        after_hang = runner.run({"mode": "ok", "value": 3})
        raised = runner.run({"mode": "raise"})
        after_raise = runner.run({"mode": "ok", "value": 4})
    assert first.ok and first.result["echo"] == 1
    assert not crashed.ok and crashed.crashed and "SIGABRT" in crashed.error
    assert after_crash.ok and after_crash.result["pid"] != first.result["pid"]  # a fresh worker
    assert not hung.ok and hung.timed_out and 2.0 <= hung.seconds < 10
    assert after_hang.ok and after_hang.result["echo"] == 3
    assert not raised.ok and not raised.crashed and "out of resources" in raised.error
    assert after_raise.ok and after_raise.result["pid"] == after_hang.result["pid"]  # kept: not fatal
    assert runner.restarts == 2


def test_broken_target_is_a_clear_error(tmp_path):
    with pytest.raises(WorkerError, match="no_such_function"):
        IsolatedRunner(f"{tmp_path / 'nothing.py'}:no_such_function", timeout_s=5).run({})
    with pytest.raises(ValueError, match="target"):
        IsolatedRunner("no_colon_here")


def test_study_goes_on_past_crashing_and_hanging_candidates(fake_target):
    shape = ShapeSpec.of("swin_t_s4", 1)
    grid = Grid(
        block_m=(32, 64, 128), block_n=(64,), num_warps=(2, 4, 8), num_stages=(1,), exp=("poly2",), rescale=("shift8",)
    )
    space = SearchSpace(grid, shape.n, shape.d)
    assert space.size == 6  # block_m 128 is dropped for N=49: 64 already covers the row
    measurer = GPUMeasurer("fake", Protocol(), timeout_s=2.0, target=f"{fake_target}:by_config")
    try:
        result = run_study(
            shape, measurer, space, storage=optuna.storages.InMemoryStorage(), name="iso", budget=6, seed=0
        )
    finally:
        measurer.close()
    assert result.n_measured == 6  # the whole space, despite the failures
    by_m = {(r.config.block_m, r.config.num_warps): r.measurement for r in result.history}
    for w in (2, 4, 8):
        assert not by_m[(32, w)].correct and "SIGABRT" in by_m[(32, w)].error
    assert "differs from the oracle" in by_m[(64, 8)].error  # a wrong kernel is a failure, not a fast trial
    assert by_m[(64, 2)].ok and by_m[(64, 4)].ok
    assert result.best is not None and result.best.config.block_m == 64 and result.best.config.num_warps == 4


def test_hang_is_killed_by_the_timeout(fake_target):
    shape = ShapeSpec.of("vit_b", 1)
    hang = KernelConfig(block_m=128, block_n=64, num_warps=2)
    ok = KernelConfig(block_m=64, block_n=64, num_warps=4)
    with GPUMeasurer("fake", Protocol(), timeout_s=1.5, target=f"{fake_target}:by_config") as measurer:
        hung = measurer.measure(hang, shape)
        fine = measurer.measure(ok, shape)
    assert not hung.correct and "timed out after 1.5 s" in hung.error
    assert fine.ok and fine.latency_us == pytest.approx(10.0 + 4 + 2)


@pytest.mark.gpu
def test_real_worker_target_in_the_interpreter():
    """The GPU worker code path end to end on CPU (TRITON_INTERPRET=1, set by conftest): inputs,
    Swin shifted-window mask, kernel launch, oracle check, SQNR, and the environment report.
    Latencies here are interpreter wall-clock times and mean nothing."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("runs the worker through Triton's interpreter; on a GPU the gpu-marked sweep covers it")
    shape = ShapeSpec(workload="tiny_swin", batch=1, b=4, h=1, n=49, d=32, masked=True)  # 4 windows: shift mask
    config = KernelConfig(block_m=64, block_n=64, exp_variant="poly2")
    with GPUMeasurer("cpu", Protocol(), timeout_s=120) as measurer:
        env = measurer.environment()
        m = measurer.measure(config, shape)
    assert env["triton"] and env["template_sha256"]
    assert m.correct and m.error is None, m.error
    assert m.sqnr_db is not None and m.sqnr_db > 30.0


def test_swin_shift_mask_matches_swin():
    from qflash_gen.tune.measure.gpu_jobs import swin_shift_mask

    assert swin_shift_mask(1) is None and swin_shift_mask(3) is None
    mask = swin_shift_mask(4)  # 14x14 map, windows of 7, shift 3
    assert mask.shape == (4, 49, 49)
    assert bool(mask[0].all())  # the top-left window holds one region only
    assert bool(mask.diagonal(dim1=1, dim2=2).all())  # every token sees itself: no fully masked row
    assert not bool(mask[3].all())  # the bottom-right window mixes shifted regions
    assert int(mask[3].sum()) == 16**2 + 12**2 + 12**2 + 9**2  # region sizes 4x4, 4x3, 3x4, 3x3 tokens


@pytest.mark.gpu
@pytest.mark.cuda_only
def test_gpu_measurer_on_the_gpu_present():
    """On a CUDA machine: the real worker compiles, checks against the oracle and times."""
    from qflash_gen.gpu import current_gpu

    shape = ShapeSpec.of("swin_t_s1", 1)
    good = KernelConfig(block_m=64, block_n=64, exp_variant="poly2")
    with GPUMeasurer(current_gpu(), Protocol(warmup_ms=5, rep_ms=20), timeout_s=300) as measurer:
        env = measurer.environment()
        m = measurer.measure(good, shape)
        m8 = GPUMeasurer(current_gpu(), Protocol(out_dtype="int8", rep_ms=20), timeout_s=300)
        try:
            m_int8 = m8.measure(good, ShapeSpec.of("vit_b", 1))
        finally:
            m8.close()
    assert env["gpu"] == current_gpu() and env["device"]
    assert m.correct and m.error is None, m.error
    assert m.latency_us > 0 and m.spread_us >= 0 and m.sqnr_db > 30
    assert m_int8.correct and m_int8.error is None, m_int8.error
    assert m_int8.latency_us > 0 and m_int8.sqnr_db > 30
