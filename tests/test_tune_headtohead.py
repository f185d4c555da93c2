"""Issue 17 on a GPU that was idle: the timed worker warms the GPU before its first timing, and the
DB decision (keep the runtime's pick or write the study's best) rests on a final head-to-head of
the two, measured back to back, not on the study's first, cold measurement of the pick.

The GPU is faked: :class:`ColdGPU` is a measurer with the GPU's head-to-head rounds whose first
measurements are 4x slow with a large spread (what an H200 at 345 MHz gave), and the warm-up
tests replace the device calls of :mod:`qflash_gen.tune.measure.gpu_jobs`."""

from __future__ import annotations

import json
import re
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import yaml

from qflash_gen import db
from qflash_gen.config import KernelConfig
from qflash_gen.tune import cli, incumbent
from qflash_gen.tune.headtohead import HEAD_TO_HEAD_ATTR, HeadToHead
from qflash_gen.tune.measure import GPUMeasurer, Measurement, Measurer, Protocol, ShapeSpec
from qflash_gen.tune.measure.base import GPU_WARMUP_MAX_S, GPU_WARMUP_S
from qflash_gen.tune.measure.simulate import SimulatedMeasurer
from qflash_gen.tune.space import SearchSpace, get_grid
from qflash_gen.tune.study import run_study

SHAPE = ShapeSpec.of("vit_b", 1)
FLOOR = 30.0
BEST_US = 8.8


class ColdGPU(Measurer):
    """A fake GPU measurer: every config runs at ``BEST_US`` except those in ``true`` (µs); the
    first ``cold`` measurements of the process come out 4x slow with a wide spread (an idle GPU
    ramping its clocks).  ``log`` holds every config measured, in order."""

    head_to_head_rounds = 3  # as GPUMeasurer

    def __init__(self, true: dict[str, float], cold: int = 3, gpu: str = "h100") -> None:
        self.gpu = gpu
        self.true = true
        self.cold = cold
        self.log: list[KernelConfig] = []

    @property
    def protocol(self) -> dict:
        return {"fake": "a GPU that was idle: the first measurements are slow"}

    def measure(self, config: KernelConfig, shape: ShapeSpec) -> Measurement:
        self.log.append(config)
        lat = self.true.get(config.hash, BEST_US)
        if len(self.log) <= self.cold:
            return Measurement(latency_us=4.0 * lat + len(self.log), spread_us=28.8, sqnr_db=40.0, correct=True)
        return Measurement(latency_us=lat, spread_us=0.05, sqnr_db=40.0, correct=True)


def _space() -> SearchSpace:
    return SearchSpace(get_grid("tune"), SHAPE.n, SHAPE.d)


def _two(space: SearchSpace) -> tuple[KernelConfig, KernelConfig]:
    """Two distinct kernels of the space: the runtime's pick and another."""
    configs = [c for c in space.configs() if not c.max_regs and c.heads_per_program == 1][:50]
    current = configs[0]
    other = next(c for c in configs if not space.equivalent(c, current))
    return current, other


def _study_of(measurer: Measurer, space: SearchSpace, current: KernelConfig, other: KernelConfig):
    storage = optuna.storages.InMemoryStorage()
    result = run_study(SHAPE, measurer, space, storage=storage, name="duel", budget=2, enqueue=[current, other])
    return optuna.load_study(study_name="duel", storage=storage), result


