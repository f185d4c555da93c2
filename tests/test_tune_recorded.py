"""The tuner on the H100 table recorded by tools/sweep.py (real measurements, replayed on CPU).

Runs when tests/data/h100_sweep.csv is in the checkout; it is recorded on an H100 with::

    python tools/sweep.py --gpu h100 --workloads vit_b,swin_t --batches 8,64 --record tests/data/h100_sweep.csv
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from qflash_gen import workloads
from qflash_gen.config import KernelConfig
from qflash_gen.tune import cli
from qflash_gen.tune.measure import ShapeSpec
from qflash_gen.tune.space import Grid, SearchSpace
from qflash_gen.tune.table import read_table

TABLE = Path(__file__).parent / "data" / "h100_sweep.csv"
pytestmark = pytest.mark.skipif(
    not TABLE.is_file(),
    reason=f"{TABLE.relative_to(Path(__file__).parent.parent)} (recorded on an H100 by tools/sweep.py) is not in this "
    "checkout yet",
)
FLOOR = 30.0
BUDGET_FRACTION = 0.3  # the search must get within 3 % of the optimum measuring 30 % of the grid


@pytest.fixture(scope="module")
def table():
    return read_table(TABLE)


def test_table_covers_the_issue_shapes(table):
    assert table.gpus() == ["h100"]
    assert not table.environment.get("synthetic")
    assert str(table.environment.get("device", "")).startswith("NVIDIA H100")
    have = {s.match_key() for s in table.shapes("h100")}
    for w in workloads.resolve("vit_b,swin_t"):
        for batch in (8, 64):
            assert ShapeSpec.of(w, batch).match_key() in have, (w.name, batch)
    for row in table.rows:
        if row.measurement.correct:
            assert row.measurement.latency_us > 0 and row.measurement.sqnr_db is not None
        else:
            assert row.measurement.error  # every failure says why


def test_simulated_tuning_reaches_the_recorded_best(table, tmp_path, capsys):
    grid = Grid.from_configs(table.configs("h100"))
    checked = 0
    for shape in table.shapes("h100"):
        best = table.best("h100", shape, FLOOR)
        if best is None:
            continue
        space = SearchSpace(grid, shape.n, shape.d)
        budget = max(5, math.ceil(BUDGET_FRACTION * space.size))
        db_dir = tmp_path / f"db-{shape.workload}-b{shape.batch}"  # one DB per shape: buckets can collide
        code = cli.main(
            [
                "--simulate", str(TABLE), "--workloads", shape.workload, "--batches", str(shape.batch),
                "--trials", str(budget), "--storage", str(tmp_path / "s.journal"), "--db", str(db_dir),
                "--quiet",
            ]
        )  # fmt: skip
        assert code == 0, capsys.readouterr().err
        doc = yaml.safe_load((db_dir / "h100.yaml").read_text())
        entry = next(
            e
            for e in doc["entries"]
            if e["protocol"]["workload"] == shape.workload and e["protocol"]["batch"] == shape.batch
        )
        assert entry["latency_us"] <= 1.03 * best.measurement.latency_us, (shape.label(), entry["config"])
        assert entry["protocol"]["source"] == "simulated" and entry["protocol"]["table_sha256"] == table.sha256
        assert table.lookup("h100", shape, KernelConfig.from_dict(entry["config"])).feasible(FLOOR)
        checked += 1
    assert checked >= 2
