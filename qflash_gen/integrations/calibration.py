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
