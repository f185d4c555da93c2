"""Several qflash-tune workers on one study (issue 8), replaying the recorded H100 table.

Each storage the tuner supports for sharing is tested with real concurrent processes: a journal
file (runs everywhere) and a real PostgreSQL server, whose URL comes from
``QFLASH_GEN_TEST_PG_URL`` (CI starts one with ``eval "$(.ci/postgres.sh start)"``; without the
variable those tests skip).  What must hold: the study measures the sum of the workers' budgets,
no config twice, the DB entry is written once; a worker killed with SIGKILL and restarted loses no
finished trial.  The measurements are the table's (real H100 numbers); ``--simulate-delay`` only
stretches each one so that the workers overlap.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from qflash_gen import gpu as gpu_names
from qflash_gen.tune import cli, devices, lease, storage
from qflash_gen.tune.db_turn import DB_WRITTEN

TABLE = Path(__file__).parent / "data" / "h100_sweep.csv"
PG_ENV = "QFLASH_GEN_TEST_PG_URL"
FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)

pytestmark = pytest.mark.skipif(
    not TABLE.is_file(), reason=f"{TABLE.name} (recorded on an H100) is not in this checkout"
)

DB_WRITE_RE = re.compile(r": added (\d+), replaced (\d+), kept better stored (\d+)")


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture
def pg_url():
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f'{PG_ENV} is not set: start a PostgreSQL server with eval "$(.ci/postgres.sh start)" (CI does)')
    return url


@pytest.fixture(params=["journal", "postgresql"])
def shared(request, tmp_path):
    """``(--storage value, --study prefix)``: a journal file, or the PostgreSQL server (a fresh
    study prefix per test; its studies are deleted afterwards)."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    if request.param == "journal":
        yield str(tmp_path / "studies.journal"), prefix
        return
    url = request.getfixturevalue("pg_url")
    yield url, prefix
    st, _ = storage.open_storage(url)
    for s in st.get_all_studies():
        if s.study_name.startswith(prefix + "/"):
            optuna.delete_study(study_name=s.study_name, storage=st)


def _argv(store, prefix, db, trials, delay, *extra):
    return [
        "--simulate", str(TABLE), "--workloads", "vit_b", "--batches", "8", "--trials", str(trials),
        "--storage", store, "--study", prefix, "--db", str(db), "--simulate-delay", str(delay), "--quiet", *extra,
    ]  # fmt: skip


def _start(argv):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "qflash_gen.tune.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _finish(procs, timeout=120):
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append((p.returncode, out))
    return outs


def _open(store):
    st, _ = storage.open_storage(store)
    return st


def _study(store, prefix):
    st = _open(store) if isinstance(store, str) else store
    names = [s.study_name for s in st.get_all_studies() if s.study_name.startswith(prefix + "/")]
    assert len(names) == 1, names
    return st, optuna.load_study(study_name=names[0], storage=st)


def _measured(study):
    return [t for t in study.get_trials(deepcopy=False, states=FINISHED) if t.user_attrs.get("measured")]


def _snapshot(study):
    """Finished trials: number -> (state, config hash, latency, worker slot)."""
    return {
        t.number: (t.state, t.user_attrs.get("config_hash"), t.user_attrs.get("latency_us"), t.user_attrs.get("worker"))
        for t in study.get_trials(deepcopy=False, states=FINISHED)
    }


def _fastest(measured):
    """The fastest latency at or above the 30 dB floor among measured trials."""
    return min(t.user_attrs["latency_us"] for t in measured if (t.user_attrs.get("sqnr_db") or 0) >= 30.0)


def _leases_left(st, prefix=None):
    """Leases still in the storage (of the studies named ``prefix/...``: the PostgreSQL database is
    shared by the tests)."""
    studies = st.get_all_studies()
    ids = {str(st.get_study_id_from_name(s.study_name)) for s in studies if prefix is None or s.study_name.startswith(prefix + "/")}
    return [s.study_name for s in studies if lease.is_lease_name(s.study_name) and s.study_name.split(":")[1] in ids]


# -- concurrent workers ----------------------------------------------------------------------------
def _studies(st, prefix):
    names = sorted(s.study_name for s in st.get_all_studies() if s.study_name.startswith(prefix + "/"))
    return [optuna.load_study(study_name=n, storage=st) for n in names]


