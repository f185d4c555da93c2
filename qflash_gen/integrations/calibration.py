"""Calibration statistics: what :func:`qflash_gen.integrations.timm.calibrate` records per
(head, channel) while float batches run, and the static scales and exact transforms it derives
(docs/models.md; the transforms are described in :mod:`qflash_gen.integrations.base`).

Pure tensor functions: the modules hold the statistics, these compute them.
"""

from __future__ import annotations

import torch

SMOOTH_K_DEFAULT = True
EQUALIZE_DEFAULT = True
EQ_LIMIT = 256.0  # s and t are clamped to [1/256, 256] (a near-empty channel must not blow up fp16)
INT8_MAX = 127.0


def finite_abs(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t.abs(), torch.zeros((), dtype=t.dtype, device=t.device))


@torch.no_grad()
def observe(
    old: dict[str, torch.Tensor] | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``old`` statistics updated with one batch of (B, H, N, D) q, k, v.  Per (head, channel):
    max|q|, max|v|, max k, min k, sum of k and the count of finite k."""
    dims = (0, 2)
    kf = k.float()
    finite = torch.isfinite(kf)
    stats = {
        "q": finite_abs(q).float().amax(dim=dims),
        "v": finite_abs(v).float().amax(dim=dims),
        "kmax": torch.where(finite, kf, -torch.inf).amax(dim=dims),
        "kmin": torch.where(finite, kf, torch.inf).amin(dim=dims),
        "ksum": torch.where(finite, kf, 0.0).double().sum(dim=dims),
        "kcount": finite.sum(dim=dims).double(),
    }
    if old is not None:
        stats["q"] = torch.maximum(old["q"], stats["q"])
        stats["v"] = torch.maximum(old["v"], stats["v"])
        stats["kmax"] = torch.maximum(old["kmax"], stats["kmax"])
        stats["kmin"] = torch.minimum(old["kmin"], stats["kmin"])
        stats["ksum"] = old["ksum"] + stats["ksum"]
        stats["kcount"] = old["kcount"] + stats["kcount"]
    return stats


def derive(
    st: dict[str, torch.Tensor], *, per_head: bool, smooth_k: bool, equalize: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """``(kmean, qk_eq, v_eq, scales)`` from the statistics: the transforms asked for (None where
    off), each (H, D), and the static scales (3, P) of the transformed q, k, v (P = 1, or H with
    ``per_head``)."""
    seen = st["kcount"] > 0
    kmean = torch.where(seen, st["ksum"] / st["kcount"].clamp_min(1), 0.0).float()
    if not smooth_k:
        kmean = torch.zeros_like(kmean)
    amax_q = st["q"]
    amax_k = torch.where(seen, torch.maximum(st["kmax"] - kmean, kmean - st["kmin"]), 0.0).clamp_min(0)
    amax_v = st["v"]
    qk_eq = v_eq = None
    if equalize:
        lo, hi = 1.0 / EQ_LIMIT, EQ_LIMIT
        ok = (amax_q > 0) & (amax_k > 0)
        qk_eq = torch.where(ok, torch.sqrt(amax_k / torch.where(ok, amax_q, 1.0)), 1.0).clamp(lo, hi)
        mean_v = amax_v.mean(dim=1, keepdim=True)
        ok = (amax_v > 0) & (mean_v > 0)
        v_eq = torch.where(ok, amax_v / torch.where(ok, mean_v, 1.0), 1.0).clamp(lo, hi)
        amax_q, amax_k, amax_v = amax_q * qk_eq, amax_k / qk_eq, amax_v / v_eq
    amax = torch.stack([amax_q.amax(dim=1), amax_k.amax(dim=1), amax_v.amax(dim=1)])  # (3, H)
    if not per_head:
        amax = amax.amax(dim=1, keepdim=True)
    scales = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    return (kmean if smooth_k else None), qk_eq, v_eq, scales


@torch.no_grad()
def fold_weights(
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    proj_weight: torch.Tensor | None,
    kmean: torch.Tensor | None,
    qk_eq: torch.Tensor | None,
    v_eq: torch.Tensor | None,
    *,
    fold_qk: bool,
) -> dict[str, torch.Tensor]:
    """The transforms folded into copies of the weights: ``qflash_qkv_weight`` (rows of q scaled
    by s, of k by 1/s, of v by 1/t), ``qflash_qkv_bias`` (the k bias shifted by kmean, then
    scaled likewise) and ``qflash_proj_weight`` (columns scaled by t), each only where it differs
    from the original.  ``fold_qk`` False, or ``proj_weight`` None: a norm sits in between (that
    part then runs per call).  The arithmetic runs in float32 (float64 for a float64 model)."""
    out: dict[str, torch.Tensor] = {}
    w, b, s, t = qkv_weight, qkv_bias, qk_eq, v_eq
    c = w.shape[0] // 3
    work = torch.promote_types(w.dtype, torch.float32)
    row_scale = torch.ones(3 * c, dtype=work, device=w.device)
    shift = torch.zeros(3 * c, dtype=work, device=w.device)
    if fold_qk:
        if s is not None:
            row_scale[:c] = s.flatten()
            row_scale[c : 2 * c] = 1.0 / s.flatten().to(work)
        if kmean is not None:
            shift[c : 2 * c] = kmean.flatten()
    if t is not None:
        row_scale[2 * c :] = 1.0 / t.flatten().to(work)
    if bool((row_scale != 1).any()):
        out["qflash_qkv_weight"] = (w.to(work) * row_scale[:, None]).to(w.dtype)
    if bool((shift != 0).any()) or (b is not None and "qflash_qkv_weight" in out):
        bw = b.to(work) if b is not None else torch.zeros_like(shift)
        out["qflash_qkv_bias"] = ((bw - shift) * row_scale).to(w.dtype)
    if t is not None and proj_weight is not None:
        out["qflash_proj_weight"] = (proj_weight.to(work) * t.flatten()[None, :]).to(proj_weight.dtype)
    return out
