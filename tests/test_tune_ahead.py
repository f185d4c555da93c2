"""Compiling ahead in a study (qflash_gen/tune/ahead.py, issue 17): the warm starts and each climb
stage are compiled as batches before they are measured, and nothing else changes.

The measurer here is a fake that "compiles" (it has ``precompile``) and records every call in
order; its latencies are invented and say nothing about a GPU."""

from __future__ import annotations

import os
import textwrap

import optuna
import pytest
import yaml

from qflash_gen.config import KernelConfig, default_config
from qflash_gen.reference import SQNR_FLOOR_DB
from qflash_gen.tune import cli
from qflash_gen.tune.ahead import compiles_ahead
from qflash_gen.tune.measure import GPUMeasurer, Measurement, Measurer, Protocol, ShapeSpec
from qflash_gen.tune.space import Grid, SearchSpace
from qflash_gen.tune.staged import STAGES, Climb
from qflash_gen.tune.study import run_study
from qflash_gen.tune.trials import TrialRecord

VIT = ShapeSpec.of("vit_b", 8)
GRID = Grid(
    block_m=(32, 64, 128), block_n=(64, 128, 256), num_warps=(2, 4, 8), num_stages=(1, 2, 3),
    exp=("poly2",), rescale=("split",), p_bits=(14,),
)  # fmt: skip


def _latency(c: KernelConfig) -> float:  # invented, with a single optimum the climb reaches
    return 20.0 - 4.0 * (c.block_n == 256) + abs(c.block_m - 64) / 16 + abs(c.num_warps - 4) + 0.5 * c.num_stages


class CompilingMeasurer(Measurer):
    """A measurer with ``precompile``: ``log`` holds ``("compile", configs, jobs)`` and
    ``("measure", config)`` in call order."""

    def __init__(self, gpu: str = "fake") -> None:
        self.gpu = gpu
        self.log: list[tuple] = []

    @property
    def protocol(self) -> dict:
        return {"fake": "invented latencies"}

    def measure(self, config: KernelConfig, shape: ShapeSpec) -> Measurement:
        self.log.append(("measure", config))
        lat = _latency(config)
        return Measurement(latency_us=lat, spread_us=0.001 * lat, sqnr_db=40.0, correct=True)

    def precompile(self, items, jobs, progress=None) -> dict[str, str]:
        assert all(len(shapes) == 1 for _, shapes in items)
        self.log.append(("compile", [c for c, _ in items], jobs))
        return {}

    def batches(self) -> list[list[KernelConfig]]:
        return [e[1] for e in self.log if e[0] == "compile"]

    def measured(self) -> list[KernelConfig]:
        return [e[1] for e in self.log if e[0] == "measure"]


def _warm(space: SearchSpace) -> list[KernelConfig]:
    """Three warm starts far from the optimum (multi-pass tiles), one of them twice."""
    base = space.adapt(default_config(VIT.n, VIT.d).replace(block_n=64, block_m=128, num_warps=8, num_stages=1))
    others = [base.replace(num_warps=2), base.replace(block_m=32)]
    return [base, *others, base]


def _study(measurer, space, *, budget, compile_jobs, storage=None, on_compile=None):
    return run_study(
        VIT, measurer, space, storage=storage or optuna.storages.InMemoryStorage(), name="ahead", budget=budget,
        seed=0, enqueue=_warm(space), compile_jobs=compile_jobs, on_compile=on_compile,
    )  # fmt: skip


def test_warm_starts_then_each_climb_stage_compile_as_batches_before_they_are_measured():
    space = SearchSpace(GRID, VIT.n, VIT.d)
    warm = list(dict.fromkeys(_warm(space)))
    measurer = CompilingMeasurer()
    announced = []
    result = _study(measurer, space, budget=20, compile_jobs=4, on_compile=lambda n, j: announced.append((n, j)))
    log, batches = measurer.log, measurer.batches()
    assert log[0] == ("compile", warm, 3)  # the warm starts first, all of them, in order (3 jobs: 3 configs)
    assert measurer.measured()[:3] == warm
    # the climb's first stage: every tiling move around the fastest warm start, as one batch,
    # compiled after the warm starts were measured and before any of its moves is
    records = [TrialRecord(i, c, Measurement(_latency(c), 0.0, 40.0, True)) for i, c in enumerate(warm)]
    stage = Climb(space, SQNR_FLOOR_DB).propose(records)
    centre = min(warm, key=_latency)
    assert stage and all(sum(getattr(c, a) != getattr(centre, a) for a in STAGES[0]) == 1 for c in stage)
    assert log[4] == ("compile", stage, 4)
    assert len(batches) >= 3  # the centre moved at least once: its own stage is another batch
    # every measured config was compiled in a batch before its measurement, and compiled once
    compiled_before: set[KernelConfig] = set()
    for entry in log:
        if entry[0] == "compile":
            assert not compiled_before & set(entry[1])
            compiled_before |= set(entry[1])
        else:
            assert entry[1] in compiled_before, entry[1].short()
    assert sum(len(b) for b in batches) <= 20  # never more than the budget left
    assert announced == [(len(b), min(4, len(b))) for b in batches]
    assert result.best.config == min(measurer.measured(), key=_latency)


