"""qflash-tune against a replayed table: the search, its rules, the DB entry and the CLI errors.

Most tables here are SYNTHETIC (tests/test_tune_synthetic.py): those tests check mechanics
(duplicates cost nothing, provenance is written, the front is the trials' front), not search
quality.  "Finds the recorded best" replays the recorded H100 table (tests/data/h100_sweep.csv),
on shapes where the search has something to find.
"""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from helpers import shipped_db_of
from test_tune_recorded import is_hard, measured_configs, plans_for, start_latency
from test_tune_synthetic import SYNTHETIC_GPU, synthetic_table  # noqa: F401 - fixture

from qflash_gen.config import KernelConfig
from qflash_gen.tune import cli
from qflash_gen.tune.measure.simulate import SimulatedMeasurer
from qflash_gen.tune.objective import TIE_REL_MAX
from qflash_gen.tune.space import Grid, SearchSpace
from qflash_gen.tune.study import run_study
from qflash_gen.tune.table import read_table

RECORDED_H100 = Path(__file__).parent / "data" / "h100_sweep.csv"


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _only_study_trials(journal) -> list:
    """The trials of the one study in a journal file, in the order they ran."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    (name,) = optuna.get_all_study_names(storage)
    return sorted(optuna.load_study(study_name=name, storage=storage).trials, key=lambda t: t.number)


@pytest.fixture
def dirs(tmp_path):
    return {"storage": tmp_path / "studies.journal", "db": tmp_path / "db"}


@pytest.mark.skipif(not RECORDED_H100.is_file(), reason="tests/data/h100_sweep.csv is not in this checkout")
def test_simulated_tuning_finds_the_recorded_best_and_writes_provenance(dirs, capsys, monkeypatch, tmp_path):
    """The recorded H100 table (real measurements), default options, on two shapes whose warm
    starts are all more than 3 % slower than the table's best: the study measures the table's
    best config, and the DB entry is it (or a simpler config within the tie rule's 2 %).  The
    runtime's pick comes from the shipped H100 file alone (the card that recorded the table)."""
    shipped_db_of(monkeypatch, tmp_path / "shipped", "h100")
    table = read_table(RECORDED_H100)
    argv = ["--simulate", RECORDED_H100, "--workloads", "vit_b,swin_t_s2", "--batches", "8",
            "--storage", dirs["storage"], "--db", dirs["db"], "--seed", "0"]  # fmt: skip
    plans = {p.shape.workload: p for p in plans_for(argv)}  # before the run writes the DB
    assert set(plans) == {"vit_b", "swin_t_s2"}
    for plan in plans.values():  # nothing to find would make this check pass on its first trial
        best_us = table.best("h100", plan.shape, 30.0).measurement.latency_us
        assert is_hard(start_latency(table, "h100", plan.shape, plan.enqueue, 30.0), best_us), plan.shape.label()
    code, out, err = _run(capsys, *argv, "--trials", "30")
    assert code == 0, err
    doc = yaml.safe_load((dirs["db"] / "h100.yaml").read_text())
    entries = {e["protocol"]["workload"]: e for e in doc["entries"]}
    assert set(entries) == {"vit_b", "swin_t_s2"}
    for workload, plan in plans.items():
        shape, e = plan.shape, entries[workload]
        best = table.best("h100", shape, 30.0)
        measured = measured_configs(dirs["storage"], plan.name)
        assert best.config in measured and len(measured) == 30  # found within the budget
        assert best.measurement.latency_us <= e["latency_us"] <= (1 + TIE_REL_MAX) * best.measurement.latency_us
        assert e["sqnr_db"] >= 30.0 and e["key"] == shape.key("fp16").to_str()
        config = KernelConfig.from_dict(e["config"])
        assert table.lookup("h100", shape, config).latency_us == pytest.approx(e["latency_us"], abs=1e-3)
        assert config in measured and config not in plan.enqueue
        # provenance: where the number comes from and how the search ran
        p = e["protocol"]
        assert p["source"] == "simulated" and p["table_sha256"] == table.sha256
        assert p["timing"] == "do_bench" and p["l2_flush"] is True and "oracle" in p["correctness"]
        assert p["tuner"]["sampler"] == "tpe" and p["tuner"]["sqnr_floor"] == 30.0 and p["tuner"]["seed"] == 0
        assert e["trials"] == p["tuner"]["measured"] == 30
        assert e["measured_on_device"] == table.environment["device"]
        assert e["measured_on_device"].startswith("NVIDIA H100")
        assert e["date"]
    assert "vit_b" in out and "added 2" in out


def test_duplicates_are_never_remeasured_and_rerun_resumes(synthetic_table, tmp_path):  # noqa: F811
    measurer = SimulatedMeasurer(synthetic_table)
    shape = measurer.shapes()[1]  # swin_t_s1 b8: 72 configs
    space = SearchSpace(Grid.from_configs(measurer.configs()), shape.n, shape.d)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.log")))
    first = run_study(shape, measurer, space, storage=storage, name="dup", budget=40, seed=1)
    assert measurer.calls == first.n_measured == 40
    assert len({r.config.hash for r in first.history}) == 40
    again = run_study(shape, measurer, space, storage=storage, name="dup", budget=40, seed=1)
    assert measurer.calls == 40 and again.new_measurements == 0  # nothing re-measured
    assert again.best.config == first.best.config
    more = run_study(shape, measurer, space, storage=storage, name="dup", budget=space.size, seed=1)
    assert measurer.calls == space.size == more.n_measured  # exhaustive: every config exactly once
    best = read_table(synthetic_table).best(SYNTHETIC_GPU, shape, 30.0)
    assert more.best.latency_us <= best.measurement.latency_us * 1.02  # the tie rule stays within noise


def test_db_best_is_enqueued_first(synthetic_table, dirs, capsys):  # noqa: F811
    from qflash_gen import db
    from qflash_gen.config import default_config
    from qflash_gen.tune.plan import db_file

    table = read_table(synthetic_table)
    shape = next(s for s in table.shapes(SYNTHETIC_GPU) if s.workload == "vit_b")
    rows = [r for r in table.rows_for(SYNTHETIC_GPU, shape) if r.measurement.feasible(30.0)]
    incumbent = sorted(rows, key=lambda r: r.measurement.latency_us)[len(rows) // 2]  # a middling config
    m = incumbent.measurement
    entry = db.Entry(
        key=shape.key("fp16"),
        config=incumbent.config,
        latency_us=m.latency_us,
        latency_spread_us=m.spread_us,
        sqnr_db=m.sqnr_db,
        trials=1,
        protocol={"source": "test incumbent"},
    )
    db.write_entries(db_file(dirs["db"], SYNTHETIC_GPU), [entry], gpu=SYNTHETIC_GPU)
    code, _, err = _run(
        capsys,
        "--simulate", synthetic_table, "--workloads", "vit_b", "--batches", "8", "--db", dirs["db"],
        "--trials", "3", "--storage", dirs["storage"],
    )  # fmt: skip
    assert code == 0, err
    trials = _only_study_trials(dirs["storage"])
    first, second = (KernelConfig.from_dict(t.user_attrs["config"]) for t in trials[:2])
    assert first == incumbent.config  # the DB's entry, re-measured under this run's protocol
    # then the safe default, mapped into the table's space (its 7-bit-P, shift8 grid)
    default = default_config(shape.n, shape.d)
    assert second.p_bits == 7 and second.rescale == "shift"
    assert (second.block_m, second.block_n, second.exp_variant) == (
        default.block_m,
        default.block_n,
        default.exp_variant,
    )


def test_winner_of_another_batch_bucket_is_enqueued(synthetic_table, dirs, capsys):  # noqa: F811
    """No entry for b=8's key, one for b=64's (same N and D): that config is the first trial."""
    from qflash_gen import db
    from qflash_gen.config import default_config
    from qflash_gen.keys import workload_key
    from qflash_gen.tune.plan import db_file

    table = read_table(synthetic_table)
    b8 = next(s for s in table.shapes(SYNTHETIC_GPU) if s.workload == "vit_b" and s.batch == 8)
    key64 = workload_key((64, b8.h, b8.n, b8.d), masked=b8.masked)
    assert key64 != b8.key("fp16")
    default = default_config(b8.n, b8.d)
    rows = [r for r in table.rows_for(SYNTHETIC_GPU, b8) if r.measurement.feasible(30.0)]
    other = next(r for r in rows if (r.config.block_m, r.config.block_n) != (default.block_m, default.block_n))
    m = other.measurement
    entry = db.Entry(
        key=key64, config=other.config, latency_us=m.latency_us,
        latency_spread_us=m.spread_us, sqnr_db=m.sqnr_db, trials=1, protocol={"source": "test b=64"},
    )  # fmt: skip
    db.write_entries(db_file(dirs["db"], SYNTHETIC_GPU), [entry], gpu=SYNTHETIC_GPU)
    code, _, err = _run(
        capsys,
        "--simulate", synthetic_table, "--workloads", "vit_b", "--batches", "8", "--db", dirs["db"],
        "--trials", "2", "--storage", dirs["storage"],
    )  # fmt: skip
    assert code == 0, err
    trials = _only_study_trials(dirs["storage"])
    assert KernelConfig.from_dict(trials[0].user_attrs["config"]) == other.config


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(latency, SQNR) ``a`` dominates ``b``: no slower, no less accurate, and not the same point."""
    return a[0] <= b[0] and a[1] >= b[1] and a != b


def _non_dominated(points: dict[str, tuple[float, float]]) -> set[str]:
    return {h for h, p in points.items() if not any(_dominates(o, p) for o in points.values())}


@pytest.mark.parametrize(
    "which, workloads",
    [("synthetic", "vit_b,swin_t_s1"), ("recorded", "vit_b")],  # vit_b's synthetic rows include failures
)
def test_pareto_objective_stores_the_front_of_all_trials(request, dirs, capsys, which, workloads):
    """``--objective pareto`` (NSGA-II, latency x SQNR): each stored front is exactly the set of
    non-dominated configs among ALL the study's correct, timed trials (COMPLETE: a failed or
    pruned trial has no point), computed here from the storage; restricted to the SQNR floor, it
    is the non-dominated set of the trials that meet the floor (a point below the floor can never
    dominate one above it)."""
    table_path = request.getfixturevalue("synthetic_table") if which == "synthetic" else RECORDED_H100
    if not Path(table_path).is_file():
        pytest.skip(f"{table_path} is not in this checkout")
    table = read_table(table_path)
    (gpu,) = table.gpus()
    code, out, err = _run(
        capsys,
        "--simulate", table_path, "--workloads", workloads, "--batches", "8", "--trials", "30",
        "--objective", "pareto", "--storage", dirs["storage"], "--db", dirs["db"],
    )  # fmt: skip
    assert code == 0, err
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(dirs["storage"])))
    names = optuna.get_all_study_names(storage)
    fronts = sorted((dirs["db"] / "fronts" / gpu).glob("*.yaml"))
    assert len(fronts) == len(names) == len(workloads.split(","))
    below_floor = failed = 0
    for path in fronts:
        doc = yaml.safe_load(path.read_text())
        shape = next(s for s in table.shapes(gpu) if s.workload == doc["workload"] and s.batch == doc["batch"])
        assert doc["key"] == shape.key("fp16").to_str() and path.stem == doc["key"]
        (name,) = [n for n in names if f"/{shape.workload}/b{shape.batch}/" in n]
        trials = optuna.load_study(study_name=name, storage=storage).trials
        failed += sum(1 for t in trials if t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("measured"))
        assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        # every correct, timed trial (measured ones and duplicates told a measured result): its point
        points: dict[str, tuple[float, float]] = {}
        for t in trials:
            if t.state != optuna.trial.TrialState.COMPLETE:
                continue
            lat, sqnr = t.values
            assert (lat, sqnr) == (t.user_attrs["latency_us"], t.user_attrs["sqnr_db"]) and t.user_attrs["correct"]
            config = KernelConfig.from_dict(t.user_attrs["config"])
            assert table.lookup(gpu, shape, config).latency_us == lat  # the table's number, replayed
            assert points.setdefault(config.hash, (lat, sqnr)) == (lat, sqnr)  # one config, one point
        assert sum(1 for t in trials if t.user_attrs.get("measured")) == 30
        want = _non_dominated(points)
        front = doc["front"]
        got = {KernelConfig.from_dict(p["config"]).hash: (p["latency_us"], p["sqnr_db"]) for p in front}
        assert len(got) == len(front)  # no config twice
        assert set(got) == want, (shape.label(), sorted(got.values()), sorted(points[h] for h in want))
        assert all(got[h] == points[h] for h in got)
        for p in front:  # each point names the trial that measured it
            t = next(t for t in trials if t.number == p["trial"])
            assert t.user_attrs["measured"] and KernelConfig.from_dict(t.user_attrs["config"]).to_dict() == p["config"]
        pts = [(p["latency_us"], p["sqnr_db"]) for p in front]
        assert pts == sorted(pts) and len(pts) >= 1
        for (l1, s1), (l2, s2) in zip(pts, pts[1:], strict=False):
            assert l1 < l2 and s1 < s2  # faster points give up accuracy: nothing dominated
        feasible = {h: p for h, p in points.items() if p[1] >= 30.0}
        below_floor += len(points) - len(feasible)
        assert {h for h in got if got[h][1] >= 30.0} == _non_dominated(feasible)
        printed = re.search(rf"^front {re.escape(shape.label())}: (.*)$", out, re.M).group(1)
        assert printed == ", ".join(f"{lat:.1f}us/{sqnr:.1f}dB" for lat, sqnr in pts)
    # the cases the check must see: points below the floor, and (synthetic vit_b) a failed trial
    assert below_floor > 0 and (failed > 0 or which == "recorded")


def test_exhaustive_replay_records_and_resumes(synthetic_table, tmp_path, capsys):  # noqa: F811
    record = tmp_path / "replay.csv"
    args = ["--simulate", synthetic_table, "--workloads", "swin_t_s1", "--batches", "8", "--exhaustive"]
    code, _, err = _run(capsys, *args, "--record", record, "--quiet")
    assert code == 0, err
    src, got = read_table(synthetic_table), read_table(record)
    shape = src.shapes(SYNTHETIC_GPU)[1]
    assert len(got) == len(src.rows_for(SYNTHETIC_GPU, shape))
    for row in got.rows:
        assert src.lookup(SYNTHETIC_GPU, row.shape, row.config) == row.measurement
    code, _, err = _run(capsys, *args, "--record", record, "--quiet")
    assert code == 0 and "to measure: 0 configs" in err
    assert len(read_table(record)) == len(got)


def test_gpu_not_present_is_a_clear_error(capsys):
    code, _, err = _run(capsys, "--gpu", "a100", "--workloads", "vit_b", "--trials", "1")
    assert code == 2
    if not torch.cuda.is_available():
        assert "--gpu a100" in err and "no CUDA GPU is present" in err and "--simulate" in err
    else:
        from qflash_gen.gpu import current_gpu

        if current_gpu() == "a100":
            pytest.skip("this machine has an A100")
        assert f"--gpu a100 does not match the GPU present: {current_gpu()}" in err


def test_gpu_not_matching_the_table_is_a_clear_error(synthetic_table, capsys):  # noqa: F811
    code, _, err = _run(
        capsys, "--simulate", synthetic_table, "--gpu", "a100", "--workloads", "vit_b", "--batches", "8"
    )
    assert code == 2 and "--gpu a100" in err and SYNTHETIC_GPU in err


def test_unknown_gpu_name_lists_known(capsys):
    code, _, err = _run(capsys, "--gpu", "h1000", "--workloads", "vit_b")
    assert code == 2 and "h1000" in err and "h100" in err and "a100" in err


def test_unknown_workload_is_a_clear_error(synthetic_table, capsys):  # noqa: F811
    code, _, err = _run(capsys, "--simulate", synthetic_table, "--workloads", "vit_b,vit_huge")
    assert code == 2 and "--workloads" in err and "'vit_huge'" in err and "swin_t" in err and "A1" in err


def test_try_configs_are_measured_first_as_given(synthetic_table, dirs, capsys):  # noqa: F811
    """--try puts a config ahead of the DB's seeds; one the study's space cannot hold is skipped."""
    table = read_table(synthetic_table)
    shape = next(s for s in table.shapes(SYNTHETIC_GPU) if s.workload == "vit_b" and s.batch == 8)
    rows = sorted(
        (r for r in table.rows_for(SYNTHETIC_GPU, shape) if r.measurement.feasible(30.0)),
        key=lambda r: -r.measurement.latency_us,
    )
    slow = rows[0].config  # the slowest feasible config: no seed would start there
    text = ",".join(f"{k}={v}" for k, v in slow.to_dict().items())
    code, _, err = _run(
        capsys,
        "--simulate", synthetic_table, "--workloads", "vit_b", "--batches", "8", "--db", dirs["db"],
        "--trials", "2", "--storage", dirs["storage"], "--try", "p_bits=14,block_n=256", "--try", text,
    )  # fmt: skip
    assert code == 0, err
    trials = _only_study_trials(dirs["storage"])
    assert KernelConfig.from_dict(trials[0].user_attrs["config"]) == slow  # the 14-bit one is not in the table


def test_try_with_a_bad_config_names_the_flag(synthetic_table, capsys):  # noqa: F811
    code, _, err = _run(capsys, "--simulate", synthetic_table, "--workloads", "vit_b", "--try", "block_m=48")
    assert code == 2 and "--try" in err and "block_m" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--trials", "0"], "--trials"),
        (["--exhaustive"], "--record"),
        (["--batches", "8,x"], "--batches"),
        (["--sqnr-floor", "nan"], "--sqnr-floor"),
    ],
)
def test_bad_arguments_name_the_flag(synthetic_table, capsys, argv, needle):  # noqa: F811
    code, _, err = _run(capsys, "--simulate", synthetic_table, "--workloads", "vit_b", *argv)
    assert code == 2 and needle in err
    assert "Traceback" not in err


def test_missing_shape_in_table_is_reported(synthetic_table, dirs, capsys):  # noqa: F811
    code, _, err = _run(
        capsys, "--simulate", synthetic_table, "--workloads", "vit_b", "--batches", "64", "--storage", dirs["storage"]
    )
    assert code == 2 and "none of the requested shapes" in err and "vit_b b8" in err


def test_rdb_storage_url_resumes(synthetic_table, tmp_path, capsys):  # noqa: F811
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    args = ["--simulate", synthetic_table, "--workloads", "swin_t_s1", "--batches", "8", "--no-db", "--storage", url]
    assert _run(capsys, *args, "--trials", "5")[0] == 0
    code, out, _ = _run(capsys, *args, "--trials", "8")
    assert code == 0 and "8/72" in out  # 5 kept from the first run, 3 new
    (name,) = optuna.get_all_study_names(url)
    trials = optuna.load_study(study_name=name, storage=url).trials
    assert sum(1 for t in trials if t.user_attrs.get("measured")) == 8


def test_storage_url_that_cannot_open_names_the_flag(synthetic_table, capsys):  # noqa: F811
    code, _, err = _run(
        capsys, "--simulate", synthetic_table, "--workloads", "swin_t_s1", "--batches", "8",
        "--storage", "nosuchdb://user:secret@host/db",
    )  # fmt: skip
    assert code == 2 and "--storage" in err and "secret" not in err
