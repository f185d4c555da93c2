"""Float inputs at static (calibrated) scales: quantized inside the kernel as it loads them (one
query block per head) or by the quantizer first (several), the bits of ``quant.quantize`` of each
input followed by the int8 kernel and the integer oracle."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bit_equal, int8_problem

from qflash_gen import checks, codegen, kernel, launch, ops, quant, reference
from qflash_gen.config import DEFAULT_CONFIG, KernelConfig
from qflash_gen.keys import workload_key

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() or checks.interpreter_active()),
        reason="launching the kernel needs CUDA or TRITON_INTERPRET=1 in the environment",
    ),
]

SMALL = KernelConfig(block_m=16, block_n=32, num_warps=2, num_stages=1, p_bits=14, rescale="split", rescale_bits=0)


def _inputs(b, h, n, d, dtype, device, *, seed=0, specials=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn((b, h, n, d), generator=g) * 2.0 for _ in range(3))
    if specials:  # NaN -> 0, +-Inf -> +-127, and values far outside the scale's range
        q[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e6])
        k[0, -1, 1, 2] = float("nan")
        v[-1, 0, -1, :2] = torch.tensor([float("inf"), -3e5])
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def _oracle(q, k, v, scales, cfg, *, bias=None, out_dtype):
    q8, k8, v8 = (quant.quantize(t, s) for t, s in zip((q, k, v), scales, strict=True))
    params = quant.make_params(*scales, head_dim=q.shape[-1], device=q.device)
    return reference.reference_int8(q8, k8, v8, params, cfg, bias=bias, out_dtype=out_dtype)


def _equal(got, want):
    """Bit for bit (a float compare would take -0.0 for 0.0 and fail on equal NaNs)."""
    assert_bit_equal(got, want)


@pytest.mark.parametrize(
    ("cfg", "n"),
    [
        (DEFAULT_CONFIG, 49),  # Swin window: one program per head
        (SMALL.replace(block_m=64), 40),  # several key tiles (online softmax)
        (SMALL, 40),  # three programs per head, each quantizing K and V
    ],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kernel_call_with_float_inputs_equals_the_oracle(device, cfg, n, dtype):
    b, h, d = 2, 3, 32
    q, k, v = _inputs(b, h, n, d, dtype, device, specials=True)
    scales = (0.031, 0.027, 0.019)  # static: values beyond 127 * s saturate
    kern = kernel.Kernel(cfg, workload_key((b, h, n, d), in_dtype=dtype), "cpu", "default")
    got = kern(q, k, v, scales)
    assert got.dtype == dtype  # out_dtype follows float inputs
    _equal(got, _oracle(q, k, v, scales, cfg, out_dtype=dtype))
    got8 = kern(q, k, v, scales, out_dtype=torch.int8)
    _equal(got8, _oracle(q, k, v, scales, cfg, out_dtype=torch.int8))


def test_fused_quantization_with_strided_inputs_and_a_mask(device):
    b, h, n, d = 2, 2, 49, 32
    base = torch.randn((b, n, h, d)).to(device=device, dtype=torch.float16)  # (B, N, H, D) as in a model
    q = base.transpose(1, 2)  # not contiguous: the kernel reads through the strides
    k = (base * 0.5).transpose(1, 2)
    v = (base - 1.0).transpose(1, 2)
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand((b, 1, n, n), generator=g) > 0.3).to(device)
    mask[:, :, 5, :] = False  # a fully masked row gives 0
    scales = (0.02, 0.011, 0.03)
    kern = kernel.Kernel(DEFAULT_CONFIG, workload_key((b, h, n, d), masked=True), "cpu", "default")
    got = kern(q, k, v, scales, mask)
    want = _oracle(q, k, v, scales, DEFAULT_CONFIG, bias=quant.additive_bias(mask), out_dtype=torch.float16)
    _equal(got, want)
    assert bool((got[:, :, 5] == 0).all())


@pytest.mark.parametrize("cfg", [DEFAULT_CONFIG, SMALL])
def test_static_op_fused_path_equals_its_reference_backend(device, cfg):
    b, h, n, d = 2, 4, 49, 32
    q, k, v = _inputs(b, h, n, d, torch.float16, device, seed=5, specials=True)
    for scales in (
        torch.tensor([[0.025], [0.02], [0.017]], device=device),  # per tensor
        torch.tensor([[0.025, 0.02, 0.03, 0.04], [0.02, 0.021, 0.022, 0.023], [0.017] * 4], device=device),  # per head
    ):
        table = ops.static_table(scales)
        assert tuple(table.shape) == (scales.shape[1], 4) and torch.equal(table[:, :3].t().cpu(), scales.cpu())
        text = ops.config_arg(cfg)
        got = torch.ops.qflash_gen.attention_static(q, k, v, table, None, None, text, "triton")
        want = torch.ops.qflash_gen.attention_static(q, k, v, table, None, None, text, "reference")
        _equal(got, want)


def test_float_inputs_need_one_dtype(device):
    q, k, v = _inputs(1, 1, 49, 32, torch.float16, device)
    kern = kernel.Kernel(DEFAULT_CONFIG, workload_key((1, 1, 49, 32)), "cpu", "default")
    with pytest.raises(ValueError, match="one dtype"):
        kern(q, k.float(), v, (0.1, 0.1, 0.1))
    with pytest.raises(ValueError, match="dtype"):
        kern(q.to(torch.int16), k, v, (0.1, 0.1, 0.1))


def test_rendered_source_explains_the_float_input_path():
    src = codegen.render(DEFAULT_CONFIG)
    assert "IN_FLOAT" in src and "_quant8" in src and "quant.quantize" in src


# -- key-major V (quant.key_major, what quant_kernels writes) ------------------------------------
@pytest.mark.parametrize(
    "cfg", [DEFAULT_CONFIG, SMALL, DEFAULT_CONFIG.replace(block_n=256, rescale="shift", rescale_bits=15)]
)
@pytest.mark.parametrize("n", [49, 197])
def test_key_major_v_equals_the_oracle(device, cfg, n):
    q8, k8, v8 = int8_problem(2, 2, n, 64, seed=n, device=device)
    vk = quant.key_major(v8)
    assert torch.equal(vk, v8) and vk.stride(2) == 1 and launch.v_keys(vk) == quant.padded_keys(n)
    params = quant.make_params(0.02, 0.03, 0.05, head_dim=64, device=device)
    want = reference.reference_int8(q8, k8, v8, params, cfg, out_dtype=torch.float16)
    got = launch.launch(cfg, q8, k8, vk, params, out_dtype=torch.float16)
    _equal(got, want)


def test_v_keys_reads_padding_only_where_the_storage_has_it():
    v = torch.zeros(2, 3, 49, 32, dtype=torch.int8)
    assert launch.v_keys(v) == 49  # D innermost
    assert launch.v_keys(quant.key_major(v)) == 64
    tight = v.transpose(-1, -2).contiguous().transpose(-1, -2)  # keys innermost, pitch 49
    assert tight.stride(2) == 1 and launch.v_keys(tight) == 49
    buf = torch.zeros(2, 3, 32, 64, dtype=torch.int8)
    assert launch.v_keys(buf[..., :49].transpose(-1, -2)) == 64
    short = torch.zeros(2 * 3 * 32 * 64 - 1, dtype=torch.int8)  # one byte short of the last padded key
    view = short.as_strided((2, 3, 49, 32), (3 * 32 * 64, 32 * 64, 1, 64))
    assert launch.v_keys(view) == 49


@pytest.mark.parametrize("n", [197, 49])
@pytest.mark.parametrize("tuned", [{}, {"max_regs": 168, "heads_per_program": 2, "num_stages": 2}])
def test_float_inputs_single_pass_vit_config_equals_the_oracle(device, n, tuned):
    """The tuned ViT shape of config (BLOCK_M=64: wgmma on sm_90, one 256-key pass): split key
    tiles gave wrong bits here for float inputs on an H100 (Triton 3.6), so float inputs keep one
    BLOCK_N tile; this pins it.  A tuned entry's register cap and heads per program (int8
    launch options) are not applied to float inputs (launch.launch_static)."""
    cfg = DEFAULT_CONFIG.replace(block_n=256, rescale="shift", rescale_bits=15, **tuned)
    q, k, v = _inputs(2, 3, n, 64, torch.float16, device, seed=11)
    scales = (0.02, 0.025, 0.03)
    kern = kernel.Kernel(cfg, workload_key((2, 3, n, 64)), "cpu", "default")
    _equal(kern(q, k, v, scales), _oracle(q, k, v, scales, cfg, out_dtype=torch.float16))
