"""Proto of the one-launch quantizer (issue 15): strided float q, k, v (any (B, H, N, D) views with a
unit last stride: timm's packed qkv), one scale per (batch, head) computed on the device (dynamic,
optionally k-mean smoothing) or given per group (static); writes int8 q, k (contiguous), int8 V
key-major and, when dynamic, each group's kernel constants."""
import math, struct
import torch
import triton
import triton.language as tl

R_MAX = tl.constexpr(65535)
LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _scale_of(amax):
    return tl.where(amax > 0.0, tl.div_rn(amax, 127.0), 1.0)


@triton.jit
def _absmax(x, ok):
    ax = tl.abs(x)
    ax = tl.where(ok & (ax <= 3.4028234663852886e38), ax, 0.0)  # finite elements of the tile
    return tl.max(tl.max(ax, axis=1), axis=0)


@triton.jit
def _rint8(x, inv):
    """quant.quantize: rint(clamp(x * inv, +-127)), NaN -> 0, as int32."""
    y = x * inv
    y = tl.where(y == y, y, 0.0)
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    return (y + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _one(X, sb, sh, sn, z, h, offs_n, offs_d, ok, inv_static, DYNAMIC: tl.constexpr, SMOOTH: tl.constexpr, N):
    x = tl.load(X + z * sb + h * sh + offs_n[:, None] * sn + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    if DYNAMIC:
        s = _scale_of(_absmax(x, ok))
        if SMOOTH:
            # k minus its per-channel mean over the N tokens (softmax ignores a per-row constant),
            # the mean taken on the int8 grid of a first pass so that its bits are the same on
            # every device: float32(sum of int8) * s / N
            i1 = tl.where(ok, _rint8(x, tl.div_rn(1.0, s)), 0)
            mean = tl.div_rn(tl.sum(i1, axis=0).to(tl.float32) * s, N.to(tl.float32))
            x = x - mean[None, :]
            s = _scale_of(_absmax(x, ok))
        inv = tl.div_rn(1.0, s)
    else:
        s = 1.0
        inv = inv_static
    return _rint8(x, inv), s


@triton.jit
def _quant_heads(
    Q, K, V, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    Q8, K8, V8, INTS, FLOATS, stride_pz, stride_ph, c_log2e_bits, H, N, NP, G,
    BLOCK_N: tl.constexpr, D: tl.constexpr, GROUPS: tl.constexpr, DYNAMIC: tl.constexpr, SMOOTH_K: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    ok = (offs_n < N)[:, None]
    for i in tl.range(0, GROUPS):
        g = tl.program_id(0) * GROUPS + i
        if g < G:
            z = g // H
            h = g % H
            p = z * stride_pz + h * stride_ph
            if DYNAMIC:
                iq = 1.0
                ik = 1.0
                iv = 1.0
            else:
                iq = tl.load(FLOATS + p + 1)
                ik = tl.load(FLOATS + p + 2)
                iv = tl.load(FLOATS + p + 3)
            q8, sq = _one(Q, sqb, sqh, sqn, z, h, offs_n, offs_d, ok, iq, DYNAMIC, False, N)
            k8, sk = _one(K, skb, skh, skn, z, h, offs_n, offs_d, ok, ik, DYNAMIC, SMOOTH_K, N)
            v8, sv = _one(V, svb, svh, svn, z, h, offs_n, offs_d, ok, iv, DYNAMIC, False, N)
            dst = g * N * D + offs_n[:, None] * D + offs_d[None, :]
            tl.store(Q8 + dst, q8.to(tl.int8), mask=ok)
            tl.store(K8 + dst, k8.to(tl.int8), mask=ok)
            tl.store(V8 + g * D * NP + offs_d[None, :] * NP + offs_n[:, None], v8.to(tl.int8), mask=ok)
            if DYNAMIC:
                # quant.make_params, op for op: S = (c log2 e) sq sk in float64, R = floor(1/S + 1/2)
                s = c_log2e_bits.to(tl.float64, bitcast=True) * sq.to(tl.float64) * sk.to(tl.float64)
                r = tl.floor(tl.where(s > 0.0, 1.0 / s, R_MAX * 1.0) + 0.5)
                r = tl.minimum(tl.maximum(r, 1.0), R_MAX * 1.0).to(tl.int32)
                tl.store(INTS + p + 0, r)
                tl.store(INTS + p + 1, (1 << 26) // r)
                tl.store(INTS + p + 2, (1 << 30) // r)
                tl.store(INTS + p + 3, 0)
                tl.store(FLOATS + p + 0, sv)
                tl.store(FLOATS + p + 1, tl.div_rn(1.0, sq))
                tl.store(FLOATS + p + 2, tl.div_rn(1.0, sk))
                tl.store(FLOATS + p + 3, tl.div_rn(1.0, sv))


def _bits(x):
    return struct.unpack("<q", struct.pack("<d", x))[0]


def quantize_heads(q, k, v, *, ints=None, floats=None, pstrides=None, smooth_k=True, scale=None, groups=None, num_warps=None):
    """Dynamic (ints/floats None): returns q8, k8, v8 (key-major), ints (B,H,4), floats (B,H,4).
    Static: ints/floats given with group strides pstrides; returns q8, k8, v8, ints, floats."""
    b, h, n, d = q.shape
    dev = q.device
    assert q.stride(3) == k.stride(3) == v.stride(3) == 1
    q8 = torch.empty((b, h, n, d), dtype=torch.int8, device=dev)
    k8 = torch.empty_like(q8)
    np_ = max(16, -(-n // 16) * 16)
    v8 = torch.empty((b, h, d, np_), dtype=torch.int8, device=dev)[..., :n].transpose(-1, -2)
    dynamic = ints is None
    if dynamic:
        ints = torch.empty((b, h, 4), dtype=torch.int32, device=dev)
        floats = torch.empty((b, h, 4), dtype=torch.float32, device=dev)
        pstrides = (h * 4, 4)
    c = 1.0 / math.sqrt(d) if scale is None else float(scale)
    bn = triton.next_power_of_2(max(n, 16))
    g = b * h
    if groups is None:
        groups = max(1, min(8, 4096 // (bn * d)))  # small heads: several per program
    if num_warps is None:
        num_warps = 8 if bn * d >= 8192 else 4
    _quant_heads[(triton.cdiv(g, groups),)](
        q, k, v, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), q8, k8, v8, ints, floats, *pstrides, _bits(c * LOG2E), h, n, np_, g,
        BLOCK_N=bn, D=d, GROUPS=groups, DYNAMIC=dynamic, SMOOTH_K=smooth_k, num_warps=num_warps,
    )
    return q8, k8, v8, ints, floats


def reference_heads(q, k, v, smooth_k=True):
    """torch: the same per-(batch, head) dynamic quantization (for the bit test)."""
    from qflash_gen import quant
    b, h, n, d = q.shape
    out = []
    ints = torch.empty((b, h, 4), dtype=torch.int32); floats = torch.empty((b, h, 4), dtype=torch.float32)
    q8 = torch.empty((b, h, n, d), dtype=torch.int8); k8 = torch.empty_like(q8); v8 = torch.empty_like(q8)
    for z in range(b):
        for y in range(h):
            sq = quant.dynamic_scale(q[z, y]); sv = quant.dynamic_scale(v[z, y])
            kk = k[z, y].float()
            sk = quant.dynamic_scale(kk)
            if smooth_k:
                i1 = quant.quantize(kk, sk).int()
                mean = (i1.sum(0).float() * sk) / torch.full((), float(n))
                kk = kk - mean
                sk = quant.dynamic_scale(kk)
            q8[z, y] = quant.quantize(q[z, y], sq); k8[z, y] = quant.quantize(kk, sk); v8[z, y] = quant.quantize(v[z, y], sv)
            p = quant.make_params(sq, sk, sv, head_dim=d)
            ints[z, y] = p.ints; floats[z, y] = p.floats
    return q8, k8, v8, ints, floats


def reference_heads_vec(q, k, v, smooth_k=True, scale=None):
    """Vectorized torch version of reference_heads (same ops; reductions per (batch, head))."""
    from qflash_gen import quant
    b, h, n, d = q.shape

    def scale_of(x):
        a = torch.where(torch.isfinite(x), x.abs(), torch.zeros((), dtype=x.dtype, device=x.device)).float().amax(dim=(2, 3))
        return torch.where(a > 0, a / torch.full((), 127.0, device=x.device), torch.ones_like(a))

    def qz(x, s):
        inv = torch.ones_like(s) / s
        y = torch.nan_to_num(x.float() * inv[:, :, None, None], nan=0.0, posinf=127.0, neginf=-127.0)
        return torch.round(y).clamp_(-127, 127).to(torch.int8)

    sq, sv = scale_of(q), scale_of(v)
    kk = k.float(); sk = scale_of(kk)
    if smooth_k:
        i1 = qz(kk, sk).int()
        mean = (i1.sum(2).float() * sk[:, :, None]) / torch.full((), float(n), device=q.device)
        kk = kk - mean[:, :, None, :]
        sk = scale_of(kk)
    c = 1.0 / math.sqrt(d) if scale is None else float(scale)
    s = torch.full((), c * LOG2E, dtype=torch.float64, device=q.device) * sq.double() * sk.double()
    inv = torch.where(s > 0, 1.0 / s, torch.full_like(s, 65535.0))
    r = torch.nan_to_num(torch.floor(inv + 0.5), nan=65535, posinf=65535).clamp(1, 65535).to(torch.int64)
    ints = torch.stack([r, (1 << 26) // r, (1 << 30) // r, torch.zeros_like(r)], -1).to(torch.int32)
    one = torch.ones_like(sq)
    floats = torch.stack([sv, one / sq, one / sk, one / sv], -1)
    return qz(q, sq), qz(kk, sk), qz(v, sv), ints, floats
