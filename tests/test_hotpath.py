"""The eager hot path (``qflash_gen.hotpath``): a repeated ``attention`` call replays the first
call's launches from its plan.  Every replayed call must equal the integer oracle on its own
inputs, take the plan (not the checked path), and leave the plan for any call whose signature
differs (alignment, strides, options, a bias) or after a tuning DB change.  Compiled on CUDA
only: on the CPU the hot path is never taken (``signature`` is None there)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bit_equal

from qflash_gen import api, hotpath, kernel, launch, quant_kernels
from qflash_gen.api import attention

pytestmark = pytest.mark.gpu


def _packed(b, h, n, d, seed, dtype=torch.float16, offset=0):
    """timm's q, k, v: views of a (B, N, 3, H, D) projection (``offset`` elements into a buffer)."""
    g = torch.Generator().manual_seed(seed)
    flat = (torch.randn(offset + b * n * 3 * h * d, generator=g) * 2).to("cuda", dtype)
    qkv = flat[offset:].view(b, n, 3, h, d)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def test_no_plan_off_cuda():
    q = torch.zeros(1, 2, 8, 32)
    assert hotpath.signature(q, q, q, None, None, ("dynamic", True), None) is None


@pytest.fixture
def no_checked_path(monkeypatch):
    """After calling this, the checked path's quantizer raises: a call that returns took the plan."""

    def forbid():
        def fail(*a, **k):
            raise AssertionError("the checked path ran")

        monkeypatch.setattr(quant_kernels, "quantize_heads", fail)

    return forbid


@pytest.mark.cuda_only
@pytest.mark.parametrize("shape", [(2, 3, 197, 64), (4, 3, 49, 32), (16, 6, 197, 64)], ids=["vit", "window", "vit_b16"])
def test_replayed_calls_equal_the_oracle(shape, no_checked_path):
    """(16, 6, 197, 64): workspace and output both over 1 MB (the allocator's large pool, where a
    freed workspace block is split to serve the output: a plan that released its workspace
    before its launches were queued wrote the output over it)."""
    hotpath.clear()
    calls = [_packed(*shape, seed=s) for s in range(4)]
    first = attention(*calls[0])
    assert_bit_equal(first, attention(*calls[0], backend="reference"))
    want = [attention(*c, backend="reference") for c in calls]
    no_checked_path()
    for c, w in zip(calls, want, strict=True):
        assert_bit_equal(attention(*c), w)
    assert not torch.equal(want[1], want[2])  # different inputs, different outputs: not a stale buffer


@pytest.mark.cuda_only
def test_bias_and_softmax_scale_are_part_of_the_signature(no_checked_path):
    """Swin's call: a float32 (Z, H, N, N) bias, Z dividing B, read per call; another softmax
    scale or another bias layout is another plan."""
    hotpath.clear()
    b, h, n, d = 4, 3, 49, 32
    g = torch.Generator().manual_seed(5)
    biases = [(torch.randn(2, h, n, n, generator=g) * 3).cuda() for _ in range(2)]
    q, k, v = _packed(b, h, n, d, seed=1)
    want = {(i, s): attention(q, k, v, biases[i], scale=s, backend="reference") for i in (0, 1) for s in (None, 0.1)}
    for s in (None, 0.1):
        assert_bit_equal(attention(q, k, v, biases[0], scale=s), want[0, s])  # checked, records
    no_checked_path()
    for (i, s), w in want.items():
        assert_bit_equal(attention(q, k, v, biases[i], scale=s), w)
        assert_bit_equal(attention(q, k, v, float_bias=biases[i], scale=s), w)  # the Swin module's call
    with pytest.raises(AssertionError, match="checked path"):
        attention(q, k, v, biases[0][:1])  # another bias layout: no plan yet


@pytest.mark.cuda_only
def test_an_unaligned_view_is_another_signature(no_checked_path):
    hotpath.clear()
    shape = (2, 3, 197, 64)
    aligned, odd = _packed(*shape, seed=2), _packed(*shape, seed=3, offset=1)
    assert odd[0].data_ptr() % 16 and not aligned[0].data_ptr() % 16
    attention(*aligned)
    no_checked_path()
    with pytest.raises(AssertionError, match="checked path"):
        attention(*odd)


@pytest.mark.cuda_only
def test_a_cleared_cache_drops_the_plans(no_checked_path):
    hotpath.clear()
    qkv = _packed(2, 3, 197, 64, seed=4)
    attention(*qkv)
    assert hotpath.lookup(hotpath.signature(*qkv, None, None, ("dynamic", True), None)) is not None
    kernel.clear_cache()
    assert hotpath.lookup(hotpath.signature(*qkv, None, None, ("dynamic", True), None)) is None


@pytest.mark.cuda_only
def test_replay_inside_a_cuda_graph():
    """A plan replayed while a CUDA graph captures (a model under graph capture): the graph's
    replays read the static inputs' current values."""
    hotpath.clear()
    shape = (2, 3, 197, 64)
    static = [t.clone() for t in _packed(*shape, seed=6)]
    attention(*static)  # records the plan (contiguous inputs: their own signature)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
        out = attention(*static)
    for seed in (7, 8):
        for dst, src in zip(static, _packed(*shape, seed=seed), strict=True):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert_bit_equal(out, api.attention(*static, backend="reference"))


@pytest.mark.cuda_only
@pytest.mark.parametrize("shape", [(2, 3, 197, 64), (4, 3, 49, 32)], ids=["vit_quantizer_first", "window_in_load"])
@pytest.mark.parametrize("per_head", [False, True])
def test_static_scales_replayed_equal_the_oracle(shape, per_head, monkeypatch):
    """The calibrated modules' op (``ops.attention_static_impl``): ViT quantizes first (two
    launches), a window fits one query block and quantizes in the kernel's loads (one launch);
    new table values at the same layout are read at each call."""
    from qflash_gen.integrations import ops

    hotpath.clear()
    b, h, n, d = shape
    g = torch.Generator().manual_seed(9)
    bias = (torch.randn(2, h, n, n, generator=g) * 3).cuda() if n < 64 else None
    tables = [
        ops.static_table((torch.rand(3, h if per_head else 1, generator=g) * 0.05 + 0.01).cuda()) for _ in range(3)
    ]
    calls = [_packed(*shape, seed=s) for s in range(3)]
    want = [ops.attention_static_impl(*c, t, bias, backend="reference") for c, t in zip(calls, tables, strict=True)]
    assert_bit_equal(ops.attention_static_impl(*calls[0], tables[0], bias), want[0])  # checked, records
    monkeypatch.setattr(launch, "launch_static", lambda *a, **k: pytest.fail("the checked path ran"))
    for c, t, w in zip(calls, tables, want, strict=True):
        assert_bit_equal(ops.attention_static_impl(*c, t, bias), w)
