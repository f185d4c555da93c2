"""KernelConfig.heads_per_program (several (batch, head) pairs per program, a pipelined loop),
the 16-row tail tile of a partial query block, and the shift exp's high-half-multiply quotient at
its edge (R = 1, where 64 MQ does not fit 32 bits): kernel == oracle, bit for bit."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bit_equal, int8_problem, run_both

from qflash_gen import KernelConfig, quant
from qflash_gen.config import DEFAULT_CONFIG
from qflash_gen.tune.space import GRIDS, Grid, SearchSpace

pytestmark = pytest.mark.gpu


def test_field_validation_summary_and_old_hashes():
    assert "heads_per_program" not in DEFAULT_CONFIG.to_dict()  # DB entries from before the field
    cfg = DEFAULT_CONFIG.replace(heads_per_program=4)
    assert cfg.to_dict()["heads_per_program"] == 4 and KernelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.short().endswith(" h4") and cfg.hash != DEFAULT_CONFIG.hash
    for bad in (0, 3, 16):
        with pytest.raises(ValueError, match="heads_per_program"):
            DEFAULT_CONFIG.replace(heads_per_program=bad)


@pytest.mark.parametrize(("g", "bh", "want"), [(1, 7, 1), (2, 768, 2), (4, 6, 2), (8, 3, 1), (8, 96, 8), (4, 12, 4)])
def test_heads_for_divides_the_grid(g, bh, want):
    assert DEFAULT_CONFIG.replace(heads_per_program=g).heads_for(bh) == want


def test_the_tuner_searches_the_axis():
    assert GRIDS["tune"].heads_per_program == (1, 2)
    assert "heads_per_program" not in Grid().to_dict()  # old grid hashes unchanged
    space = SearchSpace(GRIDS["tune"], 197, 64)
    cfg = DEFAULT_CONFIG.replace(block_n=256, rescale="shift", rescale_bits=15, heads_per_program=2)
    params = space.params_for(cfg)
    assert params is not None and params["heads_per_program"] == 2
    assert space.config_from_params(params)[0] == cfg
    with pytest.raises(ValueError, match="heads_per_program"):
        Grid(heads_per_program=(1, 5))


@pytest.mark.parametrize(
    ("cfg", "shape"),
    [
        # single pass, 197 rows in 64-row blocks: the last block runs as a 16-row tile
        (
            DEFAULT_CONFIG.replace(block_n=256, rescale="shift", rescale_bits=15, num_stages=2, heads_per_program=2),
            (2, 2, 197, 32),
        ),
        # online softmax (3 key tiles), 4 heads per program of 6 -> 2
        (DEFAULT_CONFIG.replace(block_m=32, block_n=32, heads_per_program=4), (2, 3, 70, 32)),
        # one head per program, tail tile of 16 rows under 32-row blocks
        (DEFAULT_CONFIG.replace(block_m=32, block_n=128), (1, 2, 70, 64)),
    ],
)
def test_kernel_equals_oracle(device, cfg, shape):
    q8, k8, v8 = int8_problem(*shape, seed=sum(shape), device=device)
    for out_dtype in (torch.int8, torch.float16):
        got, want = run_both(q8, k8, v8, (0.03, 0.025, 0.04), cfg, out_dtype=out_dtype)
        assert_bit_equal(got, want)


@pytest.mark.parametrize("sqk", [2.6, 1.6])  # R = 1 (64 MQ = 2**32 clamps to 2**32 - 1) and R = 2
def test_shift_quotient_at_the_smallest_r(device, sqk):
    params = quant.make_params(sqk, sqk, 0.05, head_dim=32)
    assert int(params.ints[0]) == (1 if sqk > 2 else 2)
    cfg = DEFAULT_CONFIG.replace(block_n=64, rescale="shift", rescale_bits=15)
    q8, k8, v8 = int8_problem(1, 2, 49, 32, seed=3, device=device, lo=-3, hi=3)
    got, want = run_both(q8, k8, v8, (sqk, sqk, 0.05), cfg, out_dtype=torch.float16)
    assert_bit_equal(got, want)


def test_seeds_are_followed_by_their_capped_and_head_grouped_variants():
    from qflash_gen.tune.plan import seed_variants

    space = SearchSpace(GRIDS["tune"], 197, 64)
    seed = DEFAULT_CONFIG.replace(block_n=256, rescale="shift", rescale_bits=15, num_stages=1)
    got = seed_variants(space, [seed, seed])
    assert got[0] == seed and len(got) == len(set(got))  # a repeated seed is not measured twice
    assert seed.replace(max_regs=168) in got
    piped = seed.replace(max_regs=168, heads_per_program=2, num_stages=2)
    assert piped in got and got.index(piped) > got.index(seed.replace(max_regs=168))
    assert all(c.heads_per_program == 1 or c.num_stages >= 2 for c in got)


@pytest.mark.parametrize(
    ("bm", "n", "want"),
    [(64, 197, 16), (32, 70, 16), (64, 49, 64), (128, 197, 128), (16, 197, 16), (64, 100, 64), (128, 40, 64)],
)
def test_tail_rows_mirror_the_template(bm, n, want):
    assert DEFAULT_CONFIG.replace(block_m=bm).tail_rows(n) == want
