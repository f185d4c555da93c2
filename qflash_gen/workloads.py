"""Named workloads: what attention shapes a vision transformer launches, per image
(docs/design.md, "Workloads").

The tuner, the benchmarks and ``qflash-show`` speak in model names (``vit_b``, ``swin_t``, the
paper's ``A1``…``A7``); the kernel speaks in ``(B, H, N, D)``.  This module is the one table that
maps the first to the second, so a model is tuned at the shapes it really runs.

* ViT / DeiT (224×224, patch 16): N = 14·14 + 1 class token = 197, D = 64; heads T/S/B/L =
  3/6/12/16.  ``_384`` variants: N = 24·24 + 1 = 577.
* DINOv2 (patch 14): ``dinov2_s`` / ``_b`` / ``_l`` / ``_g`` (6/12/16/24 heads, D = 64) at 224 px,
  N = 16·16 + 1 = 257, and ``..._518`` at 518 px, N = 37·37 + 1 = 1370.
* Swin (224×224, window 7): N = 7·7 = 49, D = 32.  Stage s has (windows per image, heads) =
  (64, 3) (16, 6) (4, 12) (1, 24) for T and S; Swin-B has heads 4/8/16/32.  Every Swin block adds
  a relative-position bias and shifted-window blocks add a mask, so all Swin stages run the
  biased (``masked=True``) kernel.  ``swin_t`` names the four stages ``swin_t_s1``…``swin_t_s4``.
* The paper's kernel workloads: A1–A3 = ViT-T/S/B, A4–A7 = the four Swin-T stages.

A workload's batch multiplies the kernel's B by its windows per image:
``shapes(w, batch) = (batch * windows, heads, N, D)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

DEFAULT_BATCHES: tuple[int, ...] = (1, 8, 64)

VIT_N = 197  # 14 * 14 patches + class token (224 / 16 = 14)
VIT_384_N = 577  # 24 * 24 patches + class token (384 / 16 = 24)
DINO_N = {224: 257, 518: 1370}  # DINOv2 (patch 14): 16 * 16 + 1 at 224 px, 37 * 37 + 1 at 518 px
VIT_D = 64
SWIN_N = 49  # 7 * 7 tokens per window
SWIN_D = 32
SWIN_WINDOWS = (64, 16, 4, 1)  # (56/7)^2, (28/7)^2, (14/7)^2, (7/7)^2 windows per 224x224 image


@dataclasses.dataclass(frozen=True)
class Workload:
    """One attention launch of a model, per image.

    Attributes:
        name: the workload's name (``vit_b``, ``swin_t_s2``, ``A5``…).
        n: tokens per attention row (N).
        d: head dim (D).
        heads: attention heads (H).
        windows: attention instances per image, multiplied into the kernel's B (Swin windows).
        masked: the launch carries an additive bias / mask (Swin: relative-position bias, plus the
            shifted-window mask on every other block).
        model: what it comes from, for tables and logs.
    """

    name: str
    n: int
    d: int
    heads: int
    windows: int = 1
    masked: bool = False
    model: str = ""

    def shape(self, batch: int) -> tuple[int, int, int, int]:
        """The kernel shape ``(B, H, N, D)`` for ``batch`` images."""
        return shapes(self, batch)


def _vit_family() -> list[Workload]:
    out = []
    sizes = {"t": 3, "s": 6, "b": 12, "l": 16}
    for family, sizes_here in (("vit", "tsbl"), ("deit", "tsb")):
        for size in sizes_here:
            heads = sizes[size]
            label = f"{'ViT' if family == 'vit' else 'DeiT'}-{size.upper()}"
            out.append(Workload(f"{family}_{size}", VIT_N, VIT_D, heads, model=f"{label}/16 224"))
            out.append(Workload(f"{family}_{size}_384", VIT_384_N, VIT_D, heads, model=f"{label}/16 384"))
    return out


def _dinov2_family() -> list[Workload]:
    """DINOv2 ViT-S/B/L/g with patch 14 (no registers): 224 px (N = 257) and 518 px (N = 1370)."""
    out = []
    for size, heads in (("s", 6), ("b", 12), ("l", 16), ("g", 24)):
        for px, n in DINO_N.items():
            suffix = "" if px == 224 else f"_{px}"
            out.append(Workload(f"dinov2_{size}{suffix}", n, VIT_D, heads, model=f"DINOv2 ViT-{size.upper()}/14 {px}"))
    return out


def _swin_family() -> list[Workload]:
    heads = {"t": (3, 6, 12, 24), "s": (3, 6, 12, 24), "b": (4, 8, 16, 32)}
    out = []
    for size, per_stage in heads.items():
        for stage, (windows, h) in enumerate(zip(SWIN_WINDOWS, per_stage, strict=True), start=1):
            out.append(
                Workload(
                    f"swin_{size}_s{stage}",
                    SWIN_N,
                    SWIN_D,
                    h,
                    windows=windows,
                    masked=True,
                    model=f"Swin-{size.upper()} stage {stage} (window 7, 224)",
                )
            )
    return out


def _paper() -> list[Workload]:
    base = {w.name: w for w in _vit_family() + _swin_family()}
    sources = ("vit_t", "vit_s", "vit_b", "swin_t_s1", "swin_t_s2", "swin_t_s3", "swin_t_s4")
    return [
        dataclasses.replace(base[src], name=f"A{i}", model=f"paper A{i}: {base[src].model}")
        for i, src in enumerate(sources, start=1)
    ]


WORKLOADS: dict[str, Workload] = {w.name: w for w in _vit_family() + _dinov2_family() + _swin_family() + _paper()}

# Names that stand for several workloads: a Swin model is its four stages; "paper" is A1..A7.
GROUPS: dict[str, tuple[str, ...]] = {
    **{f"swin_{s}": tuple(f"swin_{s}_s{i}" for i in range(1, 5)) for s in "tsb"},
    "paper": tuple(f"A{i}" for i in range(1, 8)),
}


def known_names() -> list[str]:
    """Every name :func:`resolve` accepts (workloads and groups), sorted."""
    return sorted(set(WORKLOADS) | set(GROUPS), key=lambda s: (s[0].isupper(), s))


def _canonical(name: str) -> str:
    key = name.strip()
    if key in WORKLOADS or key in GROUPS:
        return key
    for candidate in (key.lower(), key.upper()):  # "a3" → "A3", "ViT_B" → "vit_b"
        if candidate in WORKLOADS or candidate in GROUPS:
            return candidate
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(known_names())}")


def get(name: str) -> Workload:
    """One workload by name (a group name such as ``swin_t`` is an error: use :func:`resolve`)."""
    key = _canonical(name)
    if key in GROUPS:
        raise ValueError(f"{name!r} names several workloads ({', '.join(GROUPS[key])}); use resolve()")
    return WORKLOADS[key]


def resolve(names: str | Iterable[str]) -> list[Workload]:
    """Workload names (a comma-separated string or an iterable) → workloads, groups expanded.

    Order follows the input; repeats are dropped.  Unknown names raise ValueError listing the
    known ones."""
    if isinstance(names, str):
        items = [s for s in (part.strip() for part in names.split(",")) if s]
    else:
        items = [str(s).strip() for s in names]
    if not items:
        raise ValueError(f"no workload given; known: {', '.join(known_names())}")
    out: list[Workload] = []
    for item in items:
        key = _canonical(item)
        for member in GROUPS.get(key, (key,)):
            w = WORKLOADS[member]
            if w not in out:
                out.append(w)
    return out


def _check_batch(batch: int) -> None:
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")


def shapes(workload: Workload | str, batch: int) -> tuple[int, int, int, int]:
    """``(batch * windows, heads, N, D)``: the kernel shape of ``workload`` at ``batch`` images."""
    w = get(workload) if isinstance(workload, str) else workload
    _check_batch(batch)
    return (batch * w.windows, w.heads, w.n, w.d)


def attention_shapes(name: str, batch: int = 1) -> list[tuple[str, tuple[int, int, int, int], bool]]:
    """``name`` (a workload or group) → ``[(label, (B, H, N, D), masked)]``, one row per launch.

    The form ``qflash-show`` prints: one row per distinct kernel launch of the model."""
    _check_batch(batch)
    return [(w.name, shapes(w, batch), w.masked) for w in resolve(name)]


def parse_batches(text: str | Iterable[int]) -> tuple[int, ...]:
    """``"1,8,64"`` → ``(1, 8, 64)``; a clear ValueError naming ``--batches`` otherwise."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    out: list[int] = []
    for item in items:
        if item == "":
            continue
        try:
            value = int(item)
        except (TypeError, ValueError):
            raise ValueError(f"--batches: {item!r} is not an integer (expected e.g. 1,8,64)") from None
        if value < 1:
            raise ValueError(f"--batches: {value} must be >= 1")
        if value not in out:
            out.append(value)
    if not out:
        raise ValueError("--batches: no batch size given (expected e.g. 1,8,64)")
    return tuple(out)