def test_a_batch_is_cut_to_the_budget_left():
    space = SearchSpace(GRID, VIT.n, VIT.d)
    measurer = CompilingMeasurer()
    _study(measurer, space, budget=5, compile_jobs=8)
    batches = measurer.batches()
    assert [len(b) for b in batches] == [3, 2]  # 3 warm starts, then 2 of the first stage's moves
    assert measurer.measured() == batches[0] + batches[1]


def test_compile_jobs_0_never_compiles_and_the_results_are_the_same():
    space = SearchSpace(GRID, VIT.n, VIT.d)
    runs = {}
    for jobs in (0, 8):
        measurer = CompilingMeasurer()
        result = _study(measurer, space, budget=20, compile_jobs=jobs)
        runs[jobs] = (measurer, result)
    off, on = runs[0][0], runs[8][0]
    assert off.batches() == [] and on.batches()
    assert off.measured() == on.measured()
    trials = {j: [(r.number, r.config, r.measurement) for r in res.history] for j, (_, res) in runs.items()}
    assert trials[0] == trials[8]
    assert runs[0][1].best == runs[8][1].best
    assert not compiles_ahead(off, 0) and compiles_ahead(off, 1)


def test_a_measurer_without_precompile_is_not_asked():
    class Plain(CompilingMeasurer):
        precompile = None  # a replayed table's measurer has no precompile

    measurer = Plain()
    announced = []
    _study(measurer, SearchSpace(GRID, VIT.n, VIT.d), budget=6, compile_jobs=8, on_compile=lambda *a: announced.append(a))
    assert not compiles_ahead(measurer, 8) and announced == [] and len(measurer.measured()) == 6


@pytest.fixture
def cli_run(tmp_path, monkeypatch, capsys):
    """``qflash-tune`` with the fake measurer in place of the GPU's (gpu ``synthetic``)."""

    def run(name: str, *extra: str):
        measurer = CompilingMeasurer("synthetic")
        monkeypatch.setattr(cli, "live", lambda args: (measurer, "fp16"))
        argv = ["--workloads", "vit_b", "--batches", "8", "--grid", "small", "--trials", "12", "--study", name,
                "--storage", str(tmp_path / f"{name}.journal"), "--db", str(tmp_path / name), *extra]  # fmt: skip
        code = cli.main(argv)
        out, err = capsys.readouterr()
        assert code == 0, err
        doc = yaml.safe_load((tmp_path / name / "synthetic.yaml").read_text())
        return measurer, err, doc["entries"]

    return run


def test_the_cli_compiles_ahead_says_so_and_writes_the_same_entry_as_without(cli_run):
    on, err_on, entries_on = cli_run("on", "--compile-jobs", "3")
    off, err_off, entries_off = cli_run("off", "--compile-jobs", "0")
    batches = on.batches()
    assert batches and off.batches() == []
    assert f"vit_b b8: precompiling {len(batches[0])} configs (3 jobs)" in err_on  # a log: one line per batch
    assert err_on.count("precompiling") == len(batches) and "precompiling" not in err_off
    assert on.measured() == off.measured()
    (a,), (b,) = entries_on, entries_off
    keep = ("key", "config", "latency_us", "latency_spread_us", "sqnr_db", "trials")
    assert {k: a[k] for k in keep} == {k: b[k] for k in keep}


def test_negative_compile_jobs_is_a_usage_error(capsys):
    assert cli.main(["--workloads", "vit_b", "--compile-jobs", "-1"]) == 2
    assert "--compile-jobs -1 must be >= 0" in capsys.readouterr().err


COMPILE_TARGET = textwrap.dedent(
    '''
    """A fake compile worker (no torch): notes its pid beside this file; block_m 32 fails."""
    import os


    def compile_job(job):
        with open(os.path.join(os.path.dirname(__file__), "pids"), "a") as f:
            f.write(f"{os.getpid()}\\n")
        if job["config"]["block_m"] == 32:
            raise RuntimeError("out of resources (fake)")
        return {"compiled": 1}
    '''
)


def test_gpu_precompile_keeps_its_workers_between_batches_and_close_ends_them(tmp_path):
    """A study compiles many small batches: starting workers for each would cost seconds a batch."""
    (tmp_path / "target.py").write_text(COMPILE_TARGET)
    configs = [KernelConfig(block_m=m, block_n=64, num_warps=w) for m in (32, 64) for w in (2, 4)]
    items = [(c, (VIT,)) for c in configs]
    seen = []
    measurer = GPUMeasurer("fake", Protocol(), timeout_s=30, target=f"{tmp_path / 'target.py'}:compile_job")
    try:
        first = measurer.precompile(items, 2, lambda c, e: seen.append((c, e)))
        second = measurer.precompile(items[::-1], 2)
    finally:
        measurer.close()
    failed = {c.hash for c in configs if c.block_m == 32}
    assert set(first) == set(second) == failed and all("out of resources" in e for e in first.values())
    # progress comes as the compiles finish (any order), once per config
    assert sorted(c.hash for c, _ in seen) == sorted(c.hash for c in configs)
    assert {c.hash for c, e in seen if e} == failed
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 8 and len(set(pids)) <= 2  # 8 jobs, two workers at most, started once
    for pid in set(pids):  # closed with the measurer
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
