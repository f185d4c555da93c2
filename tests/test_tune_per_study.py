"""Each study is finished as soon as its search ends: its head-to-head (a GPU's) and its DB write,
before the next study starts, so a run cut short keeps every study it finished (an H200 run of 15
studies was once cut inside the 15th with nothing written).  A resumed run finishes the rest and
does not measure a stored head-to-head again.

The GPU is faked (:class:`test_tune_headtohead.ColdGPU`, with the GPU's head-to-head rounds);
the summary of a normal run is checked by replaying the recorded H100 table."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import yaml
from test_tune_headtohead import BEST_US, ColdGPU, _space, _tune, _two

from qflash_gen import db
from qflash_gen.config import KernelConfig
from qflash_gen.tune import cli, lease
from qflash_gen.tune.db_turn import DB_WRITTEN
from qflash_gen.tune.headtohead import HEAD_TO_HEAD_ATTR
from qflash_gen.tune.measure import Measurement, ShapeSpec

FIRST, SECOND = ShapeSpec.of("vit_b", 1), ShapeSpec.of("vit_b", 8)
TRIALS = 14  # > the 12 warm starts: a rerun measures the interrupted one (the current pick) after them
TABLE = Path(__file__).parent / "data" / "h100_sweep.csv"


class CutGPU(ColdGPU):
    """:class:`ColdGPU` that records the shape of every measurement and, with ``cut``, is
    interrupted (Ctrl-C, ``timeout -s INT``) at its first measurement of ``cut``, after noting
    what the DB file held at that moment."""

    def __init__(self, true: dict[str, float], db_file: Path, cut: ShapeSpec | None = None) -> None:
        super().__init__(true, cold=0)
        self.db_file, self.cut = db_file, cut
        self.shapes: list[ShapeSpec] = []
        self.db_at_cut: str | None = None

    def measure(self, config: KernelConfig, shape: ShapeSpec) -> Measurement:
        if shape == self.cut:
            self.db_at_cut = self.db_file.read_text()
            raise KeyboardInterrupt
        self.shapes.append(shape)
        return super().measure(config, shape)


def _entries(path: Path) -> dict[str, dict]:
    return {e["key"]: e for e in yaml.safe_load(path.read_text())["entries"]}


def _studies(journal: Path) -> dict[int, optuna.Study]:
    """Batch -> the tuning study of that batch in the journal."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    names = [n for n in optuna.get_all_study_names(storage) if not lease.is_lease_name(n)]
    studies = [optuna.load_study(study_name=n, storage=storage) for n in names]
    return {s.user_attrs["shape"]["batch"]: s for s in studies}


def _run(monkeypatch, capsys, tmp_path, gpu):
    return _tune(monkeypatch, capsys, tmp_path, gpu, trials=TRIALS, batches="1,8")


