"""The tuning DB's records: file header, entries, software fingerprint and the lookup tiers.

An entry is kept per *identity* ``(key, triton major.minor, template hash)``.  For this process
an entry is in one of three tiers (:func:`tier_of`): ``fresh`` (measured with this Triton
major.minor and this template), ``other-triton`` (same template, another Triton) or
``other-template`` (another template, its config mapped into this ``KernelConfig``).
``get_kernel`` climbs them in that order before the safe default; an entry that cannot be used
at all (its config does not map, or cannot run its workload) is *stale*.  Field meanings:
``tuning_db/README.md``; the rules: docs/design.md, "Tuning DB".
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import triton

from qflash_gen import codegen
from qflash_gen.config import KernelConfig
from qflash_gen.gpu import current_gpu, is_valid_gpu_name
from qflash_gen.keys import WorkloadKey
from qflash_gen.version import __version__

SCHEMA_VERSION = 2
"""2: the header counts the entries (``entry_count``), so a file cut short is detected.  Version
1 files (without the count) are still read."""
FILE_SUFFIX = ".yaml"
FILE_SUFFIXES = (".yaml", ".yml")  # what names a DB *file* (vs a folder) in --db / $QFLASH_GEN_DB

FRESH, OTHER_TRITON, OTHER_TEMPLATE = "fresh", "other-triton", "other-template"
TIERS: tuple[str, ...] = (FRESH, OTHER_TRITON, OTHER_TEMPLATE)
TIER_LABELS = {FRESH: "usable", OTHER_TRITON: "usable (other Triton)", OTHER_TEMPLATE: "usable (other template)"}

SOFTWARE_FIELDS: tuple[str, ...] = ("triton", "torch", "cuda", "template_hash", "search_space_hash", "qflash_gen")
"""Software fingerprint of a measurement.  Only ``triton`` (major.minor) and ``template_hash``
decide staleness; the rest is recorded so a reader can judge an entry."""

ENTRY_REQUIRED = ("key", "config", "latency_us", "latency_spread_us", "sqnr_db", "trials", "date", "protocol")
ENTRY_OPTIONAL = ("measured_on_device", "energy_uj", "baselines", "software")


class DBError(ValueError):
    """A tuning DB file that cannot be read: the message starts with ``file:line``."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None) -> None:
        where = f"{path}:{line}" if path is not None and line is not None else str(path) if path else "<db>"
        super().__init__(f"{where}: {message}")
        self.path = None if path is None else Path(path)
        self.line = line


# -- software fingerprint ------------------------------------------------------------------------
def running_software(search_space_hash: str | None = None) -> dict[str, str | None]:
    """The fingerprint of this process: what a measurement made now would record."""
    return {
        "triton": str(triton.__version__),
        "torch": str(torch.__version__),  # a TorchVersion (str subclass) that safe_dump refuses
        "cuda": torch.version.cuda,
        "template_hash": codegen.template_hash(),
        "search_space_hash": search_space_hash,
        "qflash_gen": __version__,
    }


def triton_minor(version: str | None) -> str:
    """``"3.6.0+git1234" -> "3.6"`` (parsed with a regex: never ``eval``)."""
    m = re.match(r"^\s*(\d+)\.(\d+)", version or "")
    return f"{m[1]}.{m[2]}" if m else str(version)


def stale_reason(software: Mapping[str, str | None]) -> str | None:
    """Why an entry measured with ``software`` must not be used by this process, or None."""
    reasons = []
    mine = triton_minor(triton.__version__)
    theirs = triton_minor(software.get("triton"))
    if theirs != mine:
        reasons.append(f"triton {theirs} != running {mine}")
    template = software.get("template_hash")
    if template != codegen.template_hash():
        reasons.append(f"template {str(template)[:12]} != running {codegen.template_hash()[:12]}")
    return "; ".join(reasons) or None


def tier_of(software: Mapping[str, str | None]) -> str:
    """The lookup tier of an entry measured with ``software`` (module doc): fresh, other-triton or
    other-template."""
    if software.get("template_hash") != codegen.template_hash():
        return OTHER_TEMPLATE
    if triton_minor(software.get("triton")) != triton_minor(triton.__version__):
        return OTHER_TRITON
    return FRESH


