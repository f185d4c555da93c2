"""Faults around the tuning DB (issue 18, items 2, 4, 5, 6, 7) and the concurrency/SIGKILL
contract.  Each test fails on the code before the fix; docs/reliability.md cites them."""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest

from qflash_gen import db, kernel
from qflash_gen.config import DEFAULT_CONFIG
from qflash_gen.keys import workload_key
from qflash_gen.tune import cli as tune_cli

TABLE = Path(__file__).parent / "data" / "h100_sweep.csv"
PROTOCOL = {"method": "do_bench", "reps": 100}


def entry(bh: int = 16, latency: float = 10.0, *, n: int = 197, **kw) -> db.Entry:
    return db.Entry(
        key=workload_key(1, bh, n, 64),
        config=DEFAULT_CONFIG,
        latency_us=latency,
        latency_spread_us=0.25,
        sqnr_db=37.5,
        trials=40,
        protocol=PROTOCOL,
        **kw,
    )


def run_db(capsys, *argv: str) -> tuple[int, str, str]:
    from qflash_gen.cli import db_main

    code = db_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _fresh_kernels():
    kernel.clear_cache()
    yield
    kernel.clear_cache()


# -- item 2: QFLASH_GEN_DB naming a .yaml file -------------------------------------------------------
def test_env_db_may_name_a_gpu_file(tmp_path, monkeypatch):
    path = tmp_path / "mine" / "h100.yaml"
    db.write_entries(path, [entry(16)])
    monkeypatch.setenv(db.ENV_DB_DIR, str(path))
    database = db.TuningDB.default()
    assert database.dirs[-1] == path and database.files("h100")[-1] == path
    assert db.user_db_path("h100") == path and db.user_db_dir() == path.parent
    kern = kernel.get_kernel((1, 16, 197, 64), gpu="h100")
    assert kern.why == "exact" and kern.origin == path
    with pytest.raises(ValueError, match=f"{db.ENV_DB_DIR}={path}.*'h100'.*'h200'"):
        db.user_db_path("h200")  # the file is the H100's: an H200 write has nowhere to go
    monkeypatch.setenv(db.ENV_DB_DIR, str(tmp_path / "my db.yaml"))
    with pytest.raises(ValueError, match=f"{db.ENV_DB_DIR}=.*my db.yaml.*<gpu>.yaml"):
        db.TuningDB.default()


def test_qflash_tune_writes_to_the_file_env_db_names(tmp_path, monkeypatch, capsys):
    path = tmp_path / "h100.yaml"
    monkeypatch.setenv(db.ENV_DB_DIR, str(path))
    argv = ["--simulate", TABLE, "--gpu", "h100", "--workloads", "vit_b", "--batches", "8", "--trials", "8",
            "--storage", tmp_path / "s.journal"]  # fmt: skip
    code = tune_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert f"DB {path}: added 1" in out.replace("\n", " ")  # the end of the run says where it went
    assert len(db.load_file(path).fallbacks) == 1


# -- item 4: a folder named h100.yaml, an unreadable file ---------------------------------------------
def test_a_folder_named_like_a_db_file_is_reported_not_skipped(tmp_path, capsys):
    d = tmp_path / "tuning_db"
    (d / "h100.yaml").mkdir(parents=True)
    db.write_entries(d / "h200.yaml", [entry(16)])
    for cmd in ("check", "ls"):
        code, out, err = run_db(capsys, cmd, "--db", str(d))
        assert code == 1 and "Traceback" not in err
        assert f"{d / 'h100.yaml'}: is a directory" in out
    with pytest.raises(db.DBError, match=f"{d / 'h100.yaml'}: is not a file"):
        kernel.get_kernel((1, 16, 197, 64), gpu="h100", db=db.TuningDB([d]))
    with pytest.raises(db.DBError, match="is a directory"):
        db.write_entries(d / "h100.yaml", [entry(16)])


def test_an_unreadable_db_file_is_an_error_naming_it(tmp_path, capsys, monkeypatch):
    d = tmp_path / "tuning_db"
    path = d / "h100.yaml"
    db.write_entries(path, [entry(16)])
    real = Path.read_text

    def denied(self, *a, **kw):  # as chmod 000 does for a user who is not root
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", denied)
    os.utime(path, (1, 1))  # a new signature: no cached parse
    code, out, err = run_db(capsys, "check", "--db", str(d))
    assert code == 1 and f"CORRUPT {path}: cannot read it: Permission denied" in out and "Traceback" not in err
    with pytest.raises(db.DBError, match=f"{path}: cannot read it"):
        kernel.get_kernel((1, 16, 197, 64), gpu="h100", db=db.TuningDB([d]))


# -- item 5: a file cut short --------------------------------------------------------------------------
@pytest.fixture
def full_file(tmp_path) -> Path:
    path = tmp_path / "h100.yaml"
    db.write_entries(path, [entry(1 << i, n=n) for i in range(8) for n in (197, 49)])
    assert len(db.load_file(path).entries) == 16
    return path


def test_a_file_cut_at_half_its_bytes_is_detected(full_file, capsys):
    data = full_file.read_bytes()
    full_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(db.DBError) as err:
        db.load_file(full_file)
    assert str(err.value).startswith(str(full_file))
    code, out, _ = run_db(capsys, "check", "--db", str(full_file.parent))
    assert code == 1 and out.startswith(f"CORRUPT {full_file}")


