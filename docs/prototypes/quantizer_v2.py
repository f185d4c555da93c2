"""Proto v2 of the one-launch quantizer: grid (groups / GB, 3): program (i, t) quantizes tensor t
(q, k or v) of GB consecutive (batch, head) groups as one [GB, BLOCK_N, D] tile; dynamic scales
(max|x| / 127 per group; k optionally minus its per-channel mean first) or static ones (read per
group).  Writes int8 q, k (contiguous (B, H, N, D)), int8 V key-major, and the scales (G, 4)."""
import math
import torch
import triton
import triton.language as tl


@triton.jit
def _rint8(x, inv):
    y = x * inv
    y = tl.where(y == y, y, 0.0)
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    return (y + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _group_scale(x, ok):
    ax = tl.where(ok & (tl.abs(x) <= 3.4028234663852886e38), tl.abs(x), 0.0)
    amax = tl.max(tl.max(ax, axis=2), axis=1)  # [GB]
    return tl.where(amax > 0.0, tl.div_rn(amax, 127.0), 1.0)


@triton.jit
def _quant2(
    X0, X1, X2, sxb, sxh, sxn,  # q, k, v: one set of strides (views of one packed qkv) ...
    sy_b, sy_h, sy_n,  # ... unless given per tensor below (0 = use sx*)
    Y0, Y1, V8, SCALES, stride_sz, stride_sh, H, N, NP, G,
    BLOCK_N: tl.constexpr, D: tl.constexpr, GB: tl.constexpr, DYNAMIC: tl.constexpr, SMOOTH_K: tl.constexpr,
):
    t = tl.program_id(1)  # 0 q, 1 k, 2 v
    g = tl.program_id(0) * GB + tl.arange(0, GB)  # [GB] groups
    z = g // H
    h = g % H
    gi = g[:, None, None]
    n = tl.arange(0, BLOCK_N)[None, :, None]
    d = tl.arange(0, D)[None, None, :]
    ok = (gi < G) & (n < N)
    src = z[:, None, None] * sxb + h[:, None, None] * sxh + n * sxn + d
    if t == 0:
        x = tl.load(X0 + src, mask=ok, other=0.0).to(tl.float32)
    elif t == 1:
        x = tl.load(X1 + src, mask=ok, other=0.0).to(tl.float32)
    else:
        x = tl.load(X2 + src, mask=ok, other=0.0).to(tl.float32)
    s_off = z * stride_sz + h * stride_sh + t  # [GB]
    if DYNAMIC:
        s = _group_scale(x, ok)
        if SMOOTH_K:
            if t == 1:
                # k minus its per-channel mean over the N tokens (a constant per softmax row), the
                # mean taken on the int8 grid of a first pass: float32(sum of int8) * s / N
                i1 = tl.where(ok, _rint8(x, tl.div_rn(1.0, s)[:, None, None]), 0)
                mean = tl.div_rn(tl.sum(i1, axis=1).to(tl.float32) * s[:, None], N.to(tl.float32))  # [GB, D]
                x = x - mean[:, None, :]
                s = _group_scale(x, ok)
        tl.store(SCALES + s_off, s, mask=g < G)
    else:
        s = tl.load(SCALES + s_off, mask=g < G, other=1.0)
    x8 = _rint8(x, tl.div_rn(1.0, s)[:, None, None]).to(tl.int8)
    if t == 2:
        tl.store(V8 + gi * (D * NP) + d * NP + n, x8, mask=ok)
    else:
        dst = gi * (N * D) + n * D + d
        if t == 0:
            tl.store(Y0 + dst, x8, mask=ok)
        else:
            tl.store(Y1 + dst, x8, mask=ok)


def quantize_heads(q, k, v, *, scales=None, sstrides=None, smooth_k=True, gb=None, num_warps=None):
    """Dynamic (scales None): returns q8, k8, v8 (key-major), scales (B, H, 4) [sq, sk, sv, 0].
    Static: scales given (per-group rows [sq, sk, sv] at strides sstrides); returns q8, k8, v8, scales."""
    b, h, n, d = q.shape
    dev = q.device
    assert q.stride() == k.stride() == v.stride() and q.stride(3) == 1
    q8 = torch.empty((b, h, n, d), dtype=torch.int8, device=dev)
    k8 = torch.empty_like(q8)
    np_ = max(16, -(-n // 16) * 16)
    v8 = torch.empty((b, h, d, np_), dtype=torch.int8, device=dev)[..., :n].transpose(-1, -2)
    dynamic = scales is None
    if dynamic:
        scales = torch.zeros((b, h, 4), dtype=torch.float32, device=dev)
        sstrides = (h * 4, 4)
    bn = triton.next_power_of_2(max(n, 1))
    g = b * h
    if gb is None:
        gb = max(1, min(16, 4096 // (bn * d)))
    if num_warps is None:
        num_warps = 8 if gb * bn * d >= 16384 else 4
    _quant2[(triton.cdiv(g, gb), 3)](
        q, k, v, q.stride(0), q.stride(1), q.stride(2), 0, 0, 0, q8, k8, v8, scales, *sstrides, h, n, np_, g,
        BLOCK_N=bn, D=d, GB=gb, DYNAMIC=dynamic, SMOOTH_K=smooth_k, num_warps=num_warps,
    )
    return q8, k8, v8, scales
