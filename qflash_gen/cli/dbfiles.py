"""Reading every DB file for ``qflash-db``, the broken ones too, and the helpers its tables share."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qflash_gen import db, workloads
from qflash_gen.cli.common import layer_name
from qflash_gen.gpu import is_valid_gpu_name
from qflash_gen.keys import bh_bucket


@dataclasses.dataclass
class FileStatus:
    """One DB file as ``ls``/``check`` see it: parsed, or the error that stops it being read."""

    layer: str
    path: Path
    parsed: db.DBFile | None
    error: str | None


def scan(database: db.TuningDB, gpu: str | None = None) -> list[FileStatus]:
    """Every ``*.yaml`` in every layer (or only ``<gpu>.yaml``), read with :func:`db.load_file`.

    Unlike ``TuningDB.entries`` this does not stop at the first corrupt file: ``check`` must
    report all of them."""
    out: list[FileStatus] = []
    for d in database.dirs:
        if db.is_file_layer(d):
            paths = [d] if d.exists() else []
        elif d.is_dir():
            paths = sorted(d.glob(f"*{db.schema.FILE_SUFFIX}"))
        else:
            continue
        for path in paths:
            if gpu is not None and path.stem != gpu:
                continue
            layer = layer_name(path)
            if not is_valid_gpu_name(path.stem):
                msg = f"{path}: file name {path.name!r} is not <gpu>.yaml with a short GPU name ([a-z0-9_])"
                out.append(FileStatus(layer, path, None, msg))
                continue
            try:
                out.append(FileStatus(layer, path, db.load_file(path), None))
            except db.DBError as exc:
                out.append(FileStatus(layer, path, None, str(exc)))
    return out


def fmt_us(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def fmt_db(x: float | None) -> str:
    if x is None:
        return "-"
    return "exact" if math.isinf(x) else f"{x:.1f}"


def best_baseline(entry: db.Entry) -> tuple[str, float] | None:
    if not entry.baselines:
        return None
    name = min(entry.baselines, key=lambda k: entry.baselines[k])
    return name, float(entry.baselines[name])


def workload_labels(names: str = "paper", batches: Iterable[int] = (1, 8, 64)) -> dict[tuple, list[str]]:
    """(N, D, masked, B*H bucket) → ["A3 b1", …]: which named workload/batch an entry serves."""
    out: dict[tuple, list[str]] = {}
    for w in workloads.resolve(names):
        for b in batches:
            bb, h, n, d = w.shape(b)
            out.setdefault((n, d, w.masked, bh_bucket(bb * h)), []).append(f"{w.name} b{b}")
    return out


def labels_for(key: Any, labels: dict[tuple, list[str]]) -> str:
    return ", ".join(labels.get((key.n, key.d, key.masked, key.bh_bucket), []))



def located(database: db.TuningDB, gpu: str, tier: str = db.FRESH) -> dict[Any, tuple[Any, Path]]:
    """``TuningDB.located`` over the readable files only (a corrupt layer is reported by ls/check)."""
    out: dict[Any, tuple[Any, Path]] = {}
    for status in scan(database, gpu):
        if status.parsed is None:
            continue
        for key, entry in status.parsed.tier(tier).items():
            out[key] = (entry, status.path)
    return out


def ladder(database: db.TuningDB, gpu: str) -> dict[Any, tuple[Any, Path, str]]:
    """Per key, the entry of the first tier that has it (fresh, other Triton, other template):
    what ``get_kernel`` runs for that exact key when no tier above has a nearer answer."""
    out: dict[Any, tuple[Any, Path, str]] = {}
    for tier in db.TIERS:
        for key, (entry, path) in located(database, gpu, tier).items():
            out.setdefault(key, (entry, path, tier))
    return out


def tier_text(entry: db.Entry, tier: str) -> str:
    """``usable`` / ``usable (other Triton): triton-3.6`` ... for tables."""
    label = db.software_label(entry.software)
    return db.TIER_LABELS[tier] + (f": {label}" if label else "")


def counts(parsed: db.DBFile) -> str:
    """``16 usable, 0 usable (other Triton), 28 usable (other template), 0 stale``."""
    parts = [f"{parsed.count(t)} {db.TIER_LABELS[t]}" for t in db.TIERS]
    return ", ".join(parts + [f"{len(parsed.stale)} stale"])



def check_file(path: Path) -> FileStatus:
    try:
        return FileStatus("file", path, db.load_file(path), None)
    except db.DBError as exc:
        return FileStatus("file", path, None, str(exc))