def test_concurrent_workers_split_the_work_and_write_the_db_once(shared, tmp_path):
    store, prefix = shared
    db = tmp_path / "db"
    # Two studies; the quick worker is done with both before the slow one reaches the second, and
    # still the slow one spends its own budget there (it took a slot in every study at its start).
    workers = ((5, 0.2), (8, 0.4))  # (budget, seconds per replayed measurement)
    two = ["--workloads", "swin_t_s1,swin_t_s2"]
    outs = _finish([_start(_argv(store, prefix, db, b, delay, *two)) for b, delay in workers])
    for code, out in outs:
        assert code == 0, out[-3000:]
    budgets = sorted(b for b, _ in workers)

    st = _open(store)
    studies = _studies(st, prefix)
    assert len(studies) == 2
    for study in studies:
        measured = _measured(study)
        hashes = [t.user_attrs["config_hash"] for t in measured]
        assert len(hashes) == sum(budgets), outs  # total = the sum of the workers' budgets ...
        assert len(set(hashes)) == len(hashes)  # ... and no config measured twice
        per_slot: dict[int, int] = {}
        for t in measured:
            per_slot[t.user_attrs["worker"]] = per_slot.get(t.user_attrs["worker"], 0) + 1
        assert len(per_slot) == 2, f"{study.study_name}: one worker did it all ({per_slot}): no overlap? {outs}"
        assert sorted(per_slot.values()) == budgets  # each worker spent exactly its own budget
        assert not study.get_trials(states=(TrialState.RUNNING,))
        assert study.user_attrs[DB_WRITTEN]["measured"] == sum(budgets)
    assert not _leases_left(st, prefix)

    # the DB entries: each study's written once, by the last worker to finish it (which worker
    # that is depends on the machine's timing: on a loaded CI runner the quick worker was once
    # last in one study), holding every worker's trials
    writes = [tuple(map(int, w)) for _, out in outs for w in DB_WRITE_RE.findall(out)]
    assert sum(a for a, _, _ in writes) == 2 and not any(r or k for _, r, k in writes), outs
    assert sum(out.count("DB entry not written by this worker: left to worker") for _, out in outs) == 2, outs
    entries = {e["protocol"]["workload"]: e for e in yaml.safe_load((db / "h100.yaml").read_text())["entries"]}
    assert set(entries) == {"swin_t_s1", "swin_t_s2"}
    for study in studies:
        entry = entries[study.user_attrs["shape"]["workload"]]
        assert entry["trials"] == sum(budgets)
        assert sorted(entry["protocol"]["tuner"]["workers"].values()) == budgets
        assert entry["measured_on_device"] == "NVIDIA H100 80GB HBM3"  # the table's device (no --devices)
        assert entry["latency_us"] <= _fastest(_measured(study)) * 1.02  # the pick (the tie rule: within noise)


def test_kill_9_of_one_worker_then_restart_loses_nothing(shared, tmp_path):
    store, prefix = shared
    db = tmp_path / "db"
    budget = 10
    victim = _start(_argv(store, prefix, db, budget, 0.3))
    other = _start(_argv(store, prefix, db, budget, 0.3))
    owner = f"{os.uname().nodename}:{victim.pid}"
    watch = _open(store)  # opened once: a PostgreSQL connection per poll would be slow
    try:
        deadline = time.monotonic() + 90
        mine: list = []
        while time.monotonic() < deadline and victim.poll() is None:
            try:
                _, study = _study(watch, prefix)
                mine = [t for t in _measured(study) if t.user_attrs.get("owner") == owner]
            except (AssertionError, KeyError, ValueError):  # the study is not created yet
                mine = []
            if len(mine) >= 3:
                break
            time.sleep(0.2)
        assert victim.poll() is None, "the worker ended before it could be killed"
        os.kill(victim.pid, signal.SIGKILL)  # our own child, by pid
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert 3 <= len(mine) < budget
    slot = mine[0].user_attrs["worker"]
    _, study = _study(watch, prefix)
    before = _snapshot(study)  # what had finished when it died

    restart = _start(_argv(store, prefix, db, budget, 0.1))  # the other worker may still be running
    outs = _finish([other, restart])
    for code, out in outs:
        assert code == 0, out[-3000:]
    st, study = _study(store, prefix)
    after = _snapshot(study)
    for number, value in before.items():
        assert after[number] == value  # nothing finished was lost or changed
    measured = _measured(study)
    hashes = [t.user_attrs["config_hash"] for t in measured]
    assert len(hashes) == 2 * budget and len(set(hashes)) == 2 * budget, (sorted(after.items()), outs)
    resumed = [t for t in measured if t.user_attrs["worker"] == slot]
    assert len(resumed) == budget  # the restart took the killed worker's slot and completed its budget
    assert not study.get_trials(states=(TrialState.RUNNING,))  # the trial in flight was failed
    assert not _leases_left(st, prefix)  # the killed worker's leases were reaped
    # The DB holds the pick over every worker's trials (written when the other worker finished,
    # and again by the restart unless its pick is not faster: db.write_entries keeps a tie).
    (entry,) = yaml.safe_load((db / "h100.yaml").read_text())["entries"]
    assert entry["latency_us"] <= _fastest(measured) * 1.02  # the tie rule: a simpler config within noise


