"""KernelConfig: validation, plain-dict round trip, stable hash, per-workload overflow bound."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qflash_gen import DEFAULT_CONFIG, KernelConfig
from qflash_gen.config import accumulator_bounds, check_workload, fits, single_pass


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"block_m": 48}, "block_m"),
        ({"block_n": 16}, "block_n"),
        ({"num_warps": 3}, "num_warps"),
        ({"num_stages": 0}, "num_stages"),
        ({"exp_variant": "exp"}, "exp_variant"),
        ({"acc_bits": 16}, "acc_bits"),
        ({"rescale": "lazy"}, "rescale"),
        ({"rescale_bits": 16}, "rescale_bits"),
        ({"rescale": "idiv"}, "rescale_bits"),  # idiv with rescale_bits=8 left over
        ({"exp_variant": "lut"}, "lut_bits"),  # lut needs lut_bits
        ({"lut_bits": 5}, "lut_bits"),  # lut_bits without lut
        ({"block_m": 64.0}, "block_m"),
        ({"acc_bits": True}, "acc_bits"),
    ],
)
def test_invalid_combinations_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"KernelConfig.{field}="):
        KernelConfig(**changes)


def test_dict_round_trip_and_hash():
    cfg = KernelConfig(block_m=32, block_n=128, exp_variant="lut", lut_bits=6, acc_bits=64, rescale_bits=12)
    d = cfg.to_dict()
    assert all(isinstance(v, (int, str)) for v in d.values())
    again = KernelConfig.from_dict(dict(d))
    assert again == cfg and again.hash == cfg.hash
    assert cfg.hash != DEFAULT_CONFIG.hash
    with pytest.raises(ValueError, match="unknown KernelConfig field"):
        KernelConfig.from_dict({**d, "blockm": 3})
    with pytest.raises(ValueError, match="mapping"):
        KernelConfig.from_dict([("block_m", 64)])


def test_hash_is_stable_across_processes():
    code = "from qflash_gen import KernelConfig; print(KernelConfig(block_n=256, exp_variant='poly2').hash)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == KernelConfig(block_n=256, exp_variant="poly2").hash


def test_overflow_bound_per_workload():
    # 7-bit P, int32 + shift8: |acc| * 2**8 < 2**31 holds up to N = 516, not at 517.
    shift8 = KernelConfig(rescale="shift", rescale_bits=8, p_bits=7)
    assert fits(shift8, 516, 64) and not fits(shift8, 517, 64)
    with pytest.raises(ValueError, match="use acc_bits=64 or rescale='split'"):
        check_workload(shift8, 577, 64)
    assert fits(shift8.replace(acc_bits=64), 577, 64)
    # 14-bit P: shift8 overflows online at any real N; split holds until the int8 output's
    # rounding numerator |acc| + l/2 <= N * (16383 * 128 + 8191) leaves int32: N = 1020.
    assert not fits(shift8.replace(p_bits=14), 197, 64)  # online (block_n=64 < N)
    assert fits(DEFAULT_CONFIG, 1020, 64) and not fits(DEFAULT_CONFIG, 1021, 64)
    with pytest.raises(ValueError, match="acc_round"):
        check_workload(DEFAULT_CONFIG, 1021, 64)
    assert fits(DEFAULT_CONFIG.replace(acc_bits=64), 4096, 64)
    # int32 + idiv cannot rescale online at any N > 1, but single-pass has no rescale at all.
    idiv32 = KernelConfig(rescale="idiv", rescale_bits=0, block_n=256)
    assert single_pass(idiv32, 197) and fits(idiv32, 197, 64)
    assert not fits(idiv32.replace(block_n=64), 197, 64)
    b = accumulator_bounds(shift8, 197, 64)
    assert b["acc"] == 197 * 127 * 128 and b["l"] == 197 * 127
    b = accumulator_bounds(DEFAULT_CONFIG, 197, 64)
    assert b["acc"] == 197 * 16383 * 128 and b["l"] == 197 * 16383
