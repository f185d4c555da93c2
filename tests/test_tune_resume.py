"""kill -9 in the middle of a study, rerun: every finished trial is still there, unchanged, none
re-measured; the rerun continues the study and writes the whole study's best into the DB."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from test_tune_synthetic import synthetic_table  # noqa: F401 - fixture

from qflash_gen.config import KernelConfig
from qflash_gen.tune import lease
from qflash_gen.tune.measure import ShapeSpec
from qflash_gen.tune.objective import TIE_REL_MAX
from qflash_gen.tune.table import read_table
from qflash_gen.tune.trials import record_from_trial, select_best

BUDGET = 16


def _study(path) -> optuna.Study | None:
    """The one tuning study in the journal (None before it is created)."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    names = [n for n in optuna.get_all_study_names(storage) if not lease.is_lease_name(n)]
    if not names:
        return None
    assert len(names) == 1, names  # a rerun resumes the study; it never starts another
    return optuna.load_study(study_name=names[0], storage=storage)


def _snapshot(path) -> dict[int, tuple]:
    """Finished trials of the one study in the journal: number → (state, params, values, config
    hash, latency, SQNR, correct, measured, duplicate_of)."""
    study = _study(path)
    if study is None:
        return {}
    finished = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    return {
        t.number: (
            t.state,
            dict(t.params),
            None if t.values is None else tuple(t.values),
            t.user_attrs.get("config_hash"),
            t.user_attrs.get("latency_us"),
            t.user_attrs.get("sqnr_db"),
            t.user_attrs.get("correct"),
            t.user_attrs.get("measured"),
            t.user_attrs.get("duplicate_of"),
        )
        for t in study.get_trials(deepcopy=False, states=finished)
    }


MEASURED = 7  # index of "measured" in a snapshot's tuple


def _cmd(table, journal, db, delay):
    return [
        sys.executable, "-m", "qflash_gen.tune.cli",
        "--simulate", str(table), "--simulate-delay", str(delay),
        "--workloads", "swin_t_s1", "--batches", "8", "--trials", str(BUDGET),
        "--storage", str(journal), "--db", str(db), "--quiet",
    ]  # fmt: skip


def test_kill_and_resume_keeps_every_finished_trial(synthetic_table, tmp_path):  # noqa: F811
    """kill -9 after a few measurements, then the same command: the rerun continues the same study
    (every trial finished before the kill is there, unchanged, under its number; the new trials
    come after it; the budget is completed, no config measured twice), and the DB entry it writes
    at the end is the best feasible trial of the whole study, under the shape's key."""
    journal, db = tmp_path / "studies.journal", tmp_path / "db"
    proc = subprocess.Popen(_cmd(synthetic_table, journal, db, 0.25), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        before: dict[int, tuple] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists():
                before = _snapshot(journal)
                if sum(1 for v in before.values() if v[MEASURED]) >= 4:
                    break
            time.sleep(0.2)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)  # our own child, by pid
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = _snapshot(journal)  # what had finished when it died
    measured_before = {n: v for n, v in before.items() if v[MEASURED]}
    assert 4 <= len(measured_before) < BUDGET
    assert not (db / "synthetic.yaml").exists()  # killed before its end: nothing written yet
    killed = _study(journal)
    at_kill = {t.number: t.state for t in killed.trials}  # finished, in flight (RUNNING), enqueued (WAITING)
    assert set(before) <= set(at_kill)
    name_before = killed.study_name

    rerun = subprocess.run(_cmd(synthetic_table, journal, db, 0.0), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = _snapshot(journal)
    for number, value in before.items():
        assert after[number] == value  # nothing finished was lost or changed: state, params, values, result
    measured = {n: v for n, v in after.items() if v[MEASURED]}
    hashes = [v[3] for v in measured.values()]
    assert len(hashes) == BUDGET  # the rerun completed the budget ...
    assert len(set(hashes)) == BUDGET  # ... without measuring any config twice
    # ... by continuing the study: its trials come after the killed run's, and it measured only what was left
    study = _study(journal)
    assert study.study_name == name_before
    assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))
    new = {n: v for n, v in measured.items() if n not in before}
    assert len(new) == BUDGET - len(measured_before) and min(new) > max(before)
    # ... in the killed process's slot (one budget of BUDGET, not a second one)
    assert {t.user_attrs["measured_by"]["worker"] for t in study.trials if t.user_attrs.get("measured")} == {0}
    # the trial that was in flight when killed is marked failed, not left running forever
    assert not study.get_trials(states=(TrialState.RUNNING,))
    in_flight = [t for t in study.trials if at_kill.get(t.number) == TrialState.RUNNING]
    assert all(t.state == TrialState.FAIL and not t.user_attrs.get("measured") for t in in_flight)
    assert all(KernelConfig.from_dict(t.user_attrs["config"]) for t in study.trials if t.user_attrs.get("measured"))

    # the DB entry written at the end: the shape's key, the best feasible trial of the whole study
    doc = yaml.safe_load((db / "synthetic.yaml").read_text())
    (entry,) = doc["entries"]
    shape = ShapeSpec.of("swin_t_s1", 8)
    assert entry["key"] == shape.key("fp16").to_str()
    records = [r for r in map(record_from_trial, study.trials) if r is not None]
    assert len(records) == BUDGET
    feasible = [r for r in records if r.measurement.feasible(30.0)]
    fastest = min(r.latency_us for r in feasible)
    pick = select_best(records, 30.0)
    config = KernelConfig.from_dict(entry["config"])
    assert config == pick.config and entry["latency_us"] == pytest.approx(pick.latency_us, abs=1e-9)
    assert entry["sqnr_db"] == pytest.approx(pick.sqnr_db, abs=1e-9) and entry["sqnr_db"] >= 30.0
    assert fastest <= entry["latency_us"] <= (1 + TIE_REL_MAX) * fastest  # the fastest, or a simpler tie
    assert pick.measurement == read_table(synthetic_table).lookup("synthetic", shape, config)
    assert entry["trials"] == BUDGET and entry["protocol"]["tuner"]["measured"] == BUDGET
    assert (entry["protocol"]["workload"], entry["protocol"]["batch"]) == ("swin_t_s1", 8)


def test_a_trial_finished_by_another_process_is_dropped_not_fatal(capsys):
    """A reaper (another worker that judged this one dead) may finish a trial first: recording
    the measurement then returns False, records nothing and raises nothing."""
    import optuna

    from qflash_gen.config import DEFAULT_CONFIG
    from qflash_gen.tune.measure import Measurement
    from qflash_gen.tune.trials import tell

    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    trial = study.ask()
    study.tell(trial.number, state=optuna.trial.TrialState.FAIL)  # the reaper's verdict
    m = Measurement(latency_us=5.0, spread_us=0.1, sqnr_db=35.0, correct=True)
    cfg = DEFAULT_CONFIG
    assert tell(study, trial, cfg, cfg.hash, m, "latency", 30.0, {"measured": True}) is False
    (t,) = study.get_trials()
    assert t.state == optuna.trial.TrialState.FAIL and "measured" not in t.user_attrs
    assert f"trial {trial.number} was finished by another process" in capsys.readouterr().err
    fresh = study.ask()
    assert tell(study, fresh, cfg, cfg.hash, m, "latency", 30.0, {"measured": True}) is True
    assert study.trials[-1].state == optuna.trial.TrialState.COMPLETE and study.trials[-1].user_attrs["measured"]
