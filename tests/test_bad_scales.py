"""Bad scales and softmax scales (issue 18, items 1 and 10): Python numbers are checked before any
launch and named in the error; device tensors are not read on the host (no sync), and what they
do is pinned here; tiny inputs never give an infinite reciprocal."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_bit_equal, int8_problem, kernel_device

from qflash_gen import DEFAULT_CONFIG, attention, attention_int8, get_kernel, quant
from qflash_gen.reference import float_attention, reference_int8

pytestmark = pytest.mark.gpu

BAD = [0.0, -0.02, math.nan, math.inf, -math.inf, True, "0.1", None]


@pytest.mark.parametrize("bad", BAD, ids=repr)
@pytest.mark.parametrize("which", [0, 1, 2])
def test_bad_python_scales_are_refused_by_attention_int8(bad, which):
    q8, k8, v8 = int8_problem(1, 2, 16, 32, device=kernel_device())
    scales = [0.02, 0.03, 0.05]
    scales[which] = bad
    name = ("sq", "sk", "sv")[which]
    with pytest.raises(ValueError, match=name):
        attention_int8(q8, k8, v8, tuple(scales), config=DEFAULT_CONFIG)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, True], ids=repr)
def test_bad_python_scales_are_refused_by_a_kernel_call(bad):
    q8, k8, v8 = int8_problem(1, 2, 16, 32, device=kernel_device())
    kern = get_kernel(q8.shape, dtype=torch.int8, gpu="cpu")
    with pytest.raises(ValueError, match="sk"):
        kern(q8, k8, v8, (0.02, bad, 0.05))


def test_scales_that_do_not_fit_the_heads_are_refused():
    q8, k8, v8 = int8_problem(2, 3, 16, 32, device=kernel_device())
    per_head = torch.full((4,), 0.02, device=q8.device)  # 4 scales for 3 heads
    with pytest.raises(ValueError, match=r"do not broadcast to \(B, H\)"):
        attention_int8(q8, k8, v8, (per_head, 0.02, 0.02), config=DEFAULT_CONFIG)


def test_a_bool_softmax_scale_is_refused_everywhere():
    q = torch.randn(1, 2, 16, 32, device=kernel_device())
    with pytest.raises(ValueError, match="scale must be a float"):
        attention(q, q, q, scale=True)
    q8, k8, v8 = int8_problem(1, 2, 16, 32, device=kernel_device())
    with pytest.raises(ValueError, match="scale must be a float"):
        attention_int8(q8, k8, v8, (0.02, 0.02, 0.02), scale=True, config=DEFAULT_CONFIG)


def test_device_tensor_scales_are_used_as_they_are():
    """No host sync: a device scale <= 0 is not refused.  S = c log2(e) sq sk <= 0 runs with
    R = R_MAX (the flattest softmax the kernel has), and the output is acc * (sv / l), so a
    negative sv flips its sign: documented in docs/reliability.md.  The kernel still equals the
    oracle bit for bit."""
    q8, k8, v8 = int8_problem(1, 2, 16, 32, device=kernel_device())
    dev = q8.device
    bad = (torch.tensor(-0.02, device=dev), torch.tensor(0.03, device=dev), torch.tensor(-0.05, device=dev))
    got = attention_int8(q8, k8, v8, bad, config=DEFAULT_CONFIG, out_dtype=torch.float32)
    params = quant.make_params(*bad, head_dim=32)
    assert int(params.ints.flatten()[0]) == 65535  # S <= 0: R clamps to R_MAX
    assert_bit_equal(got, reference_int8(q8, k8, v8, params, DEFAULT_CONFIG, out_dtype=torch.float32))
    flipped = (bad[0], bad[1], torch.tensor(0.05, device=dev))
    assert torch.equal(got, -attention_int8(q8, k8, v8, flipped, config=DEFAULT_CONFIG, out_dtype=torch.float32))


def test_tiny_inputs_get_a_finite_scale():
    """max|x| / 127 below 2**-100 would be (nearly) subnormal with an infinite float32 reciprocal:
    the scale is floored at quant.MIN_SCALE, so the int8 values are 0 and the output is 0 (no inf,
    no NaN) on every path."""
    dev = kernel_device()
    g = torch.Generator().manual_seed(0)
    q, k, v = ((torch.rand(1, 2, 16, 32, generator=g) - 0.5) * 1e-39 for _ in range(3))
    q, k, v = (t.to(dev) for t in (q, k, v))
    assert float(quant.dynamic_scale(q)) == quant.MIN_SCALE
    out = attention(q, k, v, config=DEFAULT_CONFIG)
    assert bool(torch.isfinite(out).all()) and bool((out == 0).all())
    assert_bit_equal(out, attention(q, k, v, config=DEFAULT_CONFIG, backend="reference"))
    ref = float_attention(q, k, v)
    assert float(ref.abs().max()) < 1e-38  # what is lost is below float32's normal range
