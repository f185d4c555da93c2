"""tools/tuner_efficiency.py runs the real search loop against a table and reports a markdown table.

Mechanics only, on a SYNTHETIC table: the numbers it prints here say nothing about the tuner's
quality (that is measured on the recorded H100 table and reported in docs/)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from test_tune_synthetic import SYNTHETIC_NOTE, write_synthetic_table

from qflash_gen.tune.measure import ShapeSpec

TOOL = Path(__file__).resolve().parents[1] / "tools" / "tuner_efficiency.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("tuner_efficiency", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_efficiency_table(tool, tmp_path, capsys):
    table = tmp_path / "small.csv"
    write_synthetic_table(table, shapes=(ShapeSpec.of("swin_t_s4", 8),))
    assert tool.main([str(table), "--seeds", "10"]) == 0
    out = capsys.readouterr().out
    assert SYNTHETIC_NOTE in out  # a synthetic table says so in the report
    (row,) = [line for line in out.splitlines() if line.startswith("| swin_t_s4")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    grid, feasible, within = int(cells[3]), int(cells[4]), int(cells[5])
    assert 0 < within <= feasible <= grid
    for median_cell in (cells[6], cells[8]):  # tpe, random: "median [q1, q3]"
        med, q1, q3 = map(int, re.match(r"(\d+) \[(\d+), (\d+)\]", median_cell).groups())
        assert 1 <= q1 <= med <= q3 <= grid
    assert float(cells[10]) == pytest.approx((grid + 1) / (within + 1), abs=0.05)


def test_efficiency_needs_ten_seeds(tool, tmp_path):
    with pytest.raises(SystemExit):
        tool.main([str(tmp_path / "x.csv"), "--seeds", "3"])