def test_simulated_devices_run_one_worker_each(tmp_path, capsys):
    store, db = str(tmp_path / "s.journal"), tmp_path / "db"
    code = cli.main([*_argv(store, "dev", db, 6, 0.2), "--devices", "0,1"])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    _, study = _study(store, "dev")
    measured = _measured(study)
    per_device: dict[str, int] = {}
    for t in measured:
        d = t.user_attrs["measured_by"]["device"]
        per_device[d] = per_device.get(d, 0) + 1
    assert per_device == {"sim:0": 6, "sim:1": 6}
    assert len({t.user_attrs["config_hash"] for t in measured}) == 12
    (entry,) = yaml.safe_load((db / "h100.yaml").read_text())["entries"]
    by = entry["protocol"]["tuner"]["measured_by"]
    assert entry["measured_on_device"] == f"NVIDIA H100 80GB HBM3 ({by['device']} on {by['host']})"
    assert entry["trials"] == 12
    assert "sim:0" in out and "sim:1" in out and "12/216" in out  # the parent's per-device table
    assert sum(1 for line in err.splitlines() if "DB " in line and ": added 1" in line) == 1
    assert "[sim:0]" in err and "[sim:1]" in err  # each worker's output, labeled


def test_export_writes_the_db_from_storage_alone(tmp_path, capsys):
    store = str(tmp_path / "s.journal")
    assert cli.main([*_argv(store, "exp", tmp_path / "unused", 5, 0.0), "--no-db"]) == 0
    capsys.readouterr()
    db = tmp_path / "farm-db"
    code = cli.main(["--export", *_argv(store, "exp", db, 5, 0.0)])
    out, err = capsys.readouterr()
    assert code == 0, err
    (entry,) = yaml.safe_load((db / "h100.yaml").read_text())["entries"]
    assert entry["trials"] == 5 and entry["protocol"]["source"] == "simulated"
    assert "added 1" in out
    code = cli.main(["--export", *_argv(store, "nosuchprefix", db, 5, 0.0)])
    assert code == 2 and "none of the requested studies" in capsys.readouterr().err


# -- the claim itself: many processes, one config --------------------------------------------------
_CLAIM = textwrap.dedent(
    """
    import importlib.util, sys

    def load(name):  # the module alone: the qflash_gen package would import torch (seconds)
        spec = importlib.util.spec_from_file_location(name, f"{sys.argv[3]}/{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    lease, storage = load("lease"), load("storage")
    st, _ = storage.open_storage(sys.argv[1])
    with lease.Leases(st, int(sys.argv[2])) as leases:
        print("ready", flush=True)
        sys.stdin.readline()  # "go": all processes try at once
        print("won" if leases.acquire(lease.CONFIG, "same-config") else "lost", flush=True)
        sys.stdin.readline()  # hold it until every process has tried
    """
)


def test_only_one_of_many_processes_wins_a_config(shared):
    store, prefix = shared
    st = _open(store)
    study_id = st.create_new_study([optuna.study.StudyDirection.MINIMIZE], study_name=f"{prefix}/claims")
    where = Path(lease.__file__).parent
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIM, store, str(study_id), str(where)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(5)
    ]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 5
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = sorted(p.stdout.readline().strip() for p in procs)
        for p in procs:
            p.stdin.write("exit\n")
            p.stdin.flush()
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs)
    assert results == ["lost"] * 4 + ["won"], results
    assert not _leases_left(st, prefix)  # the winner released it on exit


# -- leases: dead holders, slots -------------------------------------------------------------------
def _journal(tmp_path):
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "l.journal")))


