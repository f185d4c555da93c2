"""Reading a DB file: YAML with line numbers, so every error names ``file:line``.

PyYAML composes the node tree first (marks for every key and value), then the plain data; the
checks below walk both, so a wrong field is reported where it stands.  Duplicate keys, which
PyYAML would silently collapse, are errors.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from qflash_gen.config import KernelConfig, check_workload
from qflash_gen.db.schema import (
    ENTRY_OPTIONAL,
    ENTRY_REQUIRED,
    FRESH,
    SCHEMA_VERSION,
    SOFTWARE_FIELDS,
    DBError,
    Entry,
    Fallback,
    Header,
    StaleEntry,
    file_name,
    gpu_of_file,
    software_label,
    stale_reason,
    tier_of,
    triton_minor,
)
from qflash_gen.gpu import is_valid_gpu_name
from qflash_gen.keys import WorkloadKey

# libyaml when present (same nodes and marks, ~10x faster: a write re-reads the whole file).
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

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
        elif name == "entry_count":
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise DBError(f"header.entry_count must be an int >= 0, got {value!r}", path, line)
        else:
            value = _opt_str(value, f"header.{name}", path, line)
        values[name] = value
    try:
        header = Header(**values)
    except ValueError as exc:
        raise DBError(str(exc), path, _line(root, "header", "gpu")) from None
    if gpu_of_file(path) is not None and is_valid_gpu_name(path.stem) and header.gpu != path.stem:
        raise DBError(
            f"header.gpu={header.gpu!r} but the file is named {path.name}: a foreign DB (rename it {file_name(header.gpu)})",
            path,
            _line(root, "header", "gpu"),
        )
    return header


def _parse_entry(
    path: Path, root: yaml.Node, i: int, raw: Any, header_sw: Mapping[str, str | None]
) -> tuple[tuple[str, str, str | None], Entry | Fallback | None, StaleEntry | None, dict[str, Any]]:
    """-> (identity, fresh Entry or Fallback or None, stale record or None, raw mapping with
    resolved software).  A fresh entry must be valid (else DBError); an entry of another Triton
    or template is used if its config maps onto this KernelConfig and can run its workload,
    else it is stale (never an error: another template may have had other fields)."""
    line0 = _line(root, "entries", i)

    def err(msg: str, *where: str) -> DBError:
        return DBError(f"entries[{i}]: {msg}", path, _line(root, "entries", i, *where) if where else line0)

    if not isinstance(raw, dict):
        raise err("must be a mapping with key, config, latency_us, ...")
    unknown = sorted(str(k) for k in set(raw) - set(ENTRY_REQUIRED) - set(ENTRY_OPTIONAL))
    if unknown:
        raise err(f"unknown field {unknown[0]!r}; known: {list(ENTRY_REQUIRED + ENTRY_OPTIONAL)}", unknown[0])
    for name in ENTRY_REQUIRED:
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

    tier = tier_of(software)
    line = line0 or 0

    def stale(why: str) -> tuple:
        return ident, None, StaleEntry(key.to_str(), why, line), raw

    try:
        config = KernelConfig.from_dict(raw["config"])
    except (ValueError, TypeError) as exc:
        if tier != FRESH:
            return stale(f"{stale_reason(software)}, and its config does not map onto this KernelConfig: {exc}")
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
        if tier != FRESH:
            return stale(f"{stale_reason(software)}, and {exc}")
        field = str(exc).split("=", 1)[0].split()[0].removeprefix("Entry.").split("[")[0]
        raise err(str(exc), *((field,) if field in raw else ())) from None
    try:
        check_workload(config, key.n, key.d)
    except ValueError as exc:
        prefix = "" if tier == FRESH else f"{stale_reason(software)}, and "
        return stale(f"{prefix}unsafe for its workload: {exc}")
    if tier == FRESH:
        return ident, entry, None, raw
    return ident, Fallback(entry, tier, software_label(software), line), None, raw


@dataclasses.dataclass
class Parsed:
    header: Header
    entries: dict[WorkloadKey, Entry]
    stale: list[StaleEntry]
    raw: dict[tuple[str, str, str | None], dict[str, Any]]  # every stored entry by identity, in order
    fallbacks: list[Fallback] = dataclasses.field(default_factory=list)


def _check_whole(path: Path, root: yaml.Node, version: int, header: Header, n_entries: int) -> None:
    """A version-2 file says how many entries it holds: a file cut short (a full disk, a copy
    interrupted) is an error, not a smaller DB."""
    if version < 2 and header.entry_count is None:
        return  # written before the count existed
    if header.entry_count is None:
        raise DBError(
            f"header.entry_count is missing (schema_version {version} files carry it): incomplete or hand-made file",
            path,
            _line(root, "header"),
        )
    if header.entry_count != n_entries:
        raise DBError(
            f"header.entry_count says {header.entry_count} entries but the file holds {n_entries}: the file is "
            "incomplete (cut short?) or was edited by hand (then set entry_count to the number of entries)",
            path,
            _line(root, "header", "entry_count"),
        )


def parse(path: Path, text: str) -> Parsed:
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
    _check_whole(path, root, version, header, len(raw_entries))
    parsed = Parsed(header, {}, [], {})
    header_sw = header.software()
    for i, raw in enumerate(raw_entries):
        ident, usable, stale, resolved = _parse_entry(path, root, i, raw, header_sw)
        if ident in parsed.raw:
            raise DBError(
                f"entries[{i}]: a second entry for {ident[0]} (triton {ident[1]}, same template); keep one",
                path,
                _line(root, "entries", i),
            )
        parsed.raw[ident] = resolved
        if isinstance(usable, Entry):
            parsed.entries[usable.key] = usable
        elif isinstance(usable, Fallback):
            parsed.fallbacks.append(usable)
        else:
            parsed.stale.append(stale)
    return parsed
