"""The search space (constraints, Optuna params) and the pick (tie rule, Pareto front)."""

from __future__ import annotations

import pytest

from qflash_gen import config as cfgmod
from qflash_gen.config import KernelConfig
from qflash_gen.tune.measure import Measurement
from qflash_gen.tune.space import GRIDS, Grid, SearchSpace, complexity, smem_estimate
from qflash_gen.tune.trials import TrialRecord, pareto_front, select_best


@pytest.mark.parametrize(
    "n,block_n",
    [(1, (32,)), (49, (32, 64)), (64, (32, 64)), (197, (32, 64, 128, 256)), (577, (32, 64, 128, 256))],
)
def test_tiles_beyond_the_first_covering_n_are_not_searched(n, block_n):
    space = SearchSpace(Grid(), n, 64)
    assert space.choices["block_n"] == block_n
    # block_m: the values below N plus the smallest >= N
    expected_m = (
        tuple(v for v in cfgmod.BLOCK_M_VALUES if v < n) + tuple(v for v in cfgmod.BLOCK_M_VALUES if v >= n)[:1]
    )
    assert space.choices["block_m"] == expected_m


@pytest.mark.parametrize("n", [49, 197, 577])
def test_every_config_fits_and_acc_width_is_the_narrowest(n):
    space = SearchSpace(GRIDS["tune"], n, 64)
    configs = space.configs()
    assert configs and len({c.hash for c in configs}) == len(configs)
    for c in configs:
        assert cfgmod.fits(c, n, 64)
        if c.acc_bits == 64:
            assert not cfgmod.fits(c.replace(acc_bits=32), n, 64)
    assert any(c.acc_bits == 64 for c in configs)  # idiv rescale at N > block_n needs int64


def test_explicit_acc_axis_makes_overflowing_configs_infeasible():
    grid = Grid(rescale=("idiv",), acc_bits=(32, 64))
    space = SearchSpace(grid, 197, 64)
    config, reason = space.config_from_params(
        {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2, "exp": "shift", "acc_bits": 32}
    )
    assert config.acc_bits == 32 and reason is not None and "overflow" in reason
    assert all(c.acc_bits == 64 or c.block_n >= 197 for c in space.configs())


def test_shared_memory_limit_prunes_by_the_estimate():
    limit = 40_000
    space = SearchSpace(GRIDS["tune"], 577, 64, smem_limit=limit)
    unlimited = SearchSpace(GRIDS["tune"], 577, 64)
    assert 0 < space.size < unlimited.size
    assert all(smem_estimate(c, 64) <= limit for c in space.configs())
    big = KernelConfig(block_m=128, block_n=256, num_stages=4, acc_bits=64, p_bits=14)  # int64: shift8 at N=577
    _, reason = space.config_from_params(space.params_for(big) or {})
    assert reason is not None and "shared memory" in reason


def test_params_round_trip_for_every_config():
    space = SearchSpace(GRIDS["tune"], 197, 64)
    for c in space.configs():
        params = space.params_for(c)
        assert params is not None and set(params) == set(space.distributions)
        assert space.config_from_params(params) == (c, None)
    outside = KernelConfig(block_m=64, block_n=64, exp_variant="lut", lut_bits=3)
    assert space.params_for(outside) is None


def test_grid_from_configs_recovers_the_grid():
    grid = GRIDS["sweep"]
    configs = SearchSpace(grid, 197, 64).configs() + SearchSpace(grid, 49, 32).configs()
    assert Grid.from_configs(configs) == grid


@pytest.mark.parametrize(
    "bad", [dict(block_m=(48,)), dict(exp=("exp3",)), dict(rescale=("shift31",)), dict(num_warps=())]
)
def test_bad_grid_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="Grid|exp choice|rescale choice"):
        Grid(**bad)


def _rec(i, config, lat, sqnr=40.0, spread=0.0, correct=True):
    m = Measurement(latency_us=lat, spread_us=spread, sqnr_db=sqnr, correct=correct, error=None if correct else "x")
    return TrialRecord(i, config, m)


def test_select_best_prefers_simpler_within_noise_only():
    fast = KernelConfig(block_m=128, block_n=128, num_warps=8, num_stages=3, exp_variant="poly2")
    simple = KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=1, exp_variant="poly2")
    assert complexity(simple) < complexity(fast)
    # 0.5 % slower: a tie (noise), the simpler config wins
    assert select_best([_rec(0, fast, 10.0), _rec(1, simple, 10.05)], 30.0).config == simple
    # 5 % slower: not a tie even with large spreads (ties are capped at 2 %)
    picked = select_best([_rec(0, fast, 10.0, spread=2.0), _rec(1, simple, 10.5, spread=2.0)], 30.0)
    assert picked.config == fast


def test_select_best_respects_floor_and_correctness():
    a = KernelConfig(block_m=64, block_n=64)
    b = KernelConfig(block_m=32, block_n=64)
    c = KernelConfig(block_m=128, block_n=64)
    records = [_rec(0, a, 5.0, sqnr=25.0), _rec(1, b, 4.0, correct=False), _rec(2, c, 9.0, sqnr=31.0)]
    assert select_best(records, 30.0).config == c
    assert select_best(records[:2], 30.0) is None


def test_pareto_front_is_the_non_dominated_set():
    cfgs = [KernelConfig(block_m=m, block_n=n) for m in (32, 64, 128) for n in (32, 64)]
    points = [(10, 30), (12, 35), (11, 29), (15, 40), (16, 39), (9, 20)]
    records = [_rec(i, c, lat, sqnr) for i, (c, (lat, sqnr)) in enumerate(zip(cfgs, points, strict=False))]
    front = pareto_front(records)
    got = [(r.latency_us, r.sqnr_db) for r in front]
    assert got == [(9, 20), (10, 30), (12, 35), (15, 40)]
    for r in records:
        if r not in front:
            assert any(f.latency_us <= r.latency_us and f.sqnr_db >= r.sqnr_db for f in front)
