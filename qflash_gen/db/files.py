"""DB files on disk: read (cached until the file changes), merge-and-write under a lock, and the
tolerant raw read the tuner's warm starts use.

Writes are atomic (``codegen.atomic_write``) under a ``filelock``; two writers lose nothing, and
a worse result never replaces a better one unless forced (docs/design.md, "Tuning DB").  A
writer killed mid-write leaves its temp file (``.<gpu>.yaml.<random>.tmp``) behind; the next
writer of the same file removes it under the lock.  Faults and what they do:
docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import filelock
import yaml

from qflash_gen.codegen import atomic_write
from qflash_gen.config import KernelConfig
from qflash_gen.db.parse import parse
from qflash_gen.db.schema import (
    FRESH,
    SCHEMA_VERSION,
    DBError,
    DBFile,
    Entry,
    Header,
    WriteReport,
    file_name,
    gpu_of_file,
    software_label,
    stale_reason,
    tier_of,
    triton_minor,
)
from qflash_gen.gpu import is_valid_gpu_name
from qflash_gen.keys import WorkloadKey

LOCK_TIMEOUT_S = 120.0

logger = logging.getLogger("qflash_gen.db")

_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_file_cache: dict[Path, tuple[tuple[int, int, int], DBFile]] = {}
_cache_lock = threading.Lock()


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _read_text(path: Path) -> str:
    """The file's text, or a DBError naming it (a folder of that name, no permission, not UTF-8)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DBError(f"not UTF-8 text ({exc.reason})", path) from None
    except IsADirectoryError:
        raise DBError("is a directory, not a DB file (a DB file is a <gpu>.yaml file)", path) from None
    except OSError as exc:
        raise DBError(f"cannot read it: {exc.strerror or exc}", path) from None


def load_file(path: str | os.PathLike) -> DBFile:
    """Parse and validate one DB file (cached until the file changes); DBError names file:line.

    Entries of another Triton or template go to ``fallbacks`` (with one INFO line); entries
    that cannot be used at all go to ``stale``, with one WARNING line on logger
    ``qflash_gen.db`` per file version read."""
    path = Path(path)
    sig = _signature(path)
    if sig is None:
        raise DBError("no such file", path)
    with _cache_lock:
        hit = _file_cache.get(path)
        if hit is not None and hit[0] == sig:
            return hit[1]
    text = _read_text(path)
    parsed = parse(path, text)
    result = DBFile(path, parsed.header, dict(parsed.entries), tuple(parsed.stale), tuple(parsed.fallbacks))
    if result.fallbacks:
        labels = sorted({f.label for f in result.fallbacks})
        logger.info(
            "%s: %d entr%s of another Triton or template (%s), used only where no fresh entry fits",
            path,
            len(result.fallbacks),
            "y" if len(result.fallbacks) == 1 else "ies",
            ", ".join(labels),
        )
    if result.stale:
        shown = ", ".join(f"{s.key} (line {s.line}: {s.reason})" for s in result.stale[:3])
        more = f" and {len(result.stale) - 3} more" if len(result.stale) > 3 else ""
        logger.warning(
            "%s: skipped %d stale entr%s (cannot be used): %s%s",
            path,
            len(result.stale),
            "y" if len(result.stale) == 1 else "ies",
            shown,
            more,
        )
    with _cache_lock:
        _file_cache[path] = (sig, result)
    return result


# -- writing ---------------------------------------------------------------------------------------
_generation = 0


def generation() -> int:
    """Counter bumped by every write from this process (lets in-process caches drop stale picks)."""
    return _generation


def _objective(entry: Mapping[str, Any]) -> str:
    proto = entry.get("protocol") or {}
    tuner = proto.get("tuner") if isinstance(proto, Mapping) else None
    return str(tuner.get("objective", "latency")) if isinstance(tuner, Mapping) else "latency"


def _better(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    """Lower median latency wins; between two energy-tuned entries (``--objective energy``, both
    with ``energy_uj``) lower energy wins.  A tie keeps the stored entry (no churn in the file)."""
    try:
        if (
            _objective(new) == _objective(old) == "energy"
            and new.get("energy_uj") is not None
            and old.get("energy_uj") is not None
        ):
            return float(new["energy_uj"]) < float(old["energy_uj"])
        return float(new["latency_us"]) < float(old["latency_us"])
    except (TypeError, ValueError):  # a stored stale entry with a malformed number: replace it
        return True


def _sort_key(ident: tuple[str, str, str | None]) -> tuple:
    k = WorkloadKey.from_str(ident[0])
    return (k.n, k.d, k.masked, k.in_dtype, k.out_dtype, k.bh_bucket, ident[1], str(ident[2]))


def _dump(header: Header, raw_entries: Iterable[dict[str, Any]]) -> str:
    header_sw = header.software()
    entries = []
    for raw in raw_entries:
        raw = dict(raw)
        software = raw.pop("software", {}) or {}
        over = {k: v for k, v in software.items() if header_sw.get(k) != v}
        if over:
            raw["software"] = over
        entries.append(raw)
    header = dataclasses.replace(header, entry_count=len(entries))
    doc = {"schema_version": SCHEMA_VERSION, "header": header.to_dict(), "entries": entries}
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)
    return (
        "# qflash-gen tuning DB (fields: tuning_db/README.md). Written by qflash_gen.db; merge, don't hand-sort.\n"
        + body
    )