@pytest.mark.parametrize("true_current", [BEST_US * 1.005, BEST_US * 0.97])
def test_a_cold_first_measurement_of_the_pick_neither_claims_4x_nor_replaces_it(true_current):
    """The pick is measured first, cold (4x slow); the head-to-head measures both again,
    alternating, finds it as fast as the best (a tie, 0.5 % slower) or faster: it is kept, and
    `vs current` is the ratio of the head-to-head medians, not of the cold measurement."""
    space = _space()
    current, other = _two(space)
    gpu = ColdGPU({current.hash: true_current}, cold=1)
    study, result = _study_of(gpu, space, current, other)
    assert [c.hash for c in gpu.log] == [current.hash, other.hash]
    assert result.best.config == other  # the study's records: the cold pick looks 4x slower
    pick = incumbent.CurrentPick(current, "exact")
    before = incumbent.judge(result, space, pick, floor=FLOOR)
    assert before.pick.config == other and before.ratio(before.current) > 3.9  # the claim
    duel = incumbent.head_to_head(study, result, space, pick, gpu, floor=FLOOR)
    assert [c.hash for c in gpu.log[2:]] == [other.hash, current.hash] * 3  # A B A B A B
    v = incumbent.judge(result, space, pick, floor=FLOOR, duel=duel)
    assert v.pick.config == current and not v.write  # exact: the DB keeps it, nothing written
    assert v.ratio(v.current) == pytest.approx(1.0)
    assert v.pick.latency_us == pytest.approx(true_current)
    assert "head-to-head, 3 rounds each, alternating: best 8.80 vs current" in v.note and "nothing written" in v.note
    assert "improves" not in v.note
    assert HeadToHead.from_attr(study.user_attrs[HEAD_TO_HEAD_ATTR]) == duel  # for --export
    nearest = incumbent.judge(result, space, incumbent.CurrentPick(current, "nearest:x"), floor=FLOOR, duel=duel)
    assert nearest.pick.config == current and nearest.write  # written as this GPU's exact entry ...
    assert nearest.pick.latency_us == pytest.approx(true_current)  # ... with the head-to-head's median


def test_a_genuinely_faster_best_still_wins_with_the_head_to_head_ratio():
    space = _space()
    current, other = _two(space)
    gpu = ColdGPU({current.hash: 12.6}, cold=1)
    study, result = _study_of(gpu, space, current, other)
    pick = incumbent.CurrentPick(current, "exact")
    duel = incumbent.head_to_head(study, result, space, pick, gpu, floor=FLOOR)
    v = incumbent.judge(result, space, pick, floor=FLOOR, duel=duel)
    assert v.pick.config == other and v.write
    assert v.ratio(v.current) == pytest.approx(12.6 / BEST_US)
    assert f"improves on the runtime's pick (exact, {current.short()}) by {12.6 / BEST_US:.2f}x" in v.note
    assert f"best {BEST_US:.2f} vs current 12.60 us (medians)" in v.note


def test_no_head_to_head_without_rounds_or_where_the_pick_is_the_best():
    space = _space()
    current, other = _two(space)
    gpu = ColdGPU({}, cold=0)
    study, result = _study_of(gpu, space, current, other)
    n = len(gpu.log)
    gpu.head_to_head_rounds = 0  # a replayed table's measurer
    assert incumbent.head_to_head(study, result, space, incumbent.CurrentPick(current, "exact"), gpu, floor=FLOOR) is None
    gpu.head_to_head_rounds = 3
    same = incumbent.CurrentPick(result.best.config, "exact")
    assert incumbent.head_to_head(study, result, space, same, gpu, floor=FLOOR) is None
    assert len(gpu.log) == n and HEAD_TO_HEAD_ATTR not in study.user_attrs
    assert SimulatedMeasurer.head_to_head_rounds == 0 and GPUMeasurer.head_to_head_rounds == 3


def _entry(db_dir: Path, config: KernelConfig) -> None:
    entry = db.Entry(
        key=SHAPE.key("fp16"), config=config, latency_us=9.0, latency_spread_us=0.1, sqnr_db=40.0, trials=1,
        protocol={"source": "test: the runtime's pick"},
    )  # fmt: skip
    db.write_entries(db_dir / "h100.yaml", [entry], gpu="h100")


