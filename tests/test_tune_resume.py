"""kill -9 in the middle of a study, rerun: every finished trial is still there, none re-measured."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState
from test_tune_synthetic import synthetic_table  # noqa: F401 - fixture

from qflash_gen.config import KernelConfig

BUDGET = 16


def _snapshot(path) -> dict[int, tuple]:
    """Finished trials of the one study in the journal: number → (state, config hash, latency)."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    names = optuna.get_all_study_names(storage)
    if not names:
        return {}
    study = optuna.load_study(study_name=names[0], storage=storage)
    finished = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    return {
        t.number: (
            t.state,
            t.user_attrs.get("config_hash"),
            t.user_attrs.get("latency_us"),
            t.user_attrs.get("measured"),
        )
        for t in study.get_trials(deepcopy=False, states=finished)
    }


def _cmd(table, journal, db, delay):
    return [
        sys.executable, "-m", "qflash_gen.tune.cli",
        "--simulate", str(table), "--simulate-delay", str(delay),
        "--workloads", "swin_t_s1", "--batches", "8", "--trials", str(BUDGET),
        "--storage", str(journal), "--db", str(db), "--quiet",
    ]  # fmt: skip


def test_kill_and_resume_keeps_every_finished_trial(synthetic_table, tmp_path):  # noqa: F811
    journal, db = tmp_path / "studies.journal", tmp_path / "db"
    proc = subprocess.Popen(_cmd(synthetic_table, journal, db, 0.25), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        before: dict[int, tuple] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists():
                before = _snapshot(journal)
                if sum(1 for v in before.values() if v[3]) >= 4:
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
    measured_before = {n: v for n, v in before.items() if v[3]}
    assert 4 <= len(measured_before) < BUDGET

    rerun = subprocess.run(_cmd(synthetic_table, journal, db, 0.0), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = _snapshot(journal)
    for number, value in before.items():
        assert after[number] == value  # nothing finished was lost or changed
    measured = [v for v in after.values() if v[3]]
    hashes = [v[1] for v in measured]
    assert len(hashes) == BUDGET  # the rerun completed the budget ...
    assert len(set(hashes)) == BUDGET  # ... without measuring any config twice
    assert (db / "synthetic.yaml").is_file()
    # the trial that was in flight when killed is marked failed, not left running forever
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert all(KernelConfig.from_dict(t.user_attrs["config"]) for t in study.trials if t.user_attrs.get("measured"))


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
