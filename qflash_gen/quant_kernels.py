"""One-launch quantization of float q, k, v for the attention kernel (the float call paths).

``quantize_heads(q, k, v, scale)`` quantizes (B, H, N, D) float tensors of any strides (views of a
packed qkv projection included: timm hands over q, k, v that way) with one dynamic scale per
(batch, head) and tensor, computed on the device, or at given static scales (``params=``).  It
writes int8 q and k (contiguous), int8 V key-major (``quant.key_major``'s layout, which the
attention kernel loads without a byte transpose) and the scale table the kernel reads
(``quant.KernelParams``): one launch, no host sync, CUDA-graph capturable.

The bits are those of the torch oracle ``quant.quantize_dynamic`` (``quant.quantize_groups`` at
static scales): max|x| over the finite elements / 127 per group (1 for an all-zero group), and k
first smoothed by its per-channel mean (``quant.smooth_k``: softmax ignores it, the int8 range no
longer pays for it).  Each float op is the IEEE one torch performs (``div_rn`` for the divisions;
round half to even by adding 1.5 * 2**23 and reading the integer off the bits, exact for
|y| <= 127; integer sums), so the CPU interpreter and the GPU give torch's bits.

Two kernels, one launch either way (``tile_plan`` picks):

* one tile (``_quantize_tiles``), where a head's padded N x D fits 16,384 elements (ViT at 224
  px, Swin windows): a program loads tensor t of GB heads once into registers and runs every pass
  (max|x|; for k the int8 mean and max|x - mean|; quantize) there, then stores.  Programs 3i + t,
  so q, k and v of the same heads run side by side (a packed projection's token rows are read
  together).  On an H200 at ViT-B b=64: 73.7 us, against 140.9 for the chunked kernel and 21.5
  for the bytes alone (docs/perf-notes.md, seventh session).
* chunked (``_quantize_heads``), for longer sequences: program (g, t) reads the head in CH-row
  chunks, one pass for max|x| (k smoothed: two more) and one that quantizes and stores.  At
  ViT-B/384 b=64 on an H200: 431 us a layer against a byte floor of about 64 (whole-model profile,
  docs/perf-notes.md).

Variants that ``tile_plan`` does not pick (untimed on a GPU so far): ``_quantize_tiles_prefetch``
(``quantize_heads(tile=(..., programs))``), P programs a tensor, each walking the blocks p, p + P,
... with the next block's load in flight while the current block computes and stores (the one-tile
kernel waits out its one load in every program); and the chunked kernel's launch options
(``quantize_heads(tile=Chunked(ch, warps, t_fast, stages))``): rows a chunk, warps, the 1-D grid
and pipelined chunk loops.

This is not a template: the attention kernel's template hash and the tuning DB don't see it.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from qflash_gen import fastlaunch
from qflash_gen.quant import KernelParams, padded_keys, softmax_constant


@triton.jit
def _rint8(x, inv):
    """quant.quantize's ops: rint(clamp(x * inv, +-127)), NaN -> 0, as int32."""
    y = x * inv
    y = tl.where(y == y, y, 0.0)
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    return (y + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _chunk(X, base, sxn, start, offs_n, offs_d, N):
    rows = start + offs_n
    ok = (rows < N)[:, None]
    x = tl.load(X + base + rows[:, None] * sxn + offs_d[None, :], mask=ok, other=0.0)
    return x.to(tl.float32), ok


@triton.jit
def _scale(X, base, sxn, N, mean, offs_n, offs_d, CH: tl.constexpr, STAGES: tl.constexpr):
    """max|x - mean| over the finite elements of the head / 127 (at least quant.MIN_SCALE = 2**-100),
    or 1 where it is 0."""
    m = tl.zeros([CH, offs_d.shape[0]], tl.float32)
    for start in tl.range(0, N, CH, num_stages=STAGES):
        x, ok = _chunk(X, base, sxn, start, offs_n, offs_d, N)
        a = tl.abs(x - mean[None, :])
        m = tl.maximum(m, tl.where(ok & (a <= 3.4028234663852886e38), a, 0.0))
    amax = tl.max(tl.max(m, axis=1), axis=0)
    return tl.where(amax > 0.0, tl.maximum(tl.div_rn(amax, 127.0), 7.888609052210118e-31), 1.0)  # MIN_SCALE


@triton.jit
def _quantize_heads(
    Q, K, V, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    Q8, K8, V8, SCALES, stride_sz, stride_sh, H, N, NP,
    CH: tl.constexpr, D: tl.constexpr, DYNAMIC: tl.constexpr, SMOOTH_K: tl.constexpr,
    T_FAST: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Program (g, t): tensor t (q, k or v) of group g (batch * H + head) in CH-row chunks, one
    pass over the head for max|x| (k smoothed: two more, its int8 mean and max|x - mean|), then
    one that quantizes and stores; every pass reads the head again (from L2 where it still is).
    T_FAST: a 1-D grid, program 3g + t (q, k and v of a head side by side, as _quantize_tiles);
    else grid (groups, 3).  STAGES: every chunk loop's tl.range num_stages.  None: Triton's
    default, which leaves these loops unpipelined (each chunk's load issued after the previous
    chunk's reduction).  Else the pipeliner's cp.async copies to STAGES - 1 shared-memory buffers
    (TTGIR, sm_90, Triton 3.6 and 3.8): at 3, chunk i + 1's copy is in flight while chunk i is
    reduced; at 2 (one buffer) the next copy is issued after the current chunk is read out."""
    if T_FAST:
        g = tl.program_id(0) // 3  # batch * H + head
        t = tl.program_id(0) % 3  # 0 q, 1 k, 2 v
    else:
        g = tl.program_id(0)
        t = tl.program_id(1)
    z = g // H
    h = g % H
    if t == 0:
        X, base, sxn = Q, z * sqb + h * sqh, sqn
    elif t == 1:
        X, base, sxn = K, z * skb + h * skh, skn
    else:
        X, base, sxn = V, z * svb + h * svh, svn
    offs_n = tl.arange(0, CH)
    offs_d = tl.arange(0, D)
    mean = tl.zeros([D], tl.float32)
    s_ptr = SCALES + z * stride_sz + h * stride_sh + t
    if DYNAMIC:
        s = _scale(X, base, sxn, N, mean, offs_n, offs_d, CH, STAGES)
        if SMOOTH_K:
            if t == 1:
                # k minus its per-channel mean over the N tokens (quant.smooth_k): the mean on the
                # int8 grid of the first scale, float32(sum of int8) * s / N, then the scale again
                inv = tl.div_rn(1.0, s)
                total = tl.zeros([CH, D], tl.int32)
                for start in tl.range(0, N, CH, num_stages=STAGES):
                    x, ok = _chunk(X, base, sxn, start, offs_n, offs_d, N)
                    total += tl.where(ok, _rint8(x, inv), 0)
                mean = tl.div_rn(tl.sum(total, axis=0).to(tl.float32) * s, N.to(tl.float32))
                s = _scale(X, base, sxn, N, mean, offs_n, offs_d, CH, STAGES)
        tl.store(s_ptr, s)
        if t == 0:
            tl.store(s_ptr + 3, 0.0)  # the table's fourth column (allocated unset)
    else:
        s = tl.load(s_ptr)
    inv = tl.div_rn(1.0, s)
    for start in tl.range(0, N, CH, num_stages=STAGES):
        x, ok = _chunk(X, base, sxn, start, offs_n, offs_d, N)
        x8 = _rint8(x - mean[None, :], inv).to(tl.int8)
        rows = start + offs_n
        if t == 2:  # key-major: keys innermost, row pitch NP
            tl.store(V8 + g * (D * NP) + offs_d[None, :] * NP + rows[:, None], x8, mask=ok)
        elif t == 0:
            tl.store(Q8 + g * (N * D) + rows[:, None] * D + offs_d[None, :], x8, mask=ok)
        else:
            tl.store(K8 + g * (N * D) + rows[:, None] * D + offs_d[None, :], x8, mask=ok)


@triton.jit
def _tile_scale(x, ok):
    """Per group (axis 0 of a [GB, BLOCK_N, D] tile): max|x| over the finite elements / 127 (at
    least quant.MIN_SCALE), or 1 where it is 0.  The max runs in the input's dtype (exact)."""
    a = tl.abs(x)
    a = tl.where(ok & (a < float("inf")), a, 0.0)  # NaN and +-inf -> 0
    amax = tl.max(tl.max(a, axis=2), axis=1).to(tl.float32)
    return tl.where(amax > 0.0, tl.maximum(tl.div_rn(amax, 127.0), 7.888609052210118e-31), 1.0)  # MIN_SCALE


@triton.jit
def _tile_offsets(i, H, N, G, BLOCK_N: tl.constexpr, D: tl.constexpr, GB: tl.constexpr):
    """Block i's groups g = i * GB .. (batch * H + head), their batch z and head h, and the
    [GB, BLOCK_N, D] tile's group, key and channel indices and mask (no group at or past G: a
    block past the last is all masked, nothing is read or written)."""
    g = i * GB + tl.arange(0, GB)  # groups: batch * H + head
    z = g // H
    h = g % H
    gi = g[:, None, None]
    n = tl.arange(0, BLOCK_N)[None, :, None]
    d = tl.arange(0, D)[None, None, :]
    ok = (gi < G) & (n < N)
    return g, z, h, gi, n, d, ok


@triton.jit
def _tile_load(X, sb, sh, sn, z, h, n, d, ok):
    """The tile of X (strides sb, sh, sn) at _tile_offsets' offsets, in the input's dtype."""
    return tl.load(X + z[:, None, None] * sb + h[:, None, None] * sh + n * sn + d, mask=ok, other=0.0)


@triton.jit
def _tile_scales_in(SCALES, s_off, g, G, DYNAMIC: tl.constexpr):
    """With static scales the [GB] scales at s_off (dynamic: a placeholder; _tile_quantize
    computes them)."""
    if DYNAMIC:
        return tl.zeros(g.shape, tl.float32)
    else:
        return tl.load(SCALES + s_off, mask=g < G, other=1.0)


@triton.jit
def _tile_quantize(
    x, s, t, Q8, K8, V8, SCALES, g, gi, n, d, ok, s_off, N, NP, G,
    D: tl.constexpr, DYNAMIC: tl.constexpr, SMOOTH_K: tl.constexpr,
):  # fmt: skip
    """Every pass on the registers of tensor t's tile x (max|x|; for k the mean and max|x - mean|;
    quantize at scales s, or with dynamic scales at those computed here and stored), then the
    int8 stores."""
    if DYNAMIC:
        s = _tile_scale(x, ok)
        xf = x.to(tl.float32)
        if SMOOTH_K:
            if t == 1:
                # quant.smooth_k: the per-channel mean on the int8 grid of the first scale,
                # float32(sum of int8) * s / N, subtracted; then the scale again
                i1 = tl.where(ok, _rint8(xf, tl.div_rn(1.0, s)[:, None, None]), 0)
                mean = tl.div_rn(tl.sum(i1, axis=1).to(tl.float32) * s[:, None], N.to(tl.float32))  # [GB, D]
                xf = xf - mean[:, None, :]
                s = _tile_scale(xf, ok)
        tl.store(SCALES + s_off, s, mask=g < G)
        if t == 0:
            tl.store(SCALES + s_off + 3, tl.zeros_like(s), mask=g < G)  # the fourth column (allocated unset)
    else:
        xf = x.to(tl.float32)
    x8 = _rint8(xf, tl.div_rn(1.0, s)[:, None, None]).to(tl.int8)
    if t == 2:  # key-major: keys innermost, row pitch NP
        tl.store(V8 + gi * (D * NP) + d * NP + n, x8, mask=ok)
    elif t == 0:
        tl.store(Q8 + gi * (N * D) + n * D + d, x8, mask=ok)
    else:
        tl.store(K8 + gi * (N * D) + n * D + d, x8, mask=ok)


@triton.jit
def _quantize_tiles(
    Q, K, V, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    Q8, K8, V8, SCALES, stride_sz, stride_sh, H, N, NP, G,
    BLOCK_N: tl.constexpr, D: tl.constexpr, GB: tl.constexpr, DYNAMIC: tl.constexpr, SMOOTH_K: tl.constexpr,
    T_FAST: tl.constexpr,
):  # fmt: skip
    """Program (i, t): tensor t (q, k or v) of the GB groups i * GB .. as one [GB, BLOCK_N, D]
    tile, loaded once; every pass (max|x|, k's mean and max|x - mean|, quantize) runs on the
    registers, and the stores follow.  T_FAST (a 1-D grid, program 3i + t): the q, k and v
    programs of a group run side by side, so a packed projection's rows (q, k, v of every head
    of a token: one span of memory) are read together; else grid (groups / GB, 3)."""
    if T_FAST:
        t = tl.program_id(0) % 3  # 0 q, 1 k, 2 v
        i = tl.program_id(0) // 3
    else:
        t = tl.program_id(1)
        i = tl.program_id(0)
    g, z, h, gi, n, d, ok = _tile_offsets(i, H, N, G, BLOCK_N, D, GB)
    if t == 0:
        X, sb, sh, sn = Q, sqb, sqh, sqn
    elif t == 1:
        X, sb, sh, sn = K, skb, skh, skn
    else:
        X, sb, sh, sn = V, svb, svh, svn
    x = _tile_load(X, sb, sh, sn, z, h, n, d, ok)
    s_off = z * stride_sz + h * stride_sh + t  # [GB]
    s = _tile_scales_in(SCALES, s_off, g, G, DYNAMIC)
    _tile_quantize(x, s, t, Q8, K8, V8, SCALES, g, gi, n, d, ok, s_off, N, NP, G, D, DYNAMIC, SMOOTH_K)


@triton.jit
def _tile_walk(
    X, sb, sh, sn, Q8, K8, V8, SCALES, stride_sz, stride_sh, H, N, NP, G, p, P,
    T: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, GB: tl.constexpr, DYNAMIC: tl.constexpr,
    SMOOTH_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Tensor T's blocks p, p + P, ... (X: its input), one tile each, the next block's load in
    flight while the current one computes and stores.  STAGES 0: explicit register double
    buffering, block i + P's load issued before block i's passes (past the last block it is all
    masked off: nothing read).  Else Triton's pipeliner (tl.range num_stages=STAGES): the loads
    go to shared memory by cp.async; at 3 (two buffers) the TTGIR waits for block i with block
    i + P's copy in flight, at 2 (one buffer) it issues the next copy after the stores (no
    overlap with the passes; Triton 3.8, sm_90).  Each tensor's loop has its own buffers: at
    ViT-B, STAGES 3, 192 KB of shared memory a program."""
    if STAGES:
        for i in tl.range(p, tl.cdiv(G, GB), P, num_stages=STAGES):
            g, z, h, gi, n, d, ok = _tile_offsets(i, H, N, G, BLOCK_N, D, GB)
            x = _tile_load(X, sb, sh, sn, z, h, n, d, ok)
            s_off = z * stride_sz + h * stride_sh + T
            s = _tile_scales_in(SCALES, s_off, g, G, DYNAMIC)
            _tile_quantize(x, s, T, Q8, K8, V8, SCALES, g, gi, n, d, ok, s_off, N, NP, G, D, DYNAMIC, SMOOTH_K)
    else:
        g, z, h, gi, n, d, ok = _tile_offsets(p, H, N, G, BLOCK_N, D, GB)
        x = _tile_load(X, sb, sh, sn, z, h, n, d, ok)
        s = _tile_scales_in(SCALES, z * stride_sz + h * stride_sh + T, g, G, DYNAMIC)
        for i in range(p, tl.cdiv(G, GB), P):
            g, z, h, gi, n, d, ok = _tile_offsets(i + P, H, N, G, BLOCK_N, D, GB)
            x_next = _tile_load(X, sb, sh, sn, z, h, n, d, ok)
            s_next = _tile_scales_in(SCALES, z * stride_sz + h * stride_sh + T, g, G, DYNAMIC)
            g, z, h, gi, n, d, ok = _tile_offsets(i, H, N, G, BLOCK_N, D, GB)
            s_off = z * stride_sz + h * stride_sh + T
            _tile_quantize(x, s, T, Q8, K8, V8, SCALES, g, gi, n, d, ok, s_off, N, NP, G, D, DYNAMIC, SMOOTH_K)
            x, s = x_next, s_next


@triton.jit
def _quantize_tiles_prefetch(
    Q, K, V, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    Q8, K8, V8, SCALES, stride_sz, stride_sh, H, N, NP, G,
    BLOCK_N: tl.constexpr, D: tl.constexpr, GB: tl.constexpr, DYNAMIC: tl.constexpr, SMOOTH_K: tl.constexpr,
    T_FAST: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """_quantize_tiles with P programs a tensor (grid 3P, program 3p + t: the same interleaved
    order; else (P, 3)), each walking the blocks p, p + P, ... with the next block's load in
    flight during the current one's work (_tile_walk).  One loop per tensor, t a constexpr in
    each: in one loop for all three, the V transpose's shared-memory addresses (hoisted out of
    the loop) stay live in the q and k programs too (sm_90, ViT-B, 8 warps capped at 128
    registers: 216 / 52 bytes spilled dynamic / static, against 56 / 0 apart)."""
    if T_FAST:
        t = tl.program_id(0) % 3  # 0 q, 1 k, 2 v
        p = tl.program_id(0) // 3
        P = tl.num_programs(0) // 3
    else:
        t = tl.program_id(1)
        p = tl.program_id(0)
        P = tl.num_programs(0)
    if t == 0:
        _tile_walk(
            Q, sqb, sqh, sqn, Q8, K8, V8, SCALES, stride_sz, stride_sh, H, N, NP, G, p, P,
            0, BLOCK_N, D, GB, DYNAMIC, SMOOTH_K, STAGES,
        )  # fmt: skip
    elif t == 1:
        _tile_walk(
            K, skb, skh, skn, Q8, K8, V8, SCALES, stride_sz, stride_sh, H, N, NP, G, p, P,
            1, BLOCK_N, D, GB, DYNAMIC, SMOOTH_K, STAGES,
        )  # fmt: skip
    else:
        _tile_walk(
            V, svb, svh, svn, Q8, K8, V8, SCALES, stride_sz, stride_sh, H, N, NP, G, p, P,
            2, BLOCK_N, D, GB, DYNAMIC, SMOOTH_K, STAGES,
        )  # fmt: skip


TILE_ELEMENTS = 16384  # the largest tile (groups x keys x D, padded) one program holds in registers


def tile_plan(n: int, d: int, dynamic: bool = True) -> tuple[int, int, int] | None:
    """(BLOCK_N, GB, num_warps) of the one-tile kernel for N, D; None where a head does not fit a
    tile (then the chunked kernel runs).  GB groups per program fill about 4,096 elements; warps
    for about 64 elements a thread with dynamic scales, 128 with static ones (at least 4): the
    fastest on an H200 (docs/perf-notes.md, seventh session)."""
    bn = triton.next_power_of_2(max(n, 1))
    if bn * d > TILE_ELEMENTS:
        return None
    gb = max(1, min(16, 4096 // (bn * d)))
    warps = gb * bn * d // (64 if dynamic else 128) // 32
    return bn, gb, min(max(warps, 4), 16)


@dataclasses.dataclass(frozen=True)
class Chunked:
    """Launch options of the chunked kernel (``_quantize_heads``), for ``quantize_heads(tile=...)``.
    ``Chunked()`` is what ``tile=False`` and, where no tile fits a head, the default choice run.

    Attributes:
        ch: rows per chunk, a power of two (the last chunk masked where it does not divide N);
            None: 32 where D >= 64, else 64, at most N rounded up to a power of two.
        warps: num_warps.
        t_fast: the 1-D grid, program 3g + t (q, k and v of a head side by side); else the
            (groups, 3) grid.
        stages: num_stages of every chunk loop (``tl.range``); None: Triton's default, which
            leaves them unpipelined.
    """

    ch: int | None = None
    warps: int = 4
    t_fast: bool = False
    stages: int | None = None

    def __post_init__(self):
        if self.ch is not None and (self.ch < 1 or self.ch & (self.ch - 1)):
            raise ValueError(f"{self!r}: rows per chunk must be a power of two >= 1")
        if self.warps < 1 or self.warps & (self.warps - 1) or self.warps > 32:
            raise ValueError(f"{self!r}: warps must be a power of two in 1..32")
        if self.stages is not None and self.stages < 1:
            raise ValueError(f"{self!r}: stages must be None or >= 1")

    def rows(self, n: int, d: int) -> int:
        """CH for heads of N rows and D channels."""
        return self.ch if self.ch is not None else min(32 if d >= 64 else 64, triton.next_power_of_2(max(n, 1)))

    @property
    def name(self) -> str:
        """A short unique label: chunk<CH>w<warps>[grid1d][s<stages>] (CH "auto" where None)."""
        grid = "grid1d" if self.t_fast else ""
        stages = f"s{self.stages}" if self.stages is not None else ""
        return f"chunk{self.ch or 'auto'}w{self.warps}{grid}{stages}"


def key_major_int8(shape, device) -> torch.Tensor:
    """An int8 (B, H, N, D) view in quant.key_major's layout (padding keys unset)."""
    b, h, n, d = shape
    return torch.empty((b, h, d, padded_keys(n)), dtype=torch.int8, device=device)[..., :n].transpose(-1, -2)


def quantize_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    params: KernelParams | None = None,
    smooth: bool = True,
    tile: tuple | Chunked | None | bool = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, KernelParams]:
    """int8 q, k, v8 (key-major) and the KernelParams of (B, H, N, D) float q, k, v (one shape,
    any strides).  Dynamic (``params`` None): one scale per (batch, head) and tensor, k smoothed
    unless ``smooth=False``, softmax scale ``scale`` (default 1/sqrt(D)): the bits of
    ``quant.quantize_dynamic``.  Static: quantized at ``params``' scales (its groups), which are
    returned unchanged.  One launch, no sync, no input checks (``qflash_gen.attention`` and the
    ops check q, k, v first).  ``tile`` (benchmarks and tests; default :func:`tile_plan`'s choice,
    ``Chunked()`` where it has none):

    * False: the chunked kernel at its default options (``Chunked()``);
    * a :class:`Chunked`: the chunked kernel with those options (rows a chunk, warps, 1-D grid,
      pipelined loops);
    * a tuple: the one-tile kernels' (BLOCK_N, GB, num_warps[, T_FAST[, register cap[,
      programs[, stages]]]]), trailing ones defaulting to (True, 0, 0, 0): 1-D grid, no cap;
      programs > 0 runs the prefetching kernel with that many programs a tensor (at most one per
      block), stages 0 its register double buffering, else Triton's pipeliner at
      num_stages=stages."""
    b, h, n, d = q.shape
    dev = q.device
    q, k, v = (t if t.stride(3) == 1 else t.contiguous() for t in (q, k, v))
    q8 = torch.empty((b, h, n, d), dtype=torch.int8, device=dev)
    k8 = torch.empty_like(q8)
    v8 = key_major_int8(q.shape, dev)
    dynamic = params is None
    if dynamic:
        table = torch.empty((b, h, 4), dtype=torch.float32, device=dev)  # the kernel writes every element
        params = KernelParams(scales=table, c_log2e=softmax_constant(d, scale))
    if b * h * n == 0:
        if dynamic:
            params.scales.zero_()
        return q8, k8, v8, params
    fn, grid, args, kwargs = quantizer_call(q, k, v, q8, k8, v8, params, dynamic, smooth, tile)
    fastlaunch.run(fn, grid, *args, **kwargs)
    return q8, k8, v8, params


def quantizer_call(q, k, v, q8, k8, v8, params: KernelParams, dynamic: bool, smooth: bool, tile=None) -> tuple:
    """The launch ``quantize_heads`` makes, as ``(kernel, grid, args, kwargs)`` for
    ``fastlaunch.run``: q, k, v (unit channel stride) into q8, k8, v8 (key-major) and the scale
    table of ``params`` (written when ``dynamic``, else read), kernel chosen by ``tile`` (see
    :func:`quantize_heads`; ValueError for a tile that cannot hold a head)."""
    b, h, n, d = q.shape
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))  # fmt: skip
    args = (q, k, v, *strides, q8, k8, v8, params.scales, *params.strides(), h, n, v8.stride(3))
    plan = tile_plan(n, d, dynamic) if tile is None else tile
    if not plan:  # False, or no tile holds a head: the chunked kernel at its default options
        plan = Chunked()
    if isinstance(plan, Chunked):
        meta = dict(CH=plan.rows(n, d), D=d, DYNAMIC=dynamic, SMOOTH_K=smooth, T_FAST=plan.t_fast, STAGES=plan.stages)
        return _quantize_heads, (3 * b * h,) if plan.t_fast else (b * h, 3), args, dict(meta, num_warps=plan.warps)
    # defaults: 1-D grid, no register cap, one tile a program (programs 0), register prefetch
    bn, gb, warps, t_fast, max_regs, programs, stages = (*plan, *(True, 0, 0, 0)[len(plan) - 3 :])
    if bn < n or bn & (bn - 1) or gb < 1 or gb & (gb - 1):  # a short tile would skip rows
        raise ValueError(f"tile={tile!r}: BLOCK_N must be a power of two >= N={n}, GB a power of two >= 1")
    if programs < 0 or stages < 0 or (stages and not programs):
        raise ValueError(f"tile={tile!r}: programs a tensor >= 0; stages >= 0, and only with programs")
    blocks = triton.cdiv(b * h, gb)
    cap = {"maxnreg": max_regs} if max_regs else {}
    meta = dict(BLOCK_N=bn, D=d, GB=gb, DYNAMIC=dynamic, SMOOTH_K=smooth, T_FAST=t_fast, num_warps=warps, **cap)
    if programs:  # each of min(blocks, programs) programs a tensor walks blocks p, p + P, ...
        p = min(blocks, programs)
        return _quantize_tiles_prefetch, (3 * p,) if t_fast else (p, 3), (*args, b * h), dict(meta, STAGES=stages)
    return _quantize_tiles, (3 * blocks,) if t_fast else (blocks, 3), (*args, b * h), meta