def software_label(software: Mapping[str, str | None]) -> str:
    """What differs from this process, as ``Kernel.why`` names it: ``triton-3.6``,
    ``template-8da88910`` or both (``triton-3.6:template-8da88910``); ``""`` when fresh."""
    parts = []
    theirs = triton_minor(software.get("triton"))
    if theirs != triton_minor(triton.__version__):
        parts.append(f"triton-{theirs}")
    template = software.get("template_hash")
    if template != codegen.template_hash():
        parts.append(f"template-{str(template)[:8]}")
    return ":".join(parts)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _driver_version() -> str | None:
    """NVIDIA kernel driver version from /proc (Linux), else None; torch does not expose it."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
    return m[1] if m else None


# -- header and entries --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Header:
    """File header: which GPU the file is for, and the machine and software of the last write."""

    gpu: str
    compute_capability: str | None = None
    device_name: str | None = None
    total_memory_gib: float | None = None
    driver: str | None = None
    cuda: str | None = None
    torch: str | None = None
    triton: str | None = None
    template_hash: str | None = None
    search_space_hash: str | None = None
    qflash_gen: str | None = None
    updated: str | None = None
    entry_count: int | None = None  # set by the writer (schema 2): a reader checks the file is whole

    def __post_init__(self) -> None:
        if not is_valid_gpu_name(self.gpu):
            raise ValueError(f"Header.gpu={self.gpu!r} must be a short GPU name ([a-z0-9_], see qflash_gen.gpu)")

    @classmethod
    def running(
        cls,
        gpu: str,
        *,
        search_space_hash: str | None = None,
        device: torch.device | str | int | None = None,
    ) -> Header:
        """Header for a write from this process; GPU facts are filled in when ``gpu`` is the device present."""
        hw: dict[str, Any] = {}
        if torch.cuda.is_available() and current_gpu(device) == gpu:
            props = torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device)
            hw = {
                "compute_capability": f"{props.major}.{props.minor}",
                "device_name": props.name,
                "total_memory_gib": round(props.total_memory / 2**30, 2),
                "driver": _driver_version(),
            }
        return cls(gpu=gpu, **hw, **running_software(search_space_hash), updated=_now())

    def software(self) -> dict[str, str | None]:
        return {f: getattr(self, f) for f in SOFTWARE_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tuned result: the best config found for a workload key on a GPU, and its evidence.

    ``latency_us`` is the median kernel time, ``latency_spread_us`` its dispersion (as defined by
    ``protocol``), ``sqnr_db`` the accuracy vs the float64 reference, ``trials`` the number of
    configs measured to find it.  ``software`` is the fingerprint it was measured with (default:
    this process)."""

    key: WorkloadKey
    config: KernelConfig
    latency_us: float
    latency_spread_us: float
    sqnr_db: float
    trials: int
    protocol: Mapping[str, Any]
    date: str = dataclasses.field(default_factory=_now)
    measured_on_device: str | None = None
    energy_uj: float | None = None
    baselines: Mapping[str, float] = dataclasses.field(default_factory=dict)
    software: Mapping[str, str | None] = dataclasses.field(default_factory=running_software)

    def __post_init__(self) -> None:
        if not isinstance(self.key, WorkloadKey):
            raise ValueError(f"Entry.key must be a WorkloadKey, got {type(self.key).__name__}")
        if not isinstance(self.config, KernelConfig):
            raise ValueError(f"Entry.config must be a KernelConfig, got {type(self.config).__name__}")
        _check_number("Entry.latency_us", self.latency_us, positive=True)
        _check_number("Entry.latency_spread_us", self.latency_spread_us, nonneg=True)
        _check_number("Entry.sqnr_db", self.sqnr_db, allow_inf=True)
        if not isinstance(self.trials, int) or isinstance(self.trials, bool) or self.trials < 1:
            raise ValueError(f"Entry.trials={self.trials!r} must be an int >= 1")
        if not isinstance(self.protocol, Mapping):
            raise ValueError(f"Entry.protocol must be a mapping, got {type(self.protocol).__name__}")
        if not isinstance(self.date, str) or not self.date:
            raise ValueError(f"Entry.date={self.date!r} must be an ISO 8601 string")
        if self.measured_on_device is not None and not isinstance(self.measured_on_device, str):
            raise ValueError(f"Entry.measured_on_device={self.measured_on_device!r} must be a str or None")
        if self.energy_uj is not None:
            _check_number("Entry.energy_uj", self.energy_uj, nonneg=True)
        if not isinstance(self.baselines, Mapping):
            raise ValueError(f"Entry.baselines must be a mapping name -> microseconds, got {self.baselines!r}")
        for name, us in self.baselines.items():
            if not isinstance(name, str):
                raise ValueError(f"Entry.baselines key {name!r} must be a str")
            _check_number(f"Entry.baselines[{name!r}]", us, positive=True)
        unknown = set(self.software) - set(SOFTWARE_FIELDS)
        if unknown:
            raise ValueError(f"Entry.software has unknown field(s) {sorted(unknown)}; known: {list(SOFTWARE_FIELDS)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping as stored in YAML (software in full; the writer compacts it)."""
        out: dict[str, Any] = {
            "key": self.key.to_str(),
            "config": self.config.to_dict(),
            "latency_us": float(self.latency_us),
            "latency_spread_us": float(self.latency_spread_us),
            "sqnr_db": float(self.sqnr_db),
            "trials": int(self.trials),
            "date": self.date,
            "protocol": dict(self.protocol),
        }
        if self.measured_on_device is not None:
            out["measured_on_device"] = self.measured_on_device
        if self.energy_uj is not None:
            out["energy_uj"] = float(self.energy_uj)
        if self.baselines:
            out["baselines"] = {k: float(v) for k, v in self.baselines.items()}
        out["software"] = {f: self.software.get(f) for f in SOFTWARE_FIELDS}
        return out


def _check_number(what: str, x: Any, *, positive: bool = False, nonneg: bool = False, allow_inf: bool = False) -> None:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)
    ok = ok and (allow_inf or math.isfinite(x)) and (not positive or x > 0) and (not nonneg or x >= 0)
    if not ok:
        need = "> 0" if positive else ">= 0" if nonneg else "a number"
        raise ValueError(f"{what}={x!r} must be a finite number {need}".replace("number a number", "number"))


