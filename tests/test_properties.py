"""Hypothesis: random shapes, scales, configs and masks; the kernel always equals the oracle."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bit_equal, kernel_device, run_both
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qflash_gen import KernelConfig
from qflash_gen.config import fits

pytestmark = pytest.mark.gpu


@st.composite
def problems(draw):
    n = draw(st.integers(1, 80))
    d = draw(st.sampled_from([32, 64]))
    b, h = draw(st.sampled_from([(1, 2), (2, 1), (2, 2)]))
    exp = draw(st.sampled_from(["shift", "idiv", "poly2", "lut"]))
    rescale = draw(st.sampled_from(["shift", "idiv"]))
    cfg = KernelConfig(
        block_m=draw(st.sampled_from([16, 32, 64])),
        block_n=draw(st.sampled_from([32, 64, 128])),
        exp_variant=exp,
        lut_bits=draw(st.integers(2, 8)) if exp == "lut" else 0,
        rescale=rescale,
        rescale_bits=draw(st.integers(1, 15)) if rescale == "shift" else 0,
        acc_bits=draw(st.sampled_from([32, 64])),
    )
    if not fits(cfg, n, d):
        cfg = cfg.replace(acc_bits=64)
    scales = tuple(draw(st.floats(1e-4, 0.5)) for _ in range(3))
    seed = draw(st.integers(0, 2**16))
    masked = draw(st.booleans())
    out_dtype = draw(st.sampled_from([torch.int8, torch.float16]))
    return n, d, b, h, cfg, scales, seed, masked, out_dtype


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_random_problems_match_the_oracle(p):
    n, d, b, h, cfg, scales, seed, masked, out_dtype = p
    g = torch.Generator().manual_seed(seed)
    dev = kernel_device()
    q8, k8, v8 = (torch.randint(-128, 128, (b, h, n, d), generator=g, dtype=torch.int8).to(dev) for _ in range(3))
    mask = bias = None
    if masked:
        mask = (torch.rand((b, 1, n, n), generator=g) > 0.3).to(dev)
        bias = torch.randn((1, h, n, n), generator=g).to(dev)
    got, want = run_both(q8, k8, v8, scales, cfg, attn_mask=mask, float_bias=bias, out_dtype=out_dtype)
    assert_bit_equal(got, want)
