"""A SYNTHETIC measurement table for tests of the tuner's mechanics, and tests of the table format.

Nothing here is a measurement.  The latencies come from a made-up formula with seeded noise, the
SQNR from a made-up per-variant level: they exist so the search, the constraint handling, the
resume logic and the DB writing can be tested before real tables exist.  The table is labeled
synthetic in its header, uses the GPU name ``synthetic`` (so it can never pass for an H100's),
and is only ever written to a temporary directory.  Search quality is judged on the recorded H100
table (``tests/test_tune_recorded.py``), never on this one.
"""

from __future__ import annotations

import math
import random

import pytest

from qflash_gen.tune.measure import Measurement, Protocol, ShapeSpec
from qflash_gen.tune.space import GRIDS, SearchSpace
from qflash_gen.tune.table import TableWriter, read_table

SYNTHETIC_GPU = "synthetic"
SYNTHETIC_NOTE = "SYNTHETIC: invented numbers for tests of the search mechanics; not measured on any GPU"
SYNTHETIC_SHAPES = (ShapeSpec.of("vit_b", 8), ShapeSpec.of("swin_t_s1", 8))


def _synthetic_measurement(config, shape: ShapeSpec, rng: random.Random) -> Measurement:
    """A made-up latency with interactions between the axes (so the search has something to find)."""
    if config.block_m == 128 and config.num_warps == 2 and config.block_n >= 128:
        return Measurement.failed("SYNTHETIC failure (stands for out of resources)")
    programs = math.ceil(shape.n / config.block_m) * shape.b * shape.h
    waves = math.ceil(programs / (132 * max(1, 8 // config.num_warps)))
    tiles = math.ceil(shape.n / config.block_n)
    per_tile = config.block_m * config.block_n / (512.0 * config.num_warps) + 1.5
    stage_gain = 1.0 - 0.08 * min(config.num_stages - 1, tiles - 1)
    exp_cost = {"shift": 1.0, "idiv": 1.25, "poly2": 1.08, "lut": 1.12}[config.exp_variant]
    latency = 3.0 + waves * tiles * per_tile * stage_gain * exp_cost * (1 + 0.1 * (config.acc_bits == 64))
    latency *= 1.0 + rng.uniform(-0.01, 0.01)
    sqnr = {"shift": 29.0, "idiv": 29.1, "poly2": 37.0, "lut": 35.0}[config.exp_variant] + rng.uniform(-0.3, 0.3)
    return Measurement(latency_us=latency, spread_us=0.005 * latency, sqnr_db=sqnr, correct=True, error=None)


def write_synthetic_table(path, shapes=SYNTHETIC_SHAPES, grid=GRIDS["sweep"], seed=0) -> None:
    """Write a SYNTHETIC table (see the module doc) for ``shapes`` over ``grid``."""
    import torch
    import triton

    from qflash_gen import codegen

    rng = random.Random(seed)
    env = {
        "synthetic": SYNTHETIC_NOTE,
        "device": "none (synthetic)",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "template_sha256": codegen.template_hash(),
    }
    with TableWriter(path, Protocol().to_dict(), env) as w:
        for s in shapes:
            for c in SearchSpace(grid, s.n, s.d).configs():
                w.write(SYNTHETIC_GPU, s, c, _synthetic_measurement(c, s, rng))


@pytest.fixture(scope="session")
def synthetic_table(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "synthetic_sweep.csv"
    write_synthetic_table(path)
    return path


def test_synthetic_table_is_labeled_and_round_trips(synthetic_table):
    table = read_table(synthetic_table)
    assert table.environment["synthetic"] == SYNTHETIC_NOTE
    assert table.gpus() == [SYNTHETIC_GPU]
    n_expected = sum(SearchSpace(GRIDS["sweep"], s.n, s.d).size for s in SYNTHETIC_SHAPES)
    assert len(table) == n_expected
    row = table.rows[0]
    assert table.lookup(SYNTHETIC_GPU, row.shape, row.config) == row.measurement
    assert any(not r.measurement.correct for r in table.rows)  # failures are recorded, not dropped


def test_torn_last_row_is_an_error_to_read_and_dropped_when_the_writer_resumes(tmp_path):
    path = tmp_path / "t.csv"
    shape = SYNTHETIC_SHAPES[1]
    configs = SearchSpace(GRIDS["small"], shape.n, shape.d).configs()
    m = Measurement(latency_us=10.0, spread_us=0.1, sqnr_db=35.0, correct=True)
    with TableWriter(path, Protocol().to_dict(), {"synthetic": SYNTHETIC_NOTE}) as w:
        w.write(SYNTHETIC_GPU, shape, configs[0], m)
        w.write(SYNTHETIC_GPU, shape, configs[1], m)
    with open(path, "a", encoding="utf-8") as fh:  # a writer killed in the middle of a row
        fh.write('synthetic,swin_t_s1,8,512,3,49,32,true,"{""acc_bi')
    with pytest.raises(ValueError, match=rf"{path.name}:7: the last row is cut short .*--record"):
        read_table(path)  # a replay of a silently shortened table would look complete (issue 18, item 10)
    with TableWriter(path, Protocol().to_dict(), {}) as w:
        assert w.done(SYNTHETIC_GPU, shape, configs[1]) and not w.done(SYNTHETIC_GPU, shape, configs[2])
        w.write(SYNTHETIC_GPU, shape, configs[2], m)
    assert [r.config for r in read_table(path).rows] == configs[:3]


def test_writer_refuses_another_protocol(tmp_path):
    path = tmp_path / "t.csv"
    with TableWriter(path, Protocol().to_dict(), {}):
        pass
    with pytest.raises(ValueError, match="another protocol"):
        TableWriter(path, Protocol(rep_ms=200.0).to_dict(), {})
