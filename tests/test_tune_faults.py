"""Faults around a tuning run (issue 18, items 3, 8, 9, 10): clear errors naming the file, flag or
value at fault, and no finished trial lost.  Replays the recorded H100 table (CPU)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import optuna
import pytest
import yaml

from qflash_gen.tune import cli

TABLE = Path(__file__).parent / "data" / "h100_sweep.csv"
pytestmark = pytest.mark.skipif(not TABLE.is_file(), reason="tests/data/h100_sweep.csv is not in this checkout")
RUN = ["--simulate", str(TABLE), "--workloads", "swin_t_s4", "--batches", "8,64", "--quiet"]


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _finished(journal: Path) -> dict[str, dict[int, tuple]]:
    """Study name -> {trial number: (state, value, config)} of the finished trials in a journal."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    out = {}
    for name in optuna.get_all_study_names(storage):
        if name.startswith("qflash-lease"):
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        out[name] = {
            t.number: (t.state, t.value, t.user_attrs.get("config_hash"))
            for t in study.trials
            if t.state.is_finished() and t.user_attrs.get("measured")
        }
    return out


# -- item 3: an unwritable DB --------------------------------------------------------------------
def test_a_db_that_cannot_be_written_after_tuning_prints_the_summary_and_the_export_command(
    tmp_path, capsys, monkeypatch
):
    """The write fails after the studies ran (here: EACCES from the write, as a read-only
    directory gives a non-root user): the summary is printed, the message names the file and
    the error, says the trials are safe and gives the --export command; exit status 1."""
    from qflash_gen.db import files

    def denied(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(files, "atomic_write", denied)
    journal, db_dir = tmp_path / "s.journal", tmp_path / "db"
    code, out, err = _run(capsys, *RUN, "--trials", 5, "--storage", journal, "--db", db_dir)
    assert code == 1
    assert "Traceback" not in err and "qflash-tune on h100" in out  # the summary table
    assert f"DB {db_dir / 'h100.yaml'} not written: " in err and "Permission denied" in err
    assert f"study storage journal:{journal}" in err
    measured = _finished(journal)
    assert len(measured) == 2 and all(len(t) == 5 for t in measured.values())  # every trial kept
    monkeypatch.undo()
    command = shlex.split(err.split("without measuring: ", 1)[1].split("\n")[0])
    assert command[:2] == ["qflash-tune", "--export"] and command[-2:] == ["--db", "DIR"]
    code, out, err = _run(capsys, *command[1:-1], tmp_path / "later")
    assert code == 0, err
    assert len(yaml.safe_load((tmp_path / "later" / "h100.yaml").read_text())["entries"]) == 2


def test_a_db_path_that_cannot_be_created_is_refused_before_measuring(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    journal = tmp_path / "s.journal"
    code, _, err = _run(capsys, *RUN, "--trials", 3, "--storage", journal, "--db", blocker / "db")
    assert code == 2 and "Traceback" not in err
    assert f"--db {blocker / 'db'}: cannot write {blocker / 'db' / 'h100.yaml'}" in err
    assert not journal.exists() or not _finished(journal)  # nothing was measured


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_a_read_only_db_directory_is_refused_before_measuring(tmp_path, capsys):
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    db_dir.chmod(0o555)
    try:
        code, _, err = _run(capsys, *RUN, "--trials", 3, "--storage", tmp_path / "s.journal", "--db", db_dir)
    finally:
        db_dir.chmod(0o755)
    assert code == 2 and f"--db {db_dir}: cannot write" in err and "Permission denied" in err


def test_db_with_a_file_suffix_is_not_made_a_directory(tmp_path, capsys):
    target = tmp_path / "other" / "foo.txt"
    code, _, err = _run(capsys, *RUN, "--trials", 2, "--storage", tmp_path / "s.journal", "--db", target)
    assert code == 2 and f"--db {target}: names neither a directory nor a .yaml file" in err
    assert not target.exists()


# -- item 8: password redaction --------------------------------------------------------------------
@pytest.mark.parametrize("password", ["e", "s3cret", "p@ss"])
def test_storage_errors_redact_the_password_field_only(capsys, password):
    code, _, err = _run(capsys, *RUN, "--no-db", "--storage", f"mysql://user:{password}@127.0.0.1:1/db")
    assert code == 2 and "Traceback" not in err
    assert "--storage mysql://user:***@127.0.0.1:1/db: cannot open it" in err
    assert err.count("***") == 1  # the URL's password field, and no letter of any word
    if len(password) > 1:
        assert password not in err


# -- item 9: a torn journal ------------------------------------------------------------------------
def test_a_torn_last_journal_line_is_dropped_with_a_note_and_no_finished_trial_is_lost(tmp_path, capsys):
    journal = tmp_path / "s.journal"
    code, _, err = _run(capsys, *RUN, "--trials", 4, "--storage", journal, "--no-db")
    assert code == 0, err
    data = journal.read_bytes()
    cut = data.rstrip(b"\n").rfind(b"\n") + 1 + 7  # 7 bytes into the last record: a kill mid-append
    journal.write_bytes(data[:cut])
    intact = tmp_path / "intact.journal"
    intact.write_bytes(data[: data[:cut].rfind(b"\n") + 1])
    before = _finished(intact)  # what was finished before the torn record
    code, out, err = _run(capsys, *RUN, "--trials", 6, "--storage", journal, "--no-db")
    assert code == 0, err
    assert f"journal {journal}: dropped its unfinished last line (7 bytes" in err
    after = _finished(journal)
    for name, trials in before.items():
        assert all(after[name].get(n) == t for n, t in trials.items())  # nothing finished is lost
        assert len(after[name]) >= 6
    assert journal.read_bytes().endswith(b"\n")


def test_a_broken_line_inside_the_journal_is_an_error_naming_the_file_and_line(tmp_path, capsys):
    journal = tmp_path / "s.journal"
    code, _, err = _run(capsys, *RUN, "--trials", 2, "--storage", journal, "--no-db")
    assert code == 0, err
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3][:20] + lines[4]  # what an append onto a torn line used to make
    journal.write_bytes(b"".join(lines))
    before = journal.read_bytes()
    code, _, err = _run(capsys, *RUN, "--trials", 3, "--storage", journal, "--no-db")
    assert code == 2 and "Traceback" not in err
    assert f"--storage {journal}:4: the study journal is damaged: not a journal record" in err
    assert journal.read_bytes() == before  # nothing changed


# -- item 10: bad tables ---------------------------------------------------------------------------
def _table_cut_mid_row(tmp_path) -> Path:
    data = TABLE.read_bytes()
    path = tmp_path / "cut.csv"
    path.write_bytes(data[: data.index(b"\n", 4000) + 30])
    return path


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p, "is a directory; give the table file"),
        (_table_cut_mid_row, "the last row is cut short"),
        (lambda p: (p / "bin.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe") and p / "bin.csv", "not UTF-8"),
        (lambda p: (p / "nul.csv").write_bytes(b"gpu,workload\x00\x00\n") and p / "nul.csv", "NUL bytes"),
    ],
    ids=["directory", "cut-mid-row", "binary", "nul"],
)
def test_a_bad_table_is_an_error_naming_it(tmp_path, capsys, make, needle):
    path = make(tmp_path)
    code, _, err = _run(capsys, "--simulate", path, "--workloads", "vit_b", "--batches", "8", "--no-db")
    assert code == 2 and "Traceback" not in err
    assert str(path) in err and needle in err
