"""Shared helpers for tests: random int8 problems, bias/mask builders, kernel-vs-oracle check."""

from __future__ import annotations

import os

import torch

from qflash_gen import attention_int8, quant
from qflash_gen.reference import reference_int8


def kernel_device() -> str:
    """'cuda' where kernels compile for a GPU, else 'cpu' (Triton interpreter)."""
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return "cuda" if torch.cuda.is_available() and not interp else "cpu"


def int8_problem(b, h, n, d, *, seed=0, device="cpu", lo=-128, hi=127, extremes=False):
    """Random int8 (B, H, N, D) q, k, v in [lo, hi] (the whole int8 range by default: -128 is a
    legal int8 input); ``extremes``: with ``plant_extremes``' rows on top."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randint(lo, hi + 1, (b, h, n, d), generator=g, dtype=torch.int8) for _ in range(3))
    if extremes:
        plant_extremes(q, k, v)
    return q.to(device), k.to(device), v.to(device)


def plant_extremes(q, k, v):
    """Rows at the int8 extremes, in place on int8 (B, H, N, D) q, k, v (as far as N allows):

    * query 0 and key 0 all -128: the largest score there is, 2**14 * D, far above the row's
      others (a sharply peaked row: one key takes the whole weight);
    * query 1 all 127 against keys 1..3 all 127: three keys tied at 127**2 * D, the rest far
      below (a saturating row: ties at the top, the others' weights flushed to 0);
    * query 2 all 0: every score 0 (a flat row: p = P_MAX on every key, l and |acc| at their
      worst case);
    * value channels 0 and 1 all -128 and all 127: outputs at both ends of the int8 range (the
      peaked and flat rows give exactly -128 and 127 there)."""
    n = q.shape[2]
    q[..., 0, :] = -128
    k[..., 0, :] = -128
    if n > 1:
        q[..., 1, :] = 127
        k[..., 1:4, :] = 127
    if n > 2:
        q[..., 2, :] = 0
    v[..., 0] = -128
    v[..., 1] = 127


def swin_like_bias(b, h, n, *, seed=0, device="cpu", mask_frac=0.3, masked_row=True):
    """A float relative-position-like bias (1, H, N, N) and a bool mask (B, 1, N, N) with a
    fraction of keys masked and, if asked, one fully masked query row."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn((1, h, n, n), generator=g) * 2.0
    mask = torch.rand((b, 1, n, n), generator=g) >= mask_frac
    if masked_row and n > 1:
        mask[:, :, n // 2, :] = False
    return bias.to(device), mask.to(device)


def run_both(q8, k8, v8, scales, cfg, *, attn_mask=None, float_bias=None, out_dtype=torch.int8):
    """Kernel output and oracle output for the same inputs, config and scales (the oracle reads
    the float additive bias the kernel reads and converts it per scale group, as the kernel does)."""
    got = attention_int8(q8, k8, v8, scales, attn_mask, float_bias=float_bias, config=cfg, out_dtype=out_dtype)
    params = quant.make_params(*scales, head_dim=q8.shape[-1], device=q8.device)
    bias = quant.additive_bias(attn_mask, float_bias)
    want = reference_int8(q8, k8, v8, params, cfg, bias=bias, out_dtype=out_dtype)
    return got, want


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.is_floating_point():
        same = got.view(torch.int16 if got.element_size() == 2 else torch.int32) == want.view(
            torch.int16 if want.element_size() == 2 else torch.int32
        )
    else:
        same = got == want
    if not bool(same.all()):
        bad = (~same).nonzero()[:5].tolist()
        diffs = [(idx, got[tuple(idx)].item(), want[tuple(idx)].item()) for idx in bad]
        raise AssertionError(f"{int((~same).sum())} of {same.numel()} elements differ; first: {diffs}")


def shipped_db_of(monkeypatch, folder, *gpus: str) -> None:
    """Make the shipped DB hold only these GPUs' shipped files (copied into ``folder``): for tests
    that replay one card's recorded table with that card's shipped entries as the runtime's pick,
    whatever other cards' files ship later (an H200 file makes the ladder serve its fresh-template
    entries to an H100 ahead of the H100's older-template ones)."""
    import shutil

    from qflash_gen import db
    from qflash_gen.db import store

    real = db.shipped_db_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for gpu in gpus:
        shutil.copy(real / db.file_name(gpu), folder / db.file_name(gpu))
    monkeypatch.setattr(db, "shipped_db_dir", lambda: folder)
    monkeypatch.setattr(store, "shipped_db_dir", lambda: folder)
