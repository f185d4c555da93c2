"""Public API: float attention vs fp64 (SQNR), reference backend identity, the bad-input rules of docs/design.md."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_bit_equal, int8_problem, run_both

import qflash_gen
from qflash_gen import DEFAULT_CONFIG, KernelConfig, attention, attention_int8, quant_kernels
from qflash_gen.reference import float_attention, sqnr_db

pytestmark = pytest.mark.gpu


def _uniform(shape, seed, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 8 - 4).to(device=device, dtype=dtype)


@pytest.mark.parametrize("shape", [(1, 6, 197, 64), (1, 24, 49, 32)], ids=["A2", "A7"])
def test_default_config_sqnr_at_paper_shapes(shape, device):
    q, k, v = (_uniform(shape, s, device) for s in range(3))
    out = attention(q, k, v)
    ref = float_attention(q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert sqnr_db(out, ref) >= 30.0
    assert_bit_equal(out, attention(q, k, v, backend="reference"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_float_dtypes_round_trip_with_mask(dtype, device):
    shape = (2, 2, 33, 32)
    q, k, v = (_uniform(shape, s, device, dtype) for s in range(3))
    mask = torch.rand(33, 33, generator=torch.Generator().manual_seed(1)).to(device) > 0.2
    out = attention(q, k, v, attn_mask=mask, scale=0.2)
    assert out.dtype == dtype
    assert_bit_equal(out, attention(q, k, v, attn_mask=mask, scale=0.2, backend="reference"))
    assert sqnr_db(out, float_attention(q, k, v, attn_mask=mask, scale=0.2)) >= 25.0


def test_strided_views_work(device):
    base = _uniform((2, 40, 3, 32), 5, device)  # (B, N, H, D) -> (B, H, N, D) view, not contiguous
    q = k = v = base.transpose(1, 2)
    assert not q.is_contiguous()
    assert_bit_equal(attention(q, k, v), attention(q.contiguous(), k.contiguous(), v.contiguous()))


def test_fully_masked_rows_give_zeros(device):
    q8, k8, v8 = int8_problem(1, 2, 20, 32, device=device)
    mask = torch.ones(20, 20, dtype=torch.bool, device=device)
    mask[3] = False
    got, want = run_both(q8, k8, v8, (0.05, 0.05, 0.05), DEFAULT_CONFIG, attn_mask=mask, out_dtype=torch.float16)
    assert_bit_equal(got, want)
    assert bool((got[:, :, 3] == 0).all()) and bool(torch.isfinite(got).all())
    assert bool((got[:, :, 4] != 0).any())


def test_all_zero_inputs_give_zeros(device):
    """All-zero tensors: scale 1 (no division by zero), zeros out, the oracle's bits; zero q and
    k with a nonzero v (every score 0: uniform weights) give v's mean, not zeros."""
    z = torch.zeros(1, 2, 17, 64, device=device)
    out = attention(z, z, z)
    assert_bit_equal(out, attention(z, z, z, backend="reference"))
    assert bool((out == 0).all()) and bool(torch.isfinite(out).all())
    *_, params = quant_kernels.quantize_heads(z, z, z)
    assert bool((params.scales[..., :3] == 1).all())
    v = _uniform(z.shape, 7, device)
    out = attention(z, z, v)
    assert_bit_equal(out, attention(z, z, v, backend="reference"))
    assert bool((out != 0).any())
    assert sqnr_db(out, float_attention(z, z, v)) >= 30.0  # the mean of v over the keys


def test_int8_extremes_at_largest_int32_n(device):
    """All -128 / 127 at the largest N the default int32 config accepts: no overflow, == oracle.

    (The oracle itself raises OverflowError if an int32 intermediate leaves the int32 range.)
    With 14-bit P the int8 output's rounding numerator |acc| + l/2 <= N * (16383 * 128 + 8191)
    is the binding bound: N = 1020."""
    n = 1020
    assert n * (16383 * 128 + 8191) < 2**31 <= (n + 1) * (16383 * 128 + 8191)
    cfg = DEFAULT_CONFIG.replace(block_m=128)
    q8 = torch.full((1, 1, n, 64), 127, dtype=torch.int8, device=device)
    k8 = torch.full((1, 1, n, 64), 127, dtype=torch.int8, device=device)
    v8 = torch.full((1, 1, n, 64), -128, dtype=torch.int8, device=device)
    k8[..., ::2, :] = -128  # two score levels so the online max moves and rescales run
    got, want = run_both(q8, k8, v8, (0.02, 0.02, 0.02), cfg, out_dtype=torch.int8)
    assert_bit_equal(got, want)
    assert bool((got == -128).all())
    with pytest.raises(ValueError, match="overflows int32"):
        run_both(*int8_problem(1, 1, n + 1, 64, device=device), (0.02, 0.02, 0.02), cfg)


