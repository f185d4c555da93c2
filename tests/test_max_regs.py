"""KernelConfig.max_regs (Triton's maxnreg): validation, hash stability, the tuner's axis."""

from __future__ import annotations

import pytest

from qflash_gen.config import DEFAULT_CONFIG, KernelConfig
from qflash_gen.tune.space import GRIDS, Grid, SearchSpace


def test_max_regs_values_and_summary():
    assert KernelConfig(max_regs=168).short().endswith(" r168")
    assert not DEFAULT_CONFIG.short().split()[-1].startswith("r")
    for bad in (7, 20, 100, 256, -8, True):
        with pytest.raises(ValueError, match="max_regs"):
            KernelConfig(max_regs=bad)


def test_zero_max_regs_keeps_old_dicts_and_hashes():
    d = DEFAULT_CONFIG.to_dict()
    assert "max_regs" not in d  # what the DB and journals recorded before the field
    assert KernelConfig.from_dict(d) == DEFAULT_CONFIG
    capped = DEFAULT_CONFIG.replace(max_regs=128)
    assert capped.to_dict()["max_regs"] == 128 and KernelConfig.from_dict(capped.to_dict()) == capped
    assert capped.hash != DEFAULT_CONFIG.hash


def test_tune_grid_searches_register_caps():
    space = SearchSpace(GRIDS["tune"], 197, 64)
    assert space.choices["max_regs"] == (0, 168, 128)
    cfg = DEFAULT_CONFIG.replace(block_n=256, rescale="shift", rescale_bits=15, max_regs=168)
    params = space.params_for(cfg)
    assert params is not None and params["max_regs"] == 168
    assert space.config_from_params(params) == (cfg, None)
    assert space.adapt(cfg) == cfg
    assert "max_regs" not in Grid().to_dict()  # the default axis leaves old grid hashes alone
    assert Grid.from_configs([cfg, cfg.replace(max_regs=0)]).max_regs == (168, 0)
    with pytest.raises(ValueError, match="max_regs"):
        Grid(max_regs=(0, 99))


def test_cli_grid_takes_and_checks_max_regs():
    import argparse

    from qflash_gen.tune import setup

    args = argparse.Namespace(simulate=None, exhaustive=False, grid=None, p_bits=None, max_regs="0,168")
    assert setup.grid_for(args, None).max_regs == (0, 168)
    args.max_regs = "0,99"
    with pytest.raises(setup.UsageError, match="--max-regs '0,99'.*max_regs"):
        setup.grid_for(args, None)
