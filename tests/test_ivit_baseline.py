"""tools/ivit_baseline.py (the unfused I-ViT-style integer attention of the benchmark) against the
oracle: the same bits as ``reference_int8`` under the single-pass config ``config_for(N)``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from qflash_gen import quant
from qflash_gen.reference import reference_int8

TOOL = Path(__file__).resolve().parents[1] / "tools" / "ivit_baseline.py"


@pytest.fixture(scope="module")
def ivit():
    spec = importlib.util.spec_from_file_location("ivit_baseline", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(b, h, n, d, seed):
    """Random int8 q, k, v over all of -128..127, with extremes and one peaked row per head."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randint(-128, 128, (b, h, n, d), generator=g, dtype=torch.int8) for _ in range(3))
    q[..., 0, :] = 127  # row 0 meets key n // 2 at the largest score: a peaked row
    k[..., n // 2, :] = 127
    q[..., -1, :] = -128  # the last row: the most negative q against everything
    v[..., 0, :] = -128  # extremes of V
    v[..., -1, :] = 127
    return q, k, v


# (sq, sk, sv): R in the hundreds (peaked rows), in the ten thousands, R = 1 (MQ32 = 2**32 - 1),
# R clamped to 65535 (flat rows)
SCALES = [(0.1, 0.1, 0.02), (0.02, 0.02, 0.03), (2.0, 2.0, 0.01), (1e-4, 1e-4, 0.05)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 2, 49, 32), (1, 1, 197, 64), (2, 1, 5, 64)])
@pytest.mark.parametrize("scales", SCALES, ids=["peaked", "mid", "r1", "flat"])
def test_equals_oracle(ivit, device, shape, scales):
    b, h, n, d = shape
    q, k, v = (x.to(device) for x in _inputs(b, h, n, d, seed=n))
    params = quant.make_params(*scales, head_dim=d, device=device)
    cfg = ivit.config_for(n)
    assert cfg.block_n >= n and cfg.exp_variant == "shift" and cfg.p_bits == 14
    got = ivit.ivit_attention(q, k, v, params)
    want = reference_int8(q, k, v, params, cfg, out_dtype=torch.float16)
    assert got.dtype == want.dtype == torch.float16 and got.shape == want.shape
    same = got.view(torch.int16) == want.view(torch.int16)
    assert bool(same.all()), f"{int((~same).sum())} of {same.numel()} outputs differ"


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_other_out_dtypes(ivit, device, out_dtype):
    q, k, v = (x.to(device) for x in _inputs(1, 2, 197, 64, seed=1))
    params = quant.make_params(*SCALES[1], head_dim=64, device=device)
    got = ivit.ivit_attention(q, k, v, params, out_dtype=out_dtype)
    want = reference_int8(q, k, v, params, ivit.config_for(197), out_dtype=out_dtype)
    view = torch.int16 if out_dtype == torch.bfloat16 else torch.int32
    assert got.dtype == out_dtype and bool((got.view(view) == want.view(view)).all())


def test_config_for(ivit):
    assert [ivit.config_for(n).block_n for n in (1, 32, 33, 197, 256)] == [32, 32, 64, 256, 256]
    with pytest.raises(ValueError):
        ivit.config_for(257)
    assert ivit.intermediate_bytes(1, 1, 10) == 10 * 16 * 6 + 40  # rows padded to 16
