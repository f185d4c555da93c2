"""The YAML tuning database: one file per GPU, a shipped read-only layer and a user layer on top.

Why YAML: the DB is shipped in the wheel and reviewed in pull requests, so a person must be able
to read an entry, see where it came from and diff two versions.  Field meanings, the list of
inputs that make an entry stale and the known limitations are in ``tuning_db/README.md``.

File layout (``<dir>/<gpu>.yaml``)::

    schema_version: 1
    header:            # the GPU, and the software of the last write
      gpu: h100
      ...
    entries:
    - key: n197_d64_nomask_bh64_fp16-fp16
      config: {block_m: 64, block_n: 256, ...}     # KernelConfig.to_dict(), never str(config)
      latency_us: 11.8
      ...
      software: {triton: 3.5.1}                     # only where it differs from the header

Layers: ``TuningDB.default()`` reads the shipped DB (``qflash_gen.tuning_db`` resource package,
or ``<repo>/tuning_db`` in a checkout) and then the user DB (``$QFLASH_GEN_DB``, default
``<user cache dir>/qflash-gen/tuning_db``); a user entry overrides a shipped one with the same key.
Writes go to the user layer only, atomically (temp file + ``os.replace``) under a ``filelock``.

Entries are kept per *identity* ``(key, triton major.minor, template hash)``, so one file can hold
results for several Triton versions: entries measured under another Triton or template are stale
here (skipped, one log line per file), but still valid for that software and never lost on write.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import importlib.resources
import logging
import math
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import filelock
import torch
import triton
import yaml

from qflash_gen import __version__, codegen
from qflash_gen.config import KernelConfig, check_workload
from qflash_gen.gpu import current_gpu, is_valid_gpu_name
from qflash_gen.keys import WorkloadKey

SCHEMA_VERSION = 1
ENV_DB_DIR = "QFLASH_GEN_DB"
LOCK_TIMEOUT_S = 120.0

logger = logging.getLogger("qflash_gen.db")

# libyaml when present (same nodes and marks, ~10x faster: a write re-reads the whole file).
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

SOFTWARE_FIELDS: tuple[str, ...] = ("triton", "torch", "cuda", "template_hash", "search_space_hash", "qflash_gen")
"""Software fingerprint of a measurement.  Only ``triton`` (major.minor) and ``template_hash``
decide staleness; the rest is recorded so a reader can judge an entry."""

_HEADER_HW_FIELDS = ("gpu", "compute_capability", "device_name", "total_memory_gib", "driver")
_ENTRY_REQUIRED = ("key", "config", "latency_us", "latency_spread_us", "sqnr_db", "trials", "date", "protocol")
_ENTRY_OPTIONAL = ("measured_on_device", "energy_uj", "baselines", "software")


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
class DBFile:
    """A parsed DB file: the usable entries by key, and what was skipped and why."""

    path: Path
    header: Header
    entries: Mapping[WorkloadKey, Entry]
    stale: tuple[StaleEntry, ...]


@dataclasses.dataclass
class WriteReport:
    """What a write did, by key string: new, replacing a worse entry, or kept (the old was better)."""

    path: Path
    added: list[str] = dataclasses.field(default_factory=list)
    replaced: list[str] = dataclasses.field(default_factory=list)
    kept: list[str] = dataclasses.field(default_factory=list)


# -- parsing with line numbers -------------------------------------------------------------------
def _compose(path: Path, text: str) -> tuple[yaml.Node | None, Any]:
    loader = None
    try:
        loader = _Loader(text)  # the pure-Python reader already checks characters here
        node = loader.get_single_node()
        _check_duplicate_keys(path, node)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise DBError(f"YAML syntax error: {problem}", path, line) from None
    except yaml.reader.ReaderError as exc:  # bad characters: a position, not a mark
        line = text.count("\n", 0, exc.position) + 1
        raise DBError(f"not YAML text: {exc.reason} (character {exc.character!r})", path, line) from None
    except yaml.YAMLError as exc:
        raise DBError(f"YAML error: {exc}", path) from None
    finally:
        if loader is not None:
            loader.dispose()
    return node, data


def _check_duplicate_keys(path: Path, node: yaml.Node | None) -> None:
    # PyYAML keeps the last of two equal keys silently; in a hand-edited DB that hides a typo.
    stack = [node] if node is not None else []
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in seen:
                        raise DBError(f"duplicate key {k.value!r}", path, k.start_mark.line + 1)
                    seen.add(k.value)
                stack.append(v)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)


def _line(root: yaml.Node | None, *where: str | int) -> int | None:
    """1-based line of the node at ``where`` (mapping keys / sequence indices), or of its nearest parent."""
    node = root
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in where:
        nxt = None
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == part:
                    nxt, line = v, k.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            nxt = node.value[part]
            line = nxt.start_mark.line + 1
        if nxt is None:
            return line
        node = nxt
    return line


def _as_text(value: Any) -> Any:
    # YAML turns an unquoted 2025-01-31 into a date; the DB keeps dates as ISO strings.
    if isinstance(value, (_dt.date, _dt.datetime)):
        return value.isoformat()
    return value


def _opt_str(value: Any, what: str, path: Path, line: int | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise DBError(f"{what} must be a string (quote version numbers: '12.4'), got {value!r}", path, line)


def _parse_header(path: Path, root: yaml.Node, raw: Any) -> Header:
    if not isinstance(raw, dict):
        raise DBError("'header' must be a mapping", path, _line(root, "header"))
    fields = [f.name for f in dataclasses.fields(Header)]
    unknown = sorted(str(k) for k in set(raw) - set(fields))
    if unknown:
        raise DBError(f"unknown header field {unknown[0]!r}; known: {fields}", path, _line(root, "header", unknown[0]))
    if "gpu" not in raw:
        raise DBError("header has no 'gpu'", path, _line(root, "header"))
    values: dict[str, Any] = {}
    for name in fields:
        value = _as_text(raw.get(name))
        line = _line(root, "header", name)
        if name == "total_memory_gib":
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise DBError(f"header.total_memory_gib must be a number, got {value!r}", path, line)
        else:
            value = _opt_str(value, f"header.{name}", path, line)
        values[name] = value
    try:
        header = Header(**values)
    except ValueError as exc:
        raise DBError(str(exc), path, _line(root, "header", "gpu")) from None
    if path.suffix == ".yaml" and is_valid_gpu_name(path.stem) and header.gpu != path.stem:
        raise DBError(
            f"header.gpu={header.gpu!r} but the file is named {path.name}: a foreign DB (rename it {header.gpu}.yaml)",
            path,
            _line(root, "header", "gpu"),
        )
    return header


def _parse_entry(
    path: Path, root: yaml.Node, i: int, raw: Any, header_sw: Mapping[str, str | None]
) -> tuple[tuple[str, str, str | None], Entry | None, StaleEntry | None, dict[str, Any]]:
    """-> (identity, entry or None, stale record or None, raw mapping with resolved software)."""
    line0 = _line(root, "entries", i)

    def err(msg: str, *where: str) -> DBError:
        return DBError(f"entries[{i}]: {msg}", path, _line(root, "entries", i, *where) if where else line0)

    if not isinstance(raw, dict):
        raise err("must be a mapping with key, config, latency_us, ...")
    unknown = sorted(str(k) for k in set(raw) - set(_ENTRY_REQUIRED) - set(_ENTRY_OPTIONAL))
    if unknown:
        raise err(f"unknown field {unknown[0]!r}; known: {list(_ENTRY_REQUIRED + _ENTRY_OPTIONAL)}", unknown[0])
    for name in _ENTRY_REQUIRED:
        if name not in raw:
            raise err(f"missing field {name!r}")
    raw = {k: _as_text(v) for k, v in raw.items()}
    try:
        key = WorkloadKey.from_str(raw["key"])
    except ValueError as exc:
        raise err(str(exc), "key") from None
    sw_over = raw.get("software") or {}
    if not isinstance(sw_over, dict) or set(sw_over) - set(SOFTWARE_FIELDS):
        raise err(f"'software' must be a mapping with fields from {list(SOFTWARE_FIELDS)}", "software")
    for name, value in sw_over.items():
        _opt_str(value, f"entries[{i}].software.{name}", path, _line(root, "entries", i, "software", name))
    software = {**header_sw, **sw_over}
    raw["software"] = software
    ident = (key.to_str(), triton_minor(software.get("triton")), software.get("template_hash"))
    if not isinstance(raw["config"], dict):
        raise err("'config' must be a mapping of KernelConfig fields", "config")

    reason = stale_reason(software)
    if reason is not None:
        # Not validated against this KernelConfig: another template may have other fields.
        return ident, None, StaleEntry(key.to_str(), reason, line0 or 0), raw
    try:
        config = KernelConfig.from_dict(raw["config"])
    except (ValueError, TypeError) as exc:
        m = re.search(r"KernelConfig\.(\w+)=|field\(s\) \['(\w+)'", str(exc))
        field = (m[1] or m[2]) if m else None
        raise err(f"config: {exc}", "config", *((field,) if field in raw["config"] else ())) from None
    try:
        entry = Entry(
            key=key,
            config=config,
            latency_us=raw["latency_us"],
            latency_spread_us=raw["latency_spread_us"],
            sqnr_db=raw["sqnr_db"],
            trials=raw["trials"],
            protocol=raw["protocol"],
            date=raw["date"],
            measured_on_device=raw.get("measured_on_device"),
            energy_uj=raw.get("energy_uj"),
            baselines=raw.get("baselines") or {},
            software=software,
        )
    except ValueError as exc:
        field = str(exc).split("=", 1)[0].split()[0].removeprefix("Entry.").split("[")[0]
        raise err(str(exc), *((field,) if field in raw else ())) from None
    try:
        check_workload(config, key.n, key.d)
    except ValueError as exc:
        return ident, None, StaleEntry(key.to_str(), f"unsafe for its workload: {exc}", line0 or 0), raw
    return ident, entry, None, raw


@dataclasses.dataclass
class _Parsed:
    header: Header
    entries: dict[WorkloadKey, Entry]
    stale: list[StaleEntry]
    raw: dict[tuple[str, str, str | None], dict[str, Any]]  # every stored entry by identity, in order


def _parse(path: Path, text: str) -> _Parsed:
    root, data = _compose(path, text)
    if data is None:
        raise DBError("empty file: expected schema_version, header and entries", path, 1)
    if not isinstance(data, dict):
        raise DBError(f"top level must be a mapping, got {type(data).__name__}: not a qflash-gen tuning DB", path, 1)
    unknown = sorted(str(k) for k in set(data) - {"schema_version", "header", "entries"})
    if unknown:
        raise DBError(
            f"unknown top-level field {unknown[0]!r}: not a qflash-gen tuning DB?", path, _line(root, unknown[0])
        )
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise DBError(f"schema_version must be an int, got {version!r}", path, _line(root, "schema_version"))
    if version > SCHEMA_VERSION:
        raise DBError(
            f"schema_version {version} was written by a newer qflash-gen; this one reads <= {SCHEMA_VERSION}",
            path,
            _line(root, "schema_version"),
        )
    if version < 1:
        raise DBError(f"schema_version {version} is not valid (>= 1)", path, _line(root, "schema_version"))
    header = _parse_header(path, root, data.get("header"))
    raw_entries = data.get("entries") or []
    if not isinstance(raw_entries, list):
        raise DBError("'entries' must be a list", path, _line(root, "entries"))
    parsed = _Parsed(header, {}, [], {})
    header_sw = header.software()
    for i, raw in enumerate(raw_entries):
        ident, entry, stale, resolved = _parse_entry(path, root, i, raw, header_sw)
        if ident in parsed.raw:
            raise DBError(
                f"entries[{i}]: a second entry for {ident[0]} (triton {ident[1]}, same template); keep one",
                path,
                _line(root, "entries", i),
            )
        parsed.raw[ident] = resolved
        if entry is not None:
            parsed.entries[entry.key] = entry
        else:
            parsed.stale.append(stale)
    return parsed


_file_cache: dict[Path, tuple[tuple[int, int, int], DBFile]] = {}
_cache_lock = threading.Lock()


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def load_file(path: str | os.PathLike) -> DBFile:
    """Parse and validate one DB file (cached until the file changes); DBError names file:line.

    Stale and unsafe entries are left out of ``entries`` and reported in ``stale``, with one
    WARNING line on logger ``qflash_gen.db`` per file version read."""
    path = Path(path)
    sig = _signature(path)
    if sig is None:
        raise DBError("no such file", path)
    with _cache_lock:
        hit = _file_cache.get(path)
        if hit is not None and hit[0] == sig:
            return hit[1]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DBError(f"not UTF-8 text ({exc.reason})", path) from None
    parsed = _parse(path, text)
    result = DBFile(path, parsed.header, dict(parsed.entries), tuple(parsed.stale))
    if result.stale:
        shown = ", ".join(f"{s.key} (line {s.line}: {s.reason})" for s in result.stale[:3])
        more = f" and {len(result.stale) - 3} more" if len(result.stale) > 3 else ""
        logger.warning(
            "%s: skipped %d stale or unsafe entr%s, not used: %s%s",
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
    doc = {"schema_version": SCHEMA_VERSION, "header": header.to_dict(), "entries": entries}
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)
    return (
        "# qflash-gen tuning DB (fields: tuning_db/README.md). Written by qflash_gen.db; merge, don't hand-sort.\n"
        + body
    )


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    if path.suffix == ".yaml" and path.stem != header.gpu:
        raise ValueError(f"path={str(path)!r}: a DB for gpu {header.gpu!r} must be named {header.gpu}.yaml")
    lock = filelock.FileLock(str(path) + ".lock", timeout=timeout)
    report = WriteReport(path)
    try:
        with lock:
            stored: dict[tuple[str, str, str | None], dict[str, Any]] = {}
            if path.exists():
                old = _parse(path, path.read_text(encoding="utf-8"))
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
            if prune_stale:
                stored = {i: r for i, r in stored.items() if stale_reason(r["software"]) is None}
            try:
                text = _dump(header, (stored[i] for i in sorted(stored, key=_sort_key)))
            except yaml.representer.RepresenterError as exc:
                raise ValueError(
                    f"an entry holds a value YAML cannot store (protocol/baselines must be plain): {exc}"
                ) from None
            _atomic_write(path, text)
    except filelock.Timeout:
        raise DBError(
            f"could not take the lock {lock.lock_file} within {timeout} s (another writer stuck?)", path
        ) from None
    with _cache_lock:
        _generation += 1
    return report


# -- locations and the layered DB ----------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def shipped_db_dir() -> Path:
    """The read-only DB shipped with the package: resource package ``qflash_gen.tuning_db``,
    else ``<repo>/tuning_db`` when running from a checkout that does not map it."""
    try:
        res = importlib.resources.files("qflash_gen.tuning_db")
        candidate = Path(str(res))
        if candidate.is_dir():
            return candidate
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "tuning_db"


def user_db_dir() -> Path:
    """``$QFLASH_GEN_DB`` (a directory), else ``<user cache dir>/qflash-gen/tuning_db``."""
    env = os.environ.get(ENV_DB_DIR)
    if env:
        return Path(env).expanduser()
    return _default_user_db_dir()


@functools.lru_cache(maxsize=1)
def _default_user_db_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("qflash-gen")) / "tuning_db"


class TuningDB:
    """Layered DB: ``dirs`` from lowest to highest priority; writes go to ``write_dir`` (default: the last).

    ``TuningDB.default()`` is (shipped, user).  A key found in several layers comes from the
    highest one: a user's own measurement beats the shipped one, even if slower on paper."""

    def __init__(self, dirs: Sequence[str | os.PathLike], *, write_dir: str | os.PathLike | None = None) -> None:
        if isinstance(dirs, (str, os.PathLike)) or not dirs:
            raise ValueError("dirs must be a non-empty sequence of directories (lowest priority first)")
        self.dirs: tuple[Path, ...] = tuple(Path(d) for d in dirs)
        self.write_dir = Path(write_dir) if write_dir is not None else self.dirs[-1]

    @classmethod
    def default(cls) -> TuningDB:
        return cls([shipped_db_dir(), user_db_dir()])

    def __repr__(self) -> str:
        return f"TuningDB(dirs={[str(d) for d in self.dirs]}, write_dir={str(self.write_dir)!r})"

    def path(self, gpu: str) -> Path:
        """Where a write for ``gpu`` goes."""
        return self.write_dir / f"{gpu}.yaml"

    def files(self, gpu: str) -> list[Path]:
        """Existing DB files for ``gpu``, lowest priority first."""
        return [p for p in (d / f"{gpu}.yaml" for d in self.dirs) if p.is_file()]

    def gpus(self) -> list[str]:
        """GPUs with a DB file in any layer."""
        names = {p.stem for d in self.dirs if d.is_dir() for p in d.glob("*.yaml") if is_valid_gpu_name(p.stem)}
        return sorted(names)

    def located(self, gpu: str) -> dict[WorkloadKey, tuple[Entry, Path]]:
        """Usable entries for ``gpu`` with the file each came from (layers overlaid)."""
        out: dict[WorkloadKey, tuple[Entry, Path]] = {}
        for path in self.files(gpu):
            f = load_file(path)
            for key, entry in f.entries.items():
                out[key] = (entry, path)
        return out

    def entries(self, gpu: str) -> dict[WorkloadKey, Entry]:
        """Usable entries for ``gpu`` (layers overlaid; stale ones skipped and logged)."""
        return {k: e for k, (e, _) in self.located(gpu).items()}

    def lookup(self, gpu: str, key: WorkloadKey) -> Entry | None:
        return self.entries(gpu).get(key)

    def write(
        self,
        gpu: str,
        entries: Iterable[Entry],
        *,
        force: bool = False,
        search_space_hash: str | None = None,
        header: Header | None = None,
    ) -> WriteReport:
        """Merge ``entries`` into ``<write_dir>/<gpu>.yaml`` (see :func:`write_entries`)."""
        if not is_valid_gpu_name(gpu):
            raise ValueError(f"gpu={gpu!r} must be a short GPU name ([a-z0-9_], see qflash_gen.gpu)")
        return write_entries(
            self.path(gpu), entries, gpu=gpu, header=header, force=force, search_space_hash=search_space_hash
        )
