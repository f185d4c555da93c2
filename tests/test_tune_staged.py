"""The staged climb (qflash_gen/tune/staged.py) and the single-pass rescale twins: mechanics on
small hand-made tables (their numbers are invented and say nothing about search quality; that
is tests/test_tune_efficiency.py, on a recorded table)."""

from __future__ import annotations

import optuna
import pytest

from qflash_gen.config import KernelConfig
from qflash_gen.tune.measure import Measurement, Protocol, ShapeSpec
from qflash_gen.tune.measure.simulate import SimulatedMeasurer
from qflash_gen.tune.space import GRIDS, Grid, SearchSpace
from qflash_gen.tune.staged import STAGES, Climb, moves
from qflash_gen.tune.study import run_study
from qflash_gen.tune.table import TableWriter, read_table
from qflash_gen.tune.trials import TrialRecord

VIT = ShapeSpec.of("vit_b", 8)  # N = 197: block_n 256 is a single pass
GRID = Grid(
    block_m=(32, 64), block_n=(64, 256), num_warps=(4,), num_stages=(1, 2), exp=("shift",),
    rescale=("split", "shift15"), p_bits=(14,),
)  # fmt: skip


def _latency(c: KernelConfig) -> float:  # invented: single pass, 32 rows and 2 stages are faster
    return 10.0 - 3.0 * (c.block_n == 256) - 1.0 * (c.block_m == 32) - 0.5 * (c.num_stages == 2)


@pytest.fixture
def twin_table(tmp_path):
    """A table of GRID as a sweep records it: one row per kernel (single passes: the split twin)."""
    space = SearchSpace(GRID, VIT.n, VIT.d)
    path = tmp_path / "twins.csv"
    with TableWriter(path, Protocol().to_dict(), {"synthetic": "invented numbers"}) as w:
        for c in space.configs():
            if space.canonical(c) == c:
                m = Measurement(latency_us=_latency(c), spread_us=0.01, sqnr_db=40.0, correct=True)
                w.write("synthetic", VIT, c, m)
    return path


def test_a_single_pass_twin_replays_its_recorded_row_and_is_never_measured(twin_table):
    table = read_table(twin_table)
    space = SearchSpace(GRID, VIT.n, VIT.d)
    single = KernelConfig(block_m=64, block_n=256, rescale="split", rescale_bits=0, p_bits=14, num_warps=4)
    twin = single.replace(rescale="shift", rescale_bits=15)
    assert space.equivalent(single, twin) and single != twin
    assert table.lookup("synthetic", VIT, twin) == table.lookup("synthetic", VIT, single) is not None
    multi = next(c for c in space.configs() if c.block_n == 64 and c.rescale == "shift")  # int64 acc at 14-bit P
    assert not space.equivalent(multi, multi.replace(rescale="split", rescale_bits=0, acc_bits=32))
    assert table.lookup("synthetic", VIT, multi) is not None  # multi-pass configs are all recorded
    measurer = SimulatedMeasurer(table)
    kernels = len(space.kernel_hashes)
    assert kernels < space.size  # 12 configs, 10 kernels
    result = run_study(
        VIT, measurer, space, storage=optuna.storages.InMemoryStorage(), name="twins", budget=space.size, seed=0
    )
    assert measurer.calls == kernels == result.n_measured  # every kernel once, no twin measured
    assert result.best.latency_us == min(_latency(c) for c in space.configs())


def test_the_climb_moves_tiling_first_and_never_to_a_twin():
    space = SearchSpace(GRIDS["tune"], VIT.n, VIT.d)
    center = KernelConfig(
        block_m=64, block_n=256, num_warps=4, num_stages=2, rescale="split", rescale_bits=0, p_bits=14
    )
    tiling = list(moves(space, center, STAGES[0]))
    assert tiling and all(
        sum(getattr(c, f) != getattr(center, f) for f in ("block_n", "block_m", "num_warps", "num_stages")) == 1
        for c in tiling
    )
    numeric = list(moves(space, center, STAGES[1]))
    assert numeric and all(c.exp_variant != center.exp_variant for c in numeric)  # no rescale move: a single pass
    launch = list(moves(space, center, STAGES[2]))
    assert {(c.max_regs, c.heads_per_program) for c in launch} == {(0, 2), (168, 1), (168, 2), (128, 1), (128, 2)}

    def rec(i, c, lat, sqnr=40.0):
        return TrialRecord(i, c, Measurement(latency_us=lat, spread_us=0.0, sqnr_db=sqnr, correct=True))

    climb = Climb(space, 30.0)
    records = [rec(0, center, 10.0)]
    assert climb.propose(records) == tiling  # the whole stage, in order: the study compiles it as a batch
    assert climb.propose(records, taken=lambda c: c == tiling[0]) == tiling[1:]  # another process measures it
    first = climb.propose(records)[0]
    assert first == tiling[0]  # the first tiling move
    # a faster config found while the tiling stage is not measured yet: the centre waits
    records.append(rec(1, first, 5.0))
    assert climb.propose(records)[0] == tiling[1] and climb.center.config == center
    # the stage measured: the centre moves to the best, and its own tiling moves come next
    records += [rec(2 + i, c, 20.0) for i, c in enumerate(tiling[1:])]
    nxt = climb.propose(records)[0]
    assert climb.center.config == first and nxt in set(moves(space, first, STAGES[0]))
    # below the SQNR floor, the numeric moves come first
    low = Climb(space, 30.0)
    assert low.propose([rec(0, center, 10.0, sqnr=25.0)])[0] == numeric[0]