def _remove_orphans(path: Path) -> list[Path]:
    """Temp files of this DB left by a writer killed mid-write (call under the file's lock: then
    no live writer of this file has one open)."""
    gone = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            tmp.unlink()
            gone.append(tmp)
        except FileNotFoundError:
            pass
        except OSError as exc:  # not ours to remove (another user's): leave it, say so
            logger.warning("%s: could not remove a stale temp file: %s", tmp, exc.strerror or exc)
    if gone:
        logger.info("%s: removed %d temp file(s) left by a killed writer", path, len(gone))
    return gone


def write_entries(
    path: str | os.PathLike,
    entries: Iterable[Entry],
    *,
    gpu: str | None = None,
    header: Header | None = None,
    force: bool = False,
    search_space_hash: str | None = None,
    prune_stale: bool = False,
    timeout: float = LOCK_TIMEOUT_S,
) -> WriteReport:
    """Merge ``entries`` into the DB file at ``path`` (created if missing), atomically, under a lock.

    An entry replaces the stored one with the same identity (key, triton major.minor, template
    hash) only if its median latency is lower, or ``force``.  Entries of other identities are
    kept (``prune_stale=True`` drops those stale for this process).  The header becomes this
    process's (``Header.running``) unless ``header`` is given; the file's GPU must match."""
    global _generation
    path = Path(path)
    entries = list(entries)
    for e in entries:
        if not isinstance(e, Entry):
            raise ValueError(f"entries must hold db.Entry objects, got {type(e).__name__}")
    if header is None:
        if gpu is None:
            gpu = path.stem
        if not is_valid_gpu_name(gpu):
            raise ValueError(f"gpu={gpu!r} must be a short GPU name ([a-z0-9_], see qflash_gen.gpu)")
        header = Header.running(gpu, search_space_hash=search_space_hash)
    elif gpu is not None and gpu != header.gpu:
        raise ValueError(f"gpu={gpu!r} disagrees with header.gpu={header.gpu!r}")
    if gpu_of_file(path) is not None and path.stem != header.gpu:
        raise ValueError(f"path={str(path)!r}: a DB for gpu {header.gpu!r} must be named {file_name(header.gpu)}")
    if path.is_dir():
        raise DBError("is a directory, not a DB file: remove it or write elsewhere", path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DBError(f"cannot create the DB: {parent} is a file, not a directory", path)
            break
    lock = filelock.FileLock(str(path) + ".lock", timeout=timeout)
    report = WriteReport(path)
    try:
        with lock:
            _remove_orphans(path)
            stored: dict[tuple[str, str, str | None], dict[str, Any]] = {}
            if path.exists():
                old = parse(path, _read_text(path))
                if old.header.gpu != header.gpu:
                    raise DBError(f"holds gpu {old.header.gpu!r}, refusing to write {header.gpu!r} entries", path)
                stored = dict(old.raw)
            for e in entries:
                raw = e.to_dict()
                if raw["software"].get("search_space_hash") is None:
                    raw["software"]["search_space_hash"] = header.search_space_hash
                ident = (raw["key"], triton_minor(raw["software"]["triton"]), raw["software"]["template_hash"])
                old_raw = stored.get(ident)
                if old_raw is None:
                    report.added.append(raw["key"])
                elif force or _better(raw, old_raw):
                    report.replaced.append(raw["key"])
                else:
                    report.kept.append(raw["key"])
                    continue
                stored[ident] = raw
                if tier_of(raw["software"]) != FRESH:
                    report.not_fresh.append((raw["key"], software_label(raw["software"])))
            if prune_stale:
                stored = {i: r for i, r in stored.items() if stale_reason(r["software"]) is None}
            try:
                text = _dump(header, (stored[i] for i in sorted(stored, key=_sort_key)))
            except yaml.representer.RepresenterError as exc:
                raise ValueError(
                    f"an entry holds a value YAML cannot store (protocol/baselines must be plain): {exc}"
                ) from None
            atomic_write(path, text)
    except filelock.Timeout:
        raise DBError(
            f"could not take the lock {lock.lock_file} within {timeout} s (another writer stuck?)", path
        ) from None
    except OSError as exc:  # a read-only or missing folder, a full disk, a path component that is a file
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        raise DBError(f"cannot write it: {exc.strerror or exc}{where}", path) from None
    with _cache_lock:
        _generation += 1
    if report.not_fresh:
        logger.info("%s: %s", path, report.tier_note())  # qflash-tune prints it in its DB line
    return report




def raw_configs(path: str | os.PathLike[str]) -> Iterator[tuple[str, KernelConfig]]:
    """``(key string, config)`` of every entry stored in ``path``, stale ones included, read
    tolerantly: an unreadable file yields nothing and an entry whose config this KernelConfig
    cannot read is skipped (:func:`load_file` reports both; a warm start is only a hint)."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    if not isinstance(raw, dict):
        return
    for entry in raw.get("entries") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            continue
        try:
            yield entry["key"], KernelConfig.from_dict(dict(entry.get("config") or {}))
        except (TypeError, ValueError):
            continue
