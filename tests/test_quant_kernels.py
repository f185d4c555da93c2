"""The one-launch quantizer gives the torch quantization's bits: int8 q, k, v and the scale table,
one scale per (batch, head) (k smoothed or not) or at static per-group scales, for every float
dtype, with NaN / Inf / all-zero / tiny tensors, odd sizes and strided views of a packed qkv."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bit_equal, kernel_device

from qflash_gen import quant, quant_kernels
from qflash_gen.api import attention
from qflash_gen.quant_kernels import Chunked

pytestmark = pytest.mark.gpu


def _inputs(case, dtype, shape=(2, 3, 37, 32), seed=0):
    g = torch.Generator().manual_seed(seed + hash((case, str(dtype))) % 2**31)
    x = [(torch.rand(shape, generator=g) * 8 - 4) for _ in range(3)]
    if case == "specials":
        x[0].view(-1)[[0, 5, 999]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        x[2].view(-1)[7] = float("nan")
    elif case == "zeros":
        x[1].zero_()
    elif case == "tiny":
        x = [t * 1e-4 for t in x]  # drives R to its clamp
    elif case == "subnormal":
        x = [t * 1e-39 for t in x]  # a scale of max/127 would be subnormal: its reciprocal inf
    elif case == "shared_k":
        x[1] = x[1] + torch.randn(shape[-1], generator=g) * 40  # a component every token of k shares
    return [t.to(device=kernel_device(), dtype=dtype) for t in x]


# The kernels quantize_heads picks from: the one-tile kernel (a head's N x D in registers; GB groups
# per program, the last program partly masked when GB does not divide B * H), its prefetching
# variant (P programs a tensor walking the blocks; 6 groups here) and the chunked one with its launch
# options (N = 37 here: 16-row chunks on the 1-D grid leave a 5-row tail, 64 rows are one masked
# chunk; the interpreter ignores stages, but the pipelined loops' source runs)
CHUNKED = {
    "chunked": False,
    "chunk16_grid1d_pipelined": Chunked(16, 8, True, 3),
    "chunk64_w8": Chunked(64, 8),
}
KERNELS = {
    "tile": None,
    "tile_gb4": (64, 4, 4),
    "tile_grid2d": (64, 2, 4, False),
    "tile_capped": (64, 2, 4, True, 64),  # a register cap: the same bits (a launch option)
    "prefetch": (64, 1, 4, True, 0, 4),  # 6 blocks over 4 programs: two walk 2, two walk 1
    "prefetch_gb4_grid2d": (64, 4, 4, False, 0, 1),  # one program walks both blocks, the last half masked
    "prefetch_pipelined": (64, 2, 4, True, 0, 2, 3),  # Triton's pipeliner in place of the register prefetch
    **CHUNKED,
}


def assert_dynamic_and_static_equal_torch(q, k, v, tile, smooth=True):
    """quantize_heads(tile=tile) on (B, H, N, D) q, k, v gives the torch oracle's bits with dynamic
    scales (k smoothed or not), then with those scales given as static ones."""
    b, h, _, d = q.shape
    got = quant_kernels.quantize_heads(q, k, v, smooth=smooth, tile=tile)
    want = quant.quantize_dynamic(q, k, v, d, smooth=smooth)
    for x, y in zip(got[:3], want[:3], strict=True):
        assert_bit_equal(x, y)
    assert_bit_equal(got[3].scales, want[3].scales.reshape(got[3].scales.shape))
    scales = [want[3].scales[..., i].reshape(b, h) for i in range(3)]
    params = quant.make_params(*scales, head_dim=d)
    static = quant_kernels.quantize_heads(q, k, v, params=params, tile=tile)
    for x, t, s in zip(static[:3], (q, k, v), scales, strict=True):
        assert_bit_equal(x, quant.quantize_groups(t, s))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", ["uniform", "specials", "zeros", "tiny", "subnormal", "shared_k"])
@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_dynamic_quantization_equals_torch(dtype, case, smooth, kernel):
    q, k, v = _inputs(case, dtype)
    if case == "subnormal" and dtype != torch.float32:
        pytest.skip("float16/bfloat16 cannot hold 1e-39 * x")
    scale = 0.3 if case == "tiny" else None
    q8, k8, v8, params = quant_kernels.quantize_heads(q, k, v, scale, smooth=smooth, tile=KERNELS[kernel])
    tq, tk, tv, tparams = quant.quantize_dynamic(q, k, v, 32, scale, smooth=smooth)
    for got, want in ((q8, tq), (k8, tk), (v8, tv)):
        assert_bit_equal(got, want)
    assert_bit_equal(params.scales, tparams.scales.reshape(params.scales.shape))
    assert params.c_log2e == tparams.c_log2e and params.strides() == (3 * 4, 4)
    assert bool(torch.isfinite(params.floats).all())  # no inf reciprocal, even for subnormal inputs
    assert v8.stride(2) == 1  # key-major


def test_smoothing_lowers_the_k_scale_of_a_shared_component():
    q, k, v = _inputs("shared_k", torch.float32)
    *_, plain = quant_kernels.quantize_heads(q, k, v, smooth=False)
    *_, smooth = quant_kernels.quantize_heads(q, k, v, smooth=True)
    assert bool((smooth.scales[..., 1] < 0.25 * plain.scales[..., 1]).all())
    assert torch.equal(smooth.scales[..., 0], plain.scales[..., 0])  # q and v untouched


def test_strided_views_of_a_packed_projection():
    """timm's q, k, v: views of a (B, N, 3, H, D) tensor; no copy needed, same bits."""
    dev = kernel_device()
    g = torch.Generator().manual_seed(3)
    qkv = (torch.randn(2, 49, 3, 4, 32, generator=g) * 3).to(dev, torch.float16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    got = quant_kernels.quantize_heads(q, k, v)
    want = quant_kernels.quantize_heads(q.contiguous(), k.contiguous(), v.contiguous())
    for a, b in zip(got[:3], want[:3], strict=True):
        assert_bit_equal(a, b)
    assert_bit_equal(got[3].scales, want[3].scales)


def test_kernel_choice():
    """One tile per head up to TILE_ELEMENTS padded elements (ViT N=197, Swin N=49), chunks above."""
    assert quant_kernels.tile_plan(197, 64) == (256, 1, 8)
    assert quant_kernels.tile_plan(197, 64, dynamic=False) == (256, 1, 4)
    assert quant_kernels.tile_plan(49, 32) == (64, 2, 4)
    assert quant_kernels.tile_plan(577, 64) is None and quant_kernels.tile_plan(257, 64) is None


@pytest.mark.parametrize("shape", [(1, 2, 300, 64), (3, 5, 130, 32)])
def test_chunked_and_masked_tiles_equal_torch(shape):
    """A head over the tile limit (chunked kernel, tail chunk) and GB not dividing B * H (15 groups,
    GB 4: the last program has one group) against the torch oracle."""
    q, k, v = _inputs("specials", torch.float16, shape=shape)
    tile = False if shape[2] == 300 else (256, 4, 4)
    got = quant_kernels.quantize_heads(q, k, v, tile=tile)
    want = quant.quantize_dynamic(q, k, v, shape[3])
    for a, b in zip(got[:3], want[:3], strict=True):
        assert_bit_equal(a, b)
    assert_bit_equal(got[3].scales, want[3].scales.reshape(got[3].scales.shape))


# Long heads (ViT/384's N = 577; 300) as views of a packed projection, the chunk rows not dividing N
LONG_CHUNKED = {
    "default": None,  # tile_plan: no tile holds the head, the chunked kernel at Chunked()
    "chunk64_w8_grid1d": Chunked(64, 8, True),
    "chunk128_w16_pipelined": Chunked(128, 16, True, 3),
    "chunk256_w4": Chunked(256, 4, False, 4),
}


@pytest.mark.parametrize("n", [300, 577])
@pytest.mark.parametrize("kernel", list(LONG_CHUNKED))
def test_chunked_variants_on_long_packed_heads(n, kernel):
    """Chunked launch variants (the default, the 1-D grid, pipelined loops, chunks longer than
    N / 2) on strided q, k, v views of a (B, N, 3, H, D) fp16 projection (B * H = 2, D = 64):
    dynamic with and without k's smoothing, and static per-(batch, head) scales, against the
    torch oracle."""
    dev = kernel_device()
    g = torch.Generator().manual_seed(n)
    qkv = torch.rand(1, n, 3, 2, 64, generator=g) * 8 - 4
    qkv[:, :, 1] += torch.randn(64, generator=g) * 20  # a component every token of k shares
    qkv[0, n - 1, 0, 1, 5] = float("nan")  # in the last (masked) chunk
    qkv[0, n - 2, 1, 0, 7] = float("inf")  # in k: out of its scale and its mean
    q, k, v = qkv.to(dev, torch.float16).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    tile = LONG_CHUNKED[kernel]
    assert quant_kernels.tile_plan(n, 64) is None
    for smooth in (True, False):
        assert_dynamic_and_static_equal_torch(q, k, v, tile, smooth)


def test_chunked_options():
    """Chunked() is the default launch (32 rows where D >= 64, 64 below, at most N's power of two);
    rows a chunk and warps must be powers of two; names are distinct."""
    assert Chunked().rows(577, 64) == 32 and Chunked().rows(577, 32) == 64 and Chunked().rows(20, 64) == 32
    assert Chunked().rows(9, 32) == 16 and Chunked(128).rows(9, 32) == 128
    for bad in (dict(ch=48), dict(ch=0), dict(warps=3), dict(warps=64), dict(stages=0)):
        with pytest.raises(ValueError):
            Chunked(**bad)
    variants = [Chunked(), Chunked(32), Chunked(32, 4, True), Chunked(32, 4, True, 3), Chunked(32, 8, True, 3)]
    assert len({c.name for c in variants}) == len(variants)


@pytest.mark.parametrize("groups", ["tensor", "head", "batch_head"])
@pytest.mark.parametrize("kernel", ["tile", "prefetch", "prefetch_gb4_grid2d", *CHUNKED])
def test_static_quantization_equals_torch(groups, kernel):
    q, k, v = _inputs("specials", torch.float16)
    b, h = q.shape[:2]
    shape = {"tensor": (), "head": (h,), "batch_head": (b, h)}[groups]
    g = torch.Generator().manual_seed(9)
    sq, sk, sv = ((torch.rand(shape, generator=g) * 0.05 + 0.01).to(q.device) for _ in range(3))
    params = quant.make_params(sq, sk, sv, head_dim=32)
    q8, k8, v8, back = quant_kernels.quantize_heads(q, k, v, params=params, tile=KERNELS[kernel])
    assert back is params
    for got, t, s in ((q8, q, sq), (k8, k, sk), (v8, v, sv)):
        assert_bit_equal(got, quant.quantize_groups(t, s.expand(b, h) if s.dim() else s))


def test_attention_fused_path_matches_reference_and_non_contiguous():
    dev = kernel_device()
    g = torch.Generator().manual_seed(7)
    q, k, v = ((torch.rand(1, 2, 50, 64, generator=g) * 6 - 3).to(dev, torch.float16) for _ in range(3))
    fused = attention(q, k, v)  # the quantizer + the kernel
    assert_bit_equal(fused, attention(q, k, v, backend="reference"))  # torch quantization + oracle
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, D not innermost: copied first
    assert not qt.is_contiguous()
    assert_bit_equal(fused, attention(qt, k, v))


@pytest.mark.parametrize("tile", [(32, 1, 4), (48, 1, 4), (64, 3, 4)])
def test_a_tile_that_cannot_hold_the_head_is_refused(tile):
    """A tile shorter than N would leave rows unquantized: refused before any launch."""
    q, k, v = _inputs("uniform", torch.float16)  # N = 37
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two"):
        quant_kernels.quantize_heads(q, k, v, tile=tile)


@pytest.mark.parametrize("programs", [3, 100])
@pytest.mark.parametrize("smooth", [True, False])
def test_prefetch_walks_blocks_not_a_multiple_of_the_programs(programs, smooth):
    """Swin's window heads (N=49, D=32, GB=2) as timm hands them over (views of a packed qkv):
    15 groups, 8 blocks (the last half masked) over 3 programs a tensor (3, 3 and 2 blocks), or
    more programs than blocks (one block each); dynamic and static scales, the torch bits."""
    dev = kernel_device()
    g = torch.Generator().manual_seed(11)
    qkv = torch.rand(3, 49, 3, 5, 32, generator=g) * 8 - 4
    qkv[:, :, 1] += torch.randn(32, generator=g) * 20  # a component every token of k shares
    q, k, v = qkv.to(dev, torch.float16).permute(2, 0, 3, 1, 4).unbind(0)
    tile = (64, 2, 4, True, 0, programs)
    assert_dynamic_and_static_equal_torch(q, k, v, tile, smooth)


def test_pipeline_stages_need_programs():
    q, k, v = _inputs("uniform", torch.float16)
    with pytest.raises(ValueError, match="only with programs"):
        quant_kernels.quantize_heads(q, k, v, tile=(64, 1, 4, True, 0, 0, 3))


@pytest.mark.parametrize("tile", [None, False], ids=["tile", "chunked"])
def test_repeated_calls_read_each_calls_tensors(tile):
    """The quantizer's launch (``fastlaunch.run``: on CUDA, after the first call of a
    specialization, the cached CompiledKernel) quantizes each call's own tensors: same shapes and
    new values, then a view whose pointer is not 16-byte aligned (another specialization), then
    the first tensors again; every call equals the torch oracle."""
    dev = kernel_device()
    shape = (2, 3, 37, 32)
    fresh = [_inputs("uniform", torch.float16, shape, seed=s) for s in range(3)]
    base = torch.randn(3 * 2 * 3 * 37 * 32 + 8, device=dev).to(torch.float16)
    odd = [base[1 + i * 2 * 3 * 37 * 32 :][: 2 * 3 * 37 * 32].view(shape) for i in range(3)]  # 2-byte offsets
    assert odd[0].data_ptr() % 16 != 0
    for q, k, v in (*fresh, odd, fresh[0]):
        got = quant_kernels.quantize_heads(q, k, v, tile=tile)
        want = quant.quantize_dynamic(q, k, v, shape[-1])
        for x, y in zip(got[:3], want[:3], strict=True):
            assert_bit_equal(x, y)
        assert_bit_equal(got[3].scales, want[3].scales.reshape(got[3].scales.shape))