@dataclasses.dataclass(frozen=True)
class StaleEntry:
    """An entry this process does not use (other Triton / template, or unsafe for its workload)."""

    key: str
    reason: str
    line: int


@dataclasses.dataclass(frozen=True)
class Fallback:
    """An entry of another Triton (``tier`` other-triton) or another template (other-template),
    its config read into this ``KernelConfig`` and checked against its workload; ``label`` is
    what :func:`software_label` says differs (``triton-3.6:template-8da88910``)."""

    entry: Entry
    tier: str
    label: str
    line: int


@dataclasses.dataclass(frozen=True)
class DBFile:
    """A parsed DB file: the fresh entries by key, the fallbacks (entries of another Triton or
    template that can still run), and the stale entries (cannot be used) with the reason."""

    path: Path
    header: Header
    entries: Mapping[WorkloadKey, Entry]
    stale: tuple[StaleEntry, ...]
    fallbacks: tuple[Fallback, ...] = ()

    def tier(self, tier: str) -> dict[WorkloadKey, Entry]:
        """Usable entries of one tier by key; of several for a key, the most recently measured."""
        if tier == FRESH:
            return dict(self.entries)
        out: dict[WorkloadKey, Fallback] = {}
        for f in self.fallbacks:
            if f.tier == tier and (f.entry.key not in out or f.entry.date > out[f.entry.key].entry.date):
                out[f.entry.key] = f
        return {k: f.entry for k, f in out.items()}

    def count(self, tier: str) -> int:
        """Entries of ``tier`` (all of them, not one per key)."""
        return len(self.entries) if tier == FRESH else sum(1 for f in self.fallbacks if f.tier == tier)


@dataclasses.dataclass
class WriteReport:
    """What a write did, by key string: new, replacing a worse entry, or kept (the old was better).

    ``not_fresh``: (key, label) of written entries measured with another Triton or template than
    this process's (a replayed table): get_kernel uses them only after every fresh entry."""

    path: Path
    added: list[str] = dataclasses.field(default_factory=list)
    replaced: list[str] = dataclasses.field(default_factory=list)
    kept: list[str] = dataclasses.field(default_factory=list)
    not_fresh: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        """One line for a person: where the DB is, what changed, and the tier of what was written."""
        line = (
            f"DB {self.path}: added {len(self.added)}, replaced {len(self.replaced)}, "
            f"kept better stored {len(self.kept)}"
        )
        return f"{line}; {self.tier_note()}" if self.not_fresh else line

    def tier_note(self) -> str:
        """What the written entries of another Triton or template are to this process ("" if none)."""
        if not self.not_fresh:
            return ""
        labels = sorted({label for _, label in self.not_fresh})
        n = len(self.not_fresh)
        return (
            f"{n} entr{'y' if n == 1 else 'ies'} written with {', '.join(labels)} (not this process's Triton/"
            "template, e.g. a replayed table's): get_kernel uses them only where no fresh entry fits (.why names it)"
        )




def file_name(gpu: str) -> str:
    """The DB file of a GPU: ``<gpu>.yaml`` (the one place that spells it)."""
    return f"{gpu}{FILE_SUFFIX}"


def gpu_of_file(path: str | os.PathLike[str]) -> str | None:
    """The GPU a DB file is named for (``h100.yaml`` -> ``h100``), None for another suffix."""
    path = Path(path)
    return path.stem if path.suffix == FILE_SUFFIX else None