def test_the_shipped_db_cut_at_half_its_bytes_is_an_error(tmp_path, capsys):
    """issue 18 item 5, as reported: the shipped h100.yaml cut at half its bytes read as a smaller
    DB ("6 usable, 16 stale", exit 0)."""
    data = (db.shipped_db_dir() / "h100.yaml").read_bytes()
    cut = tmp_path / "h100.yaml"
    cut.write_bytes(data[: len(data) // 2])
    code, out, _ = run_db(capsys, "check", "--db", str(tmp_path))
    assert code == 1 and out.startswith(f"CORRUPT {cut}:") and "cut short" in out


def test_a_file_cut_between_entries_is_detected(full_file):
    text = full_file.read_text()
    cut = text.index("\n- key:", len(text) // 2)  # a cut that leaves valid YAML with fewer entries
    full_file.write_text(text[: cut + 1])
    with pytest.raises(db.DBError, match=r"entry_count says 16 entries but the file holds \d+: .*cut short"):
        db.load_file(full_file)


def test_a_schema_1_file_without_the_count_still_reads(full_file):
    text = full_file.read_text().replace("schema_version: 2", "schema_version: 1")
    full_file.write_text("".join(line for line in text.splitlines(True) if "entry_count:" not in line))
    assert len(db.load_file(full_file).entries) == 16
    db.write_entries(full_file, [entry(1 << 9)])  # a write upgrades it
    assert "entry_count: 17" in full_file.read_text()


# -- item 6: entries written for another Triton / template -------------------------------------------
def test_simulate_says_when_its_entries_are_not_fresh_and_get_kernel_uses_them(tmp_path, capsys):
    out_db = tmp_path / "db"
    argv = ["--simulate", TABLE, "--gpu", "h100", "--workloads", "vit_b", "--batches", "8", "--trials", "8",
            "--storage", tmp_path / "s.journal", "--db", out_db]  # fmt: skip
    assert tune_cli.main([str(a) for a in argv]) == 0
    out = " ".join(capsys.readouterr().out.split())
    (fb,) = db.load_file(out_db / "h100.yaml").fallbacks
    assert f"1 entry written with {fb.label} (not this process's Triton/template" in out
    kern = kernel.get_kernel((8, 12, 197, 64), gpu="h100", db=db.TuningDB([out_db]))
    assert kern.why == f"exact:{fb.label}" and kern.config == fb.entry.config


def test_write_report_names_entries_of_other_software(tmp_path, caplog):
    running = db.running_software()
    with caplog.at_level(logging.INFO, logger="qflash_gen.db"):
        report = db.write_entries(tmp_path / "h100.yaml", [entry(16, software={**running, "triton": "3.1.0"})])
    assert report.not_fresh == [(workload_key(1, 16, 197, 64).to_str(), "triton-3.1")]
    assert "written with triton-3.1" in report.describe() and "written with" in caplog.text
    assert not db.write_entries(tmp_path / "h100.yaml", [entry(32)]).not_fresh


# -- item 7: temp files of a killed writer -------------------------------------------------------------
def test_a_later_writer_removes_temp_files_a_killed_writer_left(tmp_path):
    path = tmp_path / "h100.yaml"
    db.write_entries(path, [entry(16)])
    orphans = [tmp_path / ".h100.yaml.k1ll3d.tmp", tmp_path / ".h100.yaml.x7.tmp"]
    for o in orphans:
        o.write_text("schema_version: 2\nheader: {gpu: h1")
    other = tmp_path / ".h200.yaml.abc.tmp"  # another DB's: not this writer's to judge
    other.write_text("")
    db.write_entries(path, [entry(32)])
    assert not any(o.exists() for o in orphans) and other.exists()
    assert len(db.load_file(path).entries) == 2


# -- concurrency: 8 writers, some killed with SIGKILL mid-run -----------------------------------------
def _writer(path: str, log: str, worker: int) -> None:
    rng = random.Random(worker)
    for i in range(400):
        e = entry(1 << (i % 16), 10.0 + rng.random(), n=100 + worker * 40 + i // 16)
        db.write_entries(path, [e, entry(8, 100.0 - worker - i * 0.001)])
        with open(log, "a") as fh:  # after the write returned: this entry must survive
            fh.write(e.key.to_str() + "\n")


def test_concurrent_writers_killed_with_sigkill_lose_no_written_entry(tmp_path):
    """docs/reliability.md: 8 processes merge into one file; 4 are SIGKILLed at random moments
    (some mid-write); every write that returned is in the file, which stays whole, and the next
    writer removes the temp files the killed ones left."""
    path = tmp_path / "h100.yaml"
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    logs = [tmp_path / f"w{w}.log" for w in range(8)]
    procs = [ctx.Process(target=_writer, args=(str(path), str(logs[w]), w)) for w in range(8)]
    for p in procs:
        p.start()
    rng = random.Random(0)
    deadline = time.monotonic() + 3.0
    for p in procs[:4]:
        time.sleep(rng.uniform(0.2, 0.6))
        os.kill(p.pid, signal.SIGKILL)  # our own child, by pid
    while time.monotonic() < deadline and any(p.is_alive() for p in procs[4:]):
        time.sleep(0.1)
    for p in procs[4:]:
        if p.is_alive():
            os.kill(p.pid, signal.SIGTERM)  # enough: they have written for 3 s
    for p in procs:
        p.join(30)
    written = {line for log in logs if log.exists() for line in log.read_text().split()}
    assert len(written) > 20, "the writers did not get going"
    loaded = db.load_file(path)  # whole: its count matches
    assert written <= {k.to_str() for k in loaded.entries}
    db.write_entries(path, [entry(4096)])  # a later writer of this DB
    assert not list(tmp_path.glob(".h100.yaml.*.tmp"))
    assert written <= {k.to_str() for k in db.load_file(path).entries}
