"""Issue 17: a tuning run starts from everything known and never writes an entry slower than the
runtime's current pick.

Replays the RECORDED H100 table (tests/data/h100_sweep.csv, real measurements); the runtime's
pick is set up as a usable entry of a temporary ``--db`` (this checkout's shipped entries are all
stale, so they never answer ``get_kernel`` here)."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import yaml

from qflash_gen import db
from qflash_gen.config import KernelConfig
from qflash_gen.keys import workload_key
from qflash_gen.tune import cli, plan
from qflash_gen.tune.incumbent import CURRENT_ATTR, CurrentPick
from qflash_gen.tune.measure import ShapeSpec
from qflash_gen.tune.space import Grid, SearchSpace
from qflash_gen.tune.table import read_table

TABLE = Path(__file__).parent / "data" / "h100_sweep.csv"
pytestmark = pytest.mark.skipif(not TABLE.is_file(), reason="tests/data/h100_sweep.csv is not in this checkout")
FLOOR = 30.0


@pytest.fixture(scope="module")
def table():
    return read_table(TABLE)


def _shape(table, label: str) -> ShapeSpec:
    return next(s for s in table.shapes("h100") if s.label() == label)


def _feasible(table, shape):
    rows = [r for r in table.rows_for("h100", shape) if r.measurement.feasible(FLOOR)]
    return sorted(rows, key=lambda r: r.measurement.latency_us)


def _put(db_dir: Path, key, row) -> None:
    """A usable entry (this process's software) for ``key`` holding ``row``'s config."""
    m = row.measurement
    entry = db.Entry(
        key=key, config=row.config, latency_us=m.latency_us, latency_spread_us=m.spread_us,
        sqnr_db=m.sqnr_db, trials=1, protocol={"source": "test: the runtime's pick"},
    )  # fmt: skip
    db.write_entries(db_dir / "h100.yaml", [entry], gpu="h100")


def _run(capsys, tmp_path, shape, *extra):
    code = cli.main(
        [
            "--simulate", str(TABLE), "--workloads", shape.workload, "--batches", str(shape.batch),
            "--db", str(tmp_path / "db"), "--storage", str(tmp_path / "s.journal"), "--quiet", *map(str, extra),
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    return code, out, err


def _entries(db_dir: Path, key) -> list[dict]:
    doc = yaml.safe_load((db_dir / "h100.yaml").read_text())
    return [e for e in doc["entries"] if e["key"] == key.to_str()]


def _trials(journal: Path) -> list:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    return study, sorted(study.trials, key=lambda t: t.number)


def test_never_slower_than_the_runtimes_pick(table, tmp_path, capsys):
    """The runtime runs the table's fastest config for swin_t_s1 b64 (from a nearer bucket).  A
    simpler config within noise of it (the default's stage count, 0.5 % slower) wins the tie
    rule; before issue 17 that slower config became the exact entry and then won the lookup."""
    shape = _shape(table, "swin_t_s1 b64")
    fastest = _feasible(table, shape)[0]
    key = shape.key("fp16")
    _put(tmp_path / "db", workload_key((2048, 3, 49, 32), masked=True), fastest)  # a nearer bucket, not the key
    code, out, err = _run(capsys, tmp_path, shape, "--trials", 4)
    assert code == 0, err
    study, trials = _trials(tmp_path / "s.journal")
    assert KernelConfig.from_dict(trials[0].user_attrs["config"]) == fastest.config  # measured first
    assert CurrentPick.from_attr(study.user_attrs[CURRENT_ATTR]).why.startswith("nearest:")
    measured = [KernelConfig.from_dict(t.user_attrs["config"]) for t in trials if t.user_attrs.get("measured")]
    assert any(  # a simpler, slower config within noise was measured: the tie rule would pick it
        c != fastest.config and table.lookup("h100", shape, c).latency_us <= 1.02 * fastest.measurement.latency_us
        for c in measured
    )
    (entry,) = _entries(tmp_path / "db", key)
    assert KernelConfig.from_dict(entry["config"]) == fastest.config
    assert entry["latency_us"] == pytest.approx(fastest.measurement.latency_us, abs=1e-3)
    assert "the runtime's pick (nearest:" in out and "is the fastest measured" in out
    assert "improves_on" in entry["protocol"]["tuner"]


def test_an_exact_current_pick_that_stays_fastest_is_kept_and_nothing_is_written(table, tmp_path, capsys):
    shape = _shape(table, "swin_t_s1 b64")
    fastest = _feasible(table, shape)[0]
    key = shape.key("fp16")
    _put(tmp_path / "db", key, fastest)
    before = (tmp_path / "db" / "h100.yaml").read_text()
    code, out, err = _run(capsys, tmp_path, shape, "--trials", 6)
    assert code == 0, err
    assert (tmp_path / "db" / "h100.yaml").read_text() == before
    assert "is the fastest measured: the DB keeps it, nothing written" in out


def test_an_improvement_says_what_it_improves_on_from_the_same_records(table, tmp_path, capsys):
    """The runtime's pick is a slow config; the run finds a faster one and the summary's `vs
    current` is the ratio of the two latencies recorded in the study."""
    shape = _shape(table, "vit_b b64")
    rows = _feasible(table, shape)
    slow = rows[len(rows) // 2]
    key = shape.key("fp16")
    _put(tmp_path / "db", workload_key((256, 12, 197, 64)), slow)
    code, out, err = _run(capsys, tmp_path, shape, "--trials", 20)
    assert code == 0, err
    (entry,) = _entries(tmp_path / "db", key)
    got = entry["latency_us"]
    assert got < slow.measurement.latency_us
    want = slow.measurement.latency_us / got
    assert re.search(rf"improves on the runtime's pick \(nearest:\S+, .*\) by {want:.2f}x", out), out
    assert f"{want:.2f}x" in out.split("┃ vs current")[1]  # the table's column, the same ratio
    assert entry["protocol"]["tuner"]["current_pick"]["latency_us"] == pytest.approx(slow.measurement.latency_us)


def test_a_current_pick_outside_the_space_is_measured_outside_it(table, tmp_path, capsys):
    """The runtime's pick is a 14-bit-P config, which the 7-bit table cannot hold: it is measured
    once outside the sampler (here: not in the table, a failed measurement), stored on the study,
    and the entry is written with a note saying so."""
    shape = _shape(table, "swin_t_s4 b64")
    rows = _feasible(table, shape)
    key = shape.key("fp16")
    outside = rows[0].config.replace(p_bits=14)
    m = rows[0].measurement
    entry = db.Entry(
        key=key, config=outside, latency_us=m.latency_us, latency_spread_us=m.spread_us, sqnr_db=m.sqnr_db,
        trials=1, protocol={"source": "test"},
    )  # fmt: skip
    db.write_entries(tmp_path / "db" / "h100.yaml", [entry], gpu="h100")
    code, out, err = _run(capsys, tmp_path, shape, "--trials", 3)
    assert code == 0, err
    study, _ = _trials(tmp_path / "s.journal")
    stored = CurrentPick.from_attr(study.user_attrs[CURRENT_ATTR])
    assert stored.config == outside and stored.why == "exact"
    assert stored.measurement is not None and not stored.measurement.ok
    assert "(exact, " in out and "is not in the replayed table: not compared" in out


def test_warm_starts_come_from_every_shipped_db_same_architecture_first(table, tmp_path, monkeypatch):
    """Order: the runtime's pick, this GPU's entries, the shipped files of its architecture's
    other cards, then other cards', the default, then other buckets; each mapped into the space
    and followed by its capped/grouped variants (none in this table's grid)."""
    shape = _shape(table, "vit_b b64")
    key = shape.key("fp16")
    rows = _feasible(table, shape)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    own, sibling, other, bucket = (rows[i].config for i in (10, 20, 30, 40))

    def entry(k, config):
        return db.Entry(key=k, config=config, latency_us=1.0, latency_spread_us=0.1, sqnr_db=40.0, trials=1,
                        protocol={"source": "test"})  # fmt: skip

    db.write_entries(shipped / "a100.yaml", [entry(key, other)], gpu="a100")
    db.write_entries(shipped / "h200.yaml", [entry(key, sibling)], gpu="h200")
    db.write_entries(
        shipped / "h100.yaml", [entry(key, own), entry(workload_key((8, 12, 197, 64)), bucket)], gpu="h100"
    )
    monkeypatch.setattr(db, "shipped_db_dir", lambda: shipped)
    space = SearchSpace(Grid.from_configs(table.configs("h100")), shape.n, shape.d)
    current = CurrentPick(rows[0].config, "sibling:h200:exact")
    got = plan.warm_starts(space, shape, "h100", "fp16", target=tmp_path / "db", mode="all", current=current)
    default = space.adapt(KernelConfig(p_bits=14, rescale="split", rescale_bits=0))
    assert got == [rows[0].config, own, sibling, other, default, bucket]
    assert plan.warm_starts(space, shape, "h100", "fp16", target=tmp_path / "db", mode="none") == [default]
    cold_db = plan.warm_starts(space, shape, "h100", "fp16", target=tmp_path / "db", mode="db", current=current)
    assert cold_db == [rows[0].config, default]  # --db only: no shipped file