def test_non_finite_inputs(device):
    q = _uniform((1, 2, 17, 32), 0, device)
    k, v = q.clone(), _uniform((1, 2, 17, 32), 1, device)
    q[0, 0, 0, 0] = float("nan")
    k[0, 1, 2, 3] = float("inf")
    k[0, 1, 4, 5] = -float("inf")
    v[0, 0, 6, 7] = float("nan")
    with pytest.raises(ValueError, match="q contains NaN or Inf"):
        attention(q, k, v, check_finite=True)
    # Without the (syncing) check: documented behaviour, NaN -> 0, Inf -> +-127 of a scale taken
    # from the finite values, finite output; the kernel gives the oracle's bits.
    out = attention(q, k, v)
    assert_bit_equal(out, attention(q, k, v, backend="reference"))
    assert bool(torch.isfinite(out).all()) and bool((out != 0).any())
    q8, k8, v8, params = quant_kernels.quantize_heads(q, k, v)
    assert int(q8[0, 0, 0, 0]) == 0 and int(v8[0, 0, 6, 7]) == 0
    assert int(k8[0, 1, 2, 3]) == 127 and int(k8[0, 1, 4, 5]) == -127
    finite = q[0, 0].nan_to_num(0.0).abs().amax() / torch.tensor(127.0, device=device)
    assert float(params.scales[0, 0, 0]) == float(finite)  # the NaN is left out of q's scale
    assert bool(torch.isfinite(params.scales).all())


def test_empty_inputs_launch_nothing():
    for shape in [(1, 2, 0, 32), (0, 2, 17, 32), (2, 0, 17, 64)]:
        q = torch.randn(shape)
        out = attention(q, q, q)
        assert out.shape == shape and out.dtype == q.dtype
        q8 = torch.zeros(shape, dtype=torch.int8)
        assert attention_int8(q8, q8, q8, (1.0, 1.0, 1.0)).shape == shape


BAD = [
    (lambda q: (q.to(torch.float64), q, q), {}, "q has dtype torch.float64"),
    (lambda q: (q, q.to(torch.int32), q), {}, "k has dtype"),
    (lambda q: (q[0], q[0], q[0]), {}, "rank 4"),
    (lambda q: (q, q[:, :, :5], q), {}, "same shape"),
    (lambda q: (q[..., :16], q[..., :16], q[..., :16]), {}, "head_dim D=16 is not supported"),
    (lambda q: (q, q.to("meta"), q), {}, "one device"),
    (lambda q: (q, q, q), {"backend": "cuda"}, "backend='cuda' is unknown"),
    (lambda q: (q, q, q), {"config": {"block_m": 64}}, "config must be a KernelConfig"),
    (lambda q: (q, q, q), {"attn_mask": torch.ones(3, 3, dtype=torch.bool)}, "does not broadcast"),
    (lambda q: (q, q, q), {"attn_mask": torch.ones(17, 17, dtype=torch.int64)}, "bool .* or floating"),
    (lambda q: (q, q, q), {"scale": -1.0}, "positive finite softmax scale"),
    (lambda q: (q, q, q), {"scale": "x"}, "scale must be a float"),
    (lambda q: ("q", q, q), {}, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("make, kwargs, msg", BAD)
def test_bad_input_is_a_clear_value_error(make, kwargs, msg):
    q = torch.randn(1, 2, 17, 32)
    with pytest.raises(ValueError, match=msg):
        attention(*make(q), **kwargs)


def test_attention_int8_bad_input():
    q8 = torch.zeros(1, 2, 17, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match="attention_int8 supports"):
        attention_int8(q8.float(), q8, q8, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="scales must be a tuple"):
        attention_int8(q8, q8, q8, 1.0)
    with pytest.raises(ValueError, match="out_dtype"):
        attention_int8(q8, q8, q8, (1.0, 1.0, 1.0), out_dtype=torch.int32)
    with pytest.raises(ValueError, match="float_bias must be floating"):
        attention_int8(q8, q8, q8, (1.0, 1.0, 1.0), float_bias=torch.ones(17, 17, dtype=torch.bool))


def test_cpu_tensors_without_interpreter_get_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 17, 32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        attention(q, q, q)


def test_default_config_widens_where_int32_would_overflow():
    assert qflash_gen.config.default_config(197, 64) == DEFAULT_CONFIG
    wide = qflash_gen.config.default_config(1021, 64)  # 14-bit P: int32 holds N <= 1020
    assert wide.acc_bits == 64 and wide.replace(acc_bits=32) == DEFAULT_CONFIG
    assert math.isfinite(sqnr_db(torch.ones(3), torch.ones(3) * 1.01))


def test_explicit_config_is_checked_against_the_workload():
    q = torch.randn(1, 1, 577, 64)
    with pytest.raises(ValueError, match="overflows int32 at N=577"):
        attention(q, q, q, config=KernelConfig())