def test_a_dead_holder_on_another_host_is_reaped_after_its_heartbeat_stops(tmp_path):
    st = _journal(tmp_path)
    study = optuna.create_study(storage=st, study_name="s")
    trial = study.ask()
    sid = st.get_study_id_from_name("s")
    name = lease.lease_name(sid, lease.CONFIG, "abc")
    holder = {"host": "another-host", "pid": 1, "token": "x", "trial": trial.number}
    lid = st.create_new_study([optuna.study.StudyDirection.MINIMIZE], study_name=name)
    with lease.Leases(st, sid) as leases:
        st.set_study_user_attr(lid, "holder", {**holder, "heartbeat": time.time()})
        assert not leases.acquire(lease.CONFIG, "abc")  # alive: its heartbeat is fresh
        st.set_study_user_attr(lid, "holder", {**holder, "heartbeat": time.time() - lease.STALE_S - 1})
        assert leases.acquire(lease.CONFIG, "abc")  # silent too long: reaped and taken
        assert leases.holder_of(lease.CONFIG, "abc")["pid"] == os.getpid()
    failed = study.trials[trial.number]
    assert failed.state == TrialState.FAIL and "abandoned" in failed.user_attrs["error"]
    assert not _leases_left(st)


def test_a_dead_local_holder_is_reaped_and_its_slot_resumed_first(tmp_path):
    st = _journal(tmp_path)
    optuna.create_study(storage=st, study_name="s")
    sid = st.get_study_id_from_name("s")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = int(dead.stdout)  # a pid that has exited
    lid = st.create_new_study([optuna.study.StudyDirection.MINIMIZE], study_name=lease.lease_name(sid, "worker", "1"))
    host = os.uname().nodename
    st.set_study_user_attr(lid, "holder", {"host": host, "pid": gone, "token": "t", "heartbeat": time.time()})
    with lease.Leases(st, sid) as a, lease.Leases(st, sid) as b:
        assert a.claim_slot() == 1  # slot 0 is free, but the dead worker's slot 1 is resumed first
        assert b.claim_slot() == 0
        assert len(a.live(lease.SLOT)) == 1  # b's slot, seen from a
    assert not _leases_left(st)


def test_a_reused_pid_of_this_process_is_not_taken_for_alive(tmp_path):
    now = time.time()
    me = {"host": os.uname().nodename, "pid": os.getpid(), "heartbeat": now}
    assert lease.holder_alive({**me, "token": lease.PROCESS_TOKEN}, now)
    assert not lease.holder_alive({**me, "token": "an-earlier-process"}, now)
    assert not lease.holder_alive(None, now)


# -- --devices: checks -----------------------------------------------------------------------------
def _fake(index, device_name, cc=(9, 0), mem=80 * 2**30):
    return index, gpu_names.normalize_gpu_name(device_name, cc, mem), device_name


def test_devices_of_one_model_pass_the_check():
    assert devices.check_same_model([_fake(0, "NVIDIA H100 80GB HBM3"), _fake(1, "NVIDIA H100 80GB HBM3")]) == "h100"


def test_devices_of_different_models_are_a_clear_error():
    models = [_fake(0, "NVIDIA H100 80GB HBM3"), _fake(1, "NVIDIA H100 PCIe"), _fake(2, "NVIDIA H100 80GB HBM3")]
    with pytest.raises(ValueError) as exc:
        devices.check_same_model(models)
    msg = str(exc.value)
    assert "--devices 0,1,2" in msg and "not all the same model" in msg
    assert "1 = h100_pcie (NVIDIA H100 PCIe)" in msg and "0 = h100 (NVIDIA H100 80GB HBM3)" in msg
    assert "--devices 0,2 and --devices 1" in msg  # what to run instead


