"""The fused quantization kernels give the torch quantization's bits: int8 tensors, scales and
kernel constants, for every float dtype, with NaN / Inf / all-zero tensors and odd sizes."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bit_equal, kernel_device

from qflash_gen import quant, quant_kernels
from qflash_gen.api import attention

pytestmark = pytest.mark.gpu


def _torch_path(q, k, v, d, scale):
    sq, sk, sv = (quant.dynamic_scale(t) for t in (q, k, v))
    q8s = tuple(quant.quantize(t, s) for t, s in ((q, sq), (k, sk), (v, sv)))
    return q8s, torch.stack([sq, sk, sv]), quant.make_params(sq, sk, sv, head_dim=d, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", ["uniform", "specials", "zeros", "tiny"])
def test_fused_quantization_equals_torch(dtype, case):
    dev = kernel_device()
    g = torch.Generator().manual_seed(hash((case, str(dtype))) % 2**31)
    shape = (2, 3, 37, 32)  # 7104 elements: two blocks, the second partial
    x = [(torch.rand(shape, generator=g) * 8 - 4) for _ in range(3)]
    if case == "specials":
        x[0].view(-1)[[0, 5, 999]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        x[2].view(-1)[7] = float("nan")
    elif case == "zeros":
        x[1].zero_()
    elif case == "tiny":
        x = [t * 1e-4 for t in x]  # drives R to its clamp
    q, k, v = (t.to(device=dev, dtype=dtype) for t in x)
    scale = 0.3 if case == "tiny" else None
    (q8, k8, v8), scales, params = quant_kernels.quantize_qkv(q, k, v, 32, scale)
    (tq, tk, tv), tscales, tparams = _torch_path(q, k, v, 32, scale)
    for got, want in ((q8, tq), (k8, tk), (v8, tv)):
        assert_bit_equal(got, want)
    assert_bit_equal(scales, tscales)
    assert torch.equal(params.ints.cpu(), tparams.ints.cpu()), (params.ints, tparams.ints)
    assert_bit_equal(params.floats.cpu(), tparams.floats.cpu())


def test_attention_fused_path_matches_reference_and_non_contiguous():
    dev = kernel_device()
    g = torch.Generator().manual_seed(7)
    q, k, v = ((torch.rand(1, 2, 50, 64, generator=g) * 6 - 3).to(dev, torch.float16) for _ in range(3))
    fused = attention(q, k, v)  # contiguous: quant_kernels
    assert_bit_equal(fused, attention(q, k, v, backend="reference"))  # torch quantization + oracle
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, strided: the torch path
    assert not qt.is_contiguous()
    assert_bit_equal(fused, attention(qt, k, v))