def _tune(monkeypatch, capsys, tmp_path, gpu: Measurer, trials: int = 2, batches: str = "1"):
    """qflash-tune on vit_b with the fake GPU ``gpu``: (exit code, stdout, stderr)."""
    monkeypatch.setattr(cli, "live", lambda args: (gpu, "fp16"))
    code = cli.main(
        ["--gpu", "h100", "--workloads", "vit_b", "--batches", batches, "--trials", str(trials), "--warm-start", "db",
         "--db", str(tmp_path / "db"), "--storage", str(tmp_path / "s.journal"), "--compile-jobs", "0", "--quiet"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    return code, out, err


def _vs_current(out: str) -> str:
    row = next(line for line in out.splitlines() if line.startswith("│ vit_b"))
    return row.strip("│").split("│")[-1].strip()


def test_cli_cold_pick_as_fast_as_the_best_is_kept_and_vs_current_is_honest(monkeypatch, capsys, tmp_path):
    """``qflash-tune`` with the fake GPU, the issue's H200 run: the runtime's exact entry is
    measured first and the first three measurements are cold (4x, spread 28.8 µs); the search's
    best is a config 0.5 % faster than the pick; the head-to-head keeps the pick, writes nothing,
    and the summary says 1.00x, not the cold ~4x."""
    current, _ = _two(_space())
    _entry(tmp_path / "db", current)
    before = (tmp_path / "db" / "h100.yaml").read_text()
    gpu = ColdGPU({current.hash: BEST_US * 1.005}, cold=3)
    code, out, err = _tune(monkeypatch, capsys, tmp_path, gpu, trials=5)
    assert code == 0, err
    assert gpu.log[0] == current  # measured first (cold)
    assert len(gpu.log) == 5 + 6  # the study's trials, then the head-to-head's six
    assert (tmp_path / "db" / "h100.yaml").read_text() == before
    assert _vs_current(out) == "1.00x"
    assert not re.search(r"improves on .* by [2-9]\.\d\dx", out), out
    flat = " ".join(out.split())  # the console wraps long lines
    assert "ties with the best (head-to-head, 3 rounds each, alternating: best 8.80 vs current 8.84 us" in flat
    assert "the study's one measurement of it: 36.38" in flat
    assert "the DB keeps it, nothing written" in flat


def test_cli_a_faster_best_is_written_with_the_head_to_head_evidence(monkeypatch, capsys, tmp_path):
    current, _ = _two(_space())
    _entry(tmp_path / "db", current)
    gpu = ColdGPU({current.hash: 12.6}, cold=1)
    code, out, err = _tune(monkeypatch, capsys, tmp_path, gpu)
    assert code == 0, err
    assert _vs_current(out) == f"{12.6 / BEST_US:.2f}x"
    (entry,) = yaml.safe_load((tmp_path / "db" / "h100.yaml").read_text())["entries"]
    assert KernelConfig.from_dict(entry["config"]) != current and entry["latency_us"] == pytest.approx(BEST_US)
    h2h = entry["protocol"]["tuner"]["head_to_head"]
    assert h2h["rounds"] == 3 and h2h["current_pick"]["median_us"] == pytest.approx(12.6)
    assert "head-to-head" in entry["protocol"]["tuner"]["improves_on"]
    # --export decides from the head-to-head stored on the study: the same verdict, nothing measured
    code = cli.main(["--export", "--gpu", "h100", "--workloads", "vit_b", "--batches", "1", "--storage",
                     str(tmp_path / "s.journal"), "--db", str(tmp_path / "export"), "--quiet"])  # fmt: skip
    out2, err2 = capsys.readouterr()
    assert code == 0, err2
    assert _vs_current(out2) == f"{12.6 / BEST_US:.2f}x"


def test_simulate_runs_no_head_to_head(monkeypatch, capsys, tmp_path):
    """A replayed table measures each config once, as before: no extra measurement, no stored
    head-to-head (its console output is checked byte for byte by tests/test_docs.py)."""
    table = Path(__file__).parent / "data" / "h100_sweep.csv"
    if not table.is_file():
        pytest.skip("tests/data/h100_sweep.csv is not in this checkout")
    calls = []
    real = SimulatedMeasurer.measure
    monkeypatch.setattr(SimulatedMeasurer, "measure", lambda self, c, s: calls.append(c) or real(self, c, s))
    code = cli.main(["--simulate", str(table), "--workloads", "vit_b", "--batches", "8", "--trials", "6",
                     "--db", str(tmp_path / "db"), "--storage", str(tmp_path / "s.journal"), "--quiet"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "s.journal")))
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    measured = [t for t in study.trials if t.user_attrs.get("measured")]
    outside = 1 if "measurement" in (study.user_attrs.get(incumbent.CURRENT_ATTR) or {}) else 0
    assert len(calls) == len(measured) + outside
    assert HEAD_TO_HEAD_ATTR not in study.user_attrs and "head-to-head" not in out


# -- the warm-up ----------------------------------------------------------------------------------


def test_warm_up_is_bounded_and_reports_the_clocks():
    from qflash_gen.tune.measure import gpu_jobs

    class Fake:
        device = __import__("torch").device("cuda")  # never touched: the chunk replaces the device calls

    chunks = []
    got = gpu_jobs.warm_up(Fake.device, chunk=lambda: (chunks.append(1), time.sleep(0.002)), clock=iter([345.0, 1980.0]).__next__)
    assert got["ran"] and got["sm_clock_mhz"] == [345.0, 1980.0] and got["chunks"] == len(chunks) > 10
    assert GPU_WARMUP_S * 1e3 <= got["ms"] < GPU_WARMUP_MAX_S * 1e3 + 50
    slow_start = [0.4]  # cuBLAS's start eats most of the budget: the whole stays bounded

    def chunk():
        time.sleep(slow_start.pop() if slow_start else 0.002)

    t0 = time.perf_counter()
    got = gpu_jobs.warm_up(Fake.device, chunk=chunk, clock=lambda: None)
    assert time.perf_counter() - t0 < GPU_WARMUP_MAX_S + 0.05 and got["sm_clock_mhz"] == [None, None]
    assert gpu_jobs.warm_up(__import__("torch").device("cpu")) == {"ran": False, "why": "no CUDA device"}


WARM_TARGET = textwrap.dedent(
    """
    import json
    import os

    from qflash_gen.tune.measure import gpu_jobs, warmup
    from qflash_gen.tune.measure.base import Measurement

    LOG = os.environ["FAKE_LOG"]


    def note(what):
        with open(LOG, "a") as fh:
            fh.write(json.dumps([what, os.getpid()]) + "\\n")


    def warm_up(device):
        note("warmup")
        return {"ran": True, "ms": 250.0, "chunks": 9, "sm_clock_mhz": [345.0, 1980.0]}


    def measure_one(cfg, shape, protocol):
        note("measure")
        return Measurement(latency_us=9.0, spread_us=0.1, sqnr_db=40.0, correct=True)


    warmup.warm_up = warm_up  # the device calls, faked; run_job itself is the real one
    gpu_jobs.measure_one = measure_one


    def job(job):
        if job.get("op") == "measure" and job["config"]["num_warps"] == 8:
            os.abort()  # the worker dies: the next job starts a fresh one, which warms again
        return gpu_jobs.run_job(job)
    """
)


def test_the_timed_worker_warms_once_before_its_first_timing_and_after_a_restart(tmp_path):
    (tmp_path / "target.py").write_text(WARM_TARGET)
    log = tmp_path / "events"
    ok, crash = KernelConfig(block_m=64, block_n=64, num_warps=4), KernelConfig(block_m=64, block_n=64, num_warps=8)
    with GPUMeasurer("fake", Protocol(), timeout_s=120, target=f"{tmp_path / 'target.py'}:job",
                     env={"FAKE_LOG": str(log)}) as measurer:  # fmt: skip
        assert measurer.measure(ok, SHAPE).ok and measurer.measure(ok, SHAPE).ok
        assert not measurer.measure(crash, SHAPE).ok
        assert measurer.measure(ok, SHAPE).ok
        assert "gpu_warmup" in measurer.provenance
    events = [tuple(json.loads(line)) for line in log.read_text().splitlines()]
    pids = list(dict.fromkeys(pid for _, pid in events))
    assert len(pids) == 2
    assert [w for w, pid in events if pid == pids[0]] == ["warmup", "measure", "measure"]
    assert [w for w, pid in events if pid == pids[1]] == ["warmup", "measure"]
    assert len(measurer.warmups) == 2 and measurer.warmups[0]["sm_clock_mhz"] == [345.0, 1980.0]


def test_a_failed_round_leaves_the_decision_to_the_studys_records_and_says_so():
    space = _space()
    current, other = _two(space)
    gpu = ColdGPU({current.hash: 12.6}, cold=0)
    _, result = _study_of(gpu, space, current, other)
    fine = Measurement(latency_us=BEST_US, spread_us=0.05, sqnr_db=40.0, correct=True)
    duel = HeadToHead(other, current, (fine,) * 3, (fine, Measurement.failed("worker was killed by SIGKILL"), fine))
    v = incumbent.judge(result, space, incumbent.CurrentPick(current, "exact"), floor=FLOOR, duel=duel)
    assert v.pick.config == other and v.head_to_head is None
    assert v.note.endswith("(in the study's records; head-to-head, 3 rounds each: a round failed)")