def test_cli_refuses_mixed_gpus(monkeypatch, capsys):
    fake = [_fake(0, "NVIDIA H100 80GB HBM3"), _fake(1, "NVIDIA A100-SXM4-80GB", cc=(8, 0))]
    monkeypatch.setattr(devices, "device_models", lambda indices: fake)
    code = cli.main(["--devices", "0,1", "--workloads", "vit_b", "--trials", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--devices 0,1" in err and "h100" in err and "a100" in err and "Traceback" not in err


def test_live_devices_pin_one_worker_to_each_gpu(monkeypatch, tmp_path, capsys):
    fake = [_fake(0, "NVIDIA H100 80GB HBM3"), _fake(1, "NVIDIA H100 80GB HBM3")]
    monkeypatch.setattr(devices, "device_models", lambda indices: fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # this process sees GPUs 2 and 3 as 0 and 1
    started = []
    monkeypatch.setattr(
        devices, "run_device_runners", lambda argv, workers, err=None: started.append((argv, workers)) or [0, 0]
    )
    argv = ["--devices", "0,1", "--workloads", "swin_t_s1", "--batches", "8", "--storage", str(tmp_path / "s.j")]
    assert cli.main(argv) == 0, capsys.readouterr().err
    ((child, workers),) = started
    assert workers == [("cuda:0", {"CUDA_VISIBLE_DEVICES": "2"}), ("cuda:1", {"CUDA_VISIBLE_DEVICES": "3"})]
    assert "--devices" not in child and child[:2] == ["--workloads", "swin_t_s1"]
    code = cli.main([*argv, "--gpu", "a100"])
    assert code == 2 and "--gpu a100 does not match the GPUs of --devices 0,1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text,needle", [("0,x", "'x' is not a device index"), ("0,0", "listed twice"), ("", "give CUDA")]
)
def test_bad_devices_name_the_flag(text, needle):
    with pytest.raises(ValueError, match="--devices") as exc:
        devices.parse_devices(text)
    assert needle in str(exc.value)


def test_devices_map_through_the_parents_visible_devices():
    assert devices.physical_index(1, {"CUDA_VISIBLE_DEVICES": "4,5"}) == "5"
    assert devices.physical_index(1, {}) == "1"
    assert devices.child_argv(["--devices", "0,1", "--workloads", "x", "--devices=2"]) == ["--workloads", "x"]


# -- storage URLs ----------------------------------------------------------------------------------
def test_mysql_and_postgresql_urls_are_passed_to_optuna(monkeypatch):
    seen = []

    class FakeRDB:
        def __init__(self, url, **kwargs):
            seen.append(url)

    monkeypatch.setattr(optuna.storages, "RDBStorage", FakeRDB)
    st, desc = storage.open_storage("mysql+pymysql://tuner:secret@db.example:3306/qflash")
    assert isinstance(st, FakeRDB) and seen == ["mysql+pymysql://tuner:secret@db.example:3306/qflash"]
    assert desc == "mysql+pymysql://tuner:***@db.example:3306/qflash"
    found = {"psycopg2", "pymysql"}  # only these drivers installed: plain URLs get them named
    monkeypatch.setattr(storage.importlib.util, "find_spec", lambda m: object() if m in found else None)
    storage.open_storage("postgresql://tuner:secret@db.example/qflash")
    storage.open_storage("mysql://tuner:secret@db.example/qflash")
    assert seen[1:] == [
        "postgresql+psycopg2://tuner:secret@db.example/qflash",
        "mysql+pymysql://tuner:secret@db.example/qflash",
    ]


def test_missing_driver_names_the_extra(monkeypatch):
    monkeypatch.setattr(storage.importlib.util, "find_spec", lambda m: None)

    def no_driver(url, **kwargs):
        raise ImportError("Failed to import DB access module for the specified storage URL.")

    monkeypatch.setattr(optuna.storages, "RDBStorage", no_driver)
    with pytest.raises(ValueError) as exc:
        storage.open_storage("postgresql://tuner:secret@db.example/qflash")
    msg = str(exc.value)
    assert "--storage postgresql://tuner:***@db.example/qflash" in msg and "secret" not in msg
    assert "qflash-gen[distributed]" in msg


def test_a_lease_whose_creator_died_before_naming_itself_is_taken_after_a_grace(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "ORPHAN_GRACE_S", 0.2)
    st = _journal(tmp_path)
    optuna.create_study(storage=st, study_name="s")
    sid = st.get_study_id_from_name("s")
    st.create_new_study([optuna.study.StudyDirection.MINIMIZE], study_name=lease.lease_name(sid, lease.CONFIG, "c"))
    with lease.Leases(st, sid) as leases:
        assert [i.key for i in leases.live(lease.CONFIG)] == ["c"]  # no holder yet: taken for a starting one
        t0 = time.monotonic()
        assert leases.acquire(lease.CONFIG, "c")  # still no holder after the grace: an orphan, reaped
        assert time.monotonic() - t0 >= 0.2