def test_a_run_cut_in_its_second_study_keeps_the_first_written_and_a_rerun_finishes_the_second(
    monkeypatch, capsys, tmp_path
):
    """Two studies whose runtime pick (an exact entry) is slower than the best: the first study's
    search, head-to-head and DB write all happen before the second study measures anything; a
    Ctrl-C there (exit 130) leaves the first entry written, with its head-to-head stored on its
    study (for ``--export``).  The same command again measures nothing in the first study (its
    budget is spent; its winner, now the exact entry, is the runtime's pick) and finishes and
    writes the second, measuring its runtime pick, the warm start the cut interrupted, after all
    (``study._enqueue_warm``), and then the head-to-head."""
    current, _ = _two(_space())
    db_file = tmp_path / "db" / "h100.yaml"
    entries = [
        db.Entry(key=s.key("fp16"), config=current, latency_us=9.0, latency_spread_us=0.1, sqnr_db=40.0, trials=1,
                 protocol={"source": "test: the runtime's pick"})
        for s in (FIRST, SECOND)
    ]  # fmt: skip
    db.write_entries(db_file, entries, gpu="h100")
    key1, key2 = FIRST.key("fp16").to_str(), SECOND.key("fp16").to_str()
    assert key1 != key2

    gpu = CutGPU({current.hash: 12.6}, db_file, cut=SECOND)
    code, _, err = _run(monkeypatch, capsys, tmp_path, gpu)
    assert code == 130, err
    assert "interrupted; finished trials are in the study storage and each finished study's winner in the DB" in err
    assert gpu.shapes == [FIRST] * (TRIALS + 6)  # the first study's trials and its head-to-head's 6 rounds
    at_cut = yaml.safe_load(gpu.db_at_cut)["entries"]
    assert {e["key"]: e["latency_us"] for e in at_cut}[key1] == pytest.approx(BEST_US)  # written before study 2
    entries = _entries(db_file)
    first = entries[key1]
    assert KernelConfig.from_dict(first["config"]) != current and first["latency_us"] == pytest.approx(BEST_US)
    assert first["protocol"]["tuner"]["head_to_head"]["current_pick"]["median_us"] == pytest.approx(12.6)
    assert KernelConfig.from_dict(entries[key2]["config"]) == current and entries[key2]["latency_us"] == 9.0
    studies = _studies(tmp_path / "s.journal")
    assert HEAD_TO_HEAD_ATTR in studies[1].user_attrs and DB_WRITTEN in studies[1].user_attrs
    assert HEAD_TO_HEAD_ATTR not in studies[8].user_attrs and DB_WRITTEN not in studies[8].user_attrs

    # the rerun: the second study searched, its head-to-head measured, its entry written
    gpu = CutGPU({current.hash: 12.6}, db_file)
    code, out, err = _run(monkeypatch, capsys, tmp_path, gpu)
    assert code == 0, err
    assert FIRST not in gpu.shapes and gpu.shapes.count(SECOND) == TRIALS + 6, out + err
    entries = _entries(db_file)
    assert entries[key1] == first  # as the cut run wrote it
    second = entries[key2]
    assert KernelConfig.from_dict(second["config"]) != current and second["latency_us"] == pytest.approx(BEST_US)
    assert second["protocol"]["tuner"]["head_to_head"]["rounds"] == 3
    assert HEAD_TO_HEAD_ATTR in _studies(tmp_path / "s.journal")[8].user_attrs
    rows = [line for line in out.splitlines() if line.startswith("│ vit_b")]
    assert len(rows) == 2, out  # the summary holds both studies
    assert f"DB {db_file}: added 0, replaced 1, kept better stored 0" in out


def test_a_rerun_does_not_measure_a_stored_head_to_head_again(monkeypatch, capsys, tmp_path):
    """A study whose head-to-head kept the runtime's pick (a tie): the same command again, with
    the study's budget spent, measures nothing at all; the verdict is the stored head-to-head's."""
    current, _ = _two(_space())
    db.write_entries(
        tmp_path / "db" / "h100.yaml",
        [db.Entry(key=FIRST.key("fp16"), config=current, latency_us=9.0, latency_spread_us=0.1, sqnr_db=40.0,
                  trials=1, protocol={"source": "test: the runtime's pick"})],
        gpu="h100",
    )  # fmt: skip
    before = (tmp_path / "db" / "h100.yaml").read_text()
    code, out, err = _tune(monkeypatch, capsys, tmp_path, ColdGPU({current.hash: BEST_US * 1.005}, cold=3), trials=5)
    assert code == 0, err
    tie = "ties with the best (head-to-head, 3 rounds each, alternating: best 8.80 vs current 8.84 us"
    assert tie in " ".join(out.split())
    again = ColdGPU({current.hash: BEST_US * 1.005}, cold=0)
    code, out, err = _tune(monkeypatch, capsys, tmp_path, again, trials=5)
    assert code == 0, err
    assert again.log == []  # neither the search nor the head-to-head measured anything
    flat = " ".join(out.split())
    assert tie in flat and "the DB keeps it, nothing written" in flat
    assert (tmp_path / "db" / "h100.yaml").read_text() == before


@pytest.mark.skipif(not TABLE.is_file(), reason="tests/data/h100_sweep.csv is not in this checkout")
def test_each_study_logs_its_db_write_and_the_summary_reports_them_all(tmp_path, capsys):
    """A replayed run of two studies (not ``--quiet``): one DB line per study on stderr as it is
    written, the first before the second study's search; the summary's DB line counts both."""
    code = cli.main(
        ["--simulate", str(TABLE), "--workloads", "vit_b,swin_t_s1", "--batches", "8", "--trials", "4",
         "--db", str(tmp_path / "db"), "--storage", str(tmp_path / "s.journal")]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    path = tmp_path / "db" / "h100.yaml"
    written = [m.start() for m in re.finditer(rf": DB entry added to {re.escape(str(path))}", err)]
    assert len(written) == 2, err
    assert err.index("vit_b b8: DB entry added") < err.index("swin_t_s1 b8: worker #0 measured")
    assert out.count(f"DB {path}: added 2, replaced 0, kept better stored 0; 2 entries written with") == 1
    assert "DB entry added" not in out and len(_entries(path)) == 2
