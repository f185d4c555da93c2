"""Recorded measurement tables (CSV): what an exhaustive sweep writes and ``--simulate`` replays.

Format (one row per (GPU, shape, config) measured)::

    # qflash-gen measurement table
    # protocol: {"timing": "do_bench", "warmup_ms": 10, ...}
    # environment: {"device": "NVIDIA H100 80GB HBM3", "torch": "...", "triton": "...", ...}
    gpu,workload,batch,B,H,N,D,masked,config,latency_us,spread_us,sqnr_db,correct,error
    h100,vit_b,8,8,12,197,64,false,"{""acc_bits"":32,...}",41.2,0.6,36.9,true,

A table recorded with energy (``tools/energy_sweep.py``) has four more columns after ``error``:
``energy_uj,energy_spread_uj,above_idle_uj,idle_w`` (µJ per call, total and above idle, and
the idle power in W; see :mod:`qflash_gen.energy`); tables without them replay with no energy.

``config`` is the JSON of ``KernelConfig.to_dict()`` with sorted keys; ``latency_us`` /
``spread_us`` / ``sqnr_db`` are empty where nothing was measured (a failed candidate, whose
``error`` says why).  The ``#`` lines record how the numbers were taken, so a table explains
itself; readers skip them (``pandas.read_csv(comment="#")`` works).  A config absent from the
table was not measured (outside the grid, or infeasible) and replays as a failed trial; a single
pass (``block_n >= N``) runs no rescale, so a sweep records one of its rescale twins and
:meth:`Table.lookup` answers for all of them.

Writing is incremental (flush + fsync per row) so a crash loses at most the row being written;
reopening a table for writing resumes it (a torn last line is dropped) after checking the
protocol matches.  Reading one whose last row is torn is an error naming the file and line (a
replay of a silently shortened table would look complete).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from qflash_gen.config import KernelConfig, single_pass
from qflash_gen.tune.measure.base import Measurement, ShapeSpec

COLUMNS: tuple[str, ...] = (
    "gpu",
    "workload",
    "batch",
    "B",
    "H",
    "N",
    "D",
    "masked",
    "config",
    "latency_us",
    "spread_us",
    "sqnr_db",
    "correct",
    "error",
)
ENERGY_COLUMNS: tuple[str, ...] = ("energy_uj", "energy_spread_uj", "above_idle_uj", "idle_w")
MAGIC = "# qflash-gen measurement table"
ERROR_MAX = 300  # characters of an error message kept in the table


def config_json(config: KernelConfig) -> str:
    """The ``config`` column: sorted-key compact JSON of ``KernelConfig.to_dict()``."""
    return json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.3f}"


def _num(text: str) -> float | None:
    text = text.strip()
    return None if text == "" else float(text)


def _bool(text: str, column: str, where: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1", "yes"):
        return True
    if t in ("false", "0", "no"):
        return False
    raise ValueError(f"{where}: column {column!r} must be true/false, got {text!r}")


@dataclasses.dataclass(frozen=True)
class Row:
    gpu: str
    shape: ShapeSpec
    config: KernelConfig
    measurement: Measurement

    def key(self) -> tuple:
        return (self.gpu, *self.shape.match_key(), self.config.hash)


class Table:
    """A recorded table in memory, indexed for replay."""

    def __init__(
        self,
        rows: list[Row],
        meta: dict[str, Any],
        path: Path | None = None,
        sha256: str = "",
        has_energy: bool = False,
    ) -> None:
        self.rows = rows
        self.meta = meta
        self.path = path
        self.sha256 = sha256
        self.has_energy = has_energy  # recorded with the energy columns
        self._index: dict[tuple, Row] = {}
        self._single: dict[tuple, Row] = {}  # single-pass rows by their config without rescale
        for row in rows:
            self._index[row.key()] = row  # a later row (re-measurement) wins
            if single_pass(row.config, row.shape.n):
                self._single[(row.gpu, *row.shape.match_key(), _without_rescale(row.config).hash)] = row

    @property
    def protocol(self) -> dict[str, Any]:
        return dict(self.meta.get("protocol") or {})

    @property
    def environment(self) -> dict[str, Any]:
        return dict(self.meta.get("environment") or {})

    def gpus(self) -> list[str]:
        return sorted({r.gpu for r in self.rows})

    def shapes(self, gpu: str) -> list[ShapeSpec]:
        seen: dict[tuple, ShapeSpec] = {}
        for r in self.rows:
            if r.gpu == gpu:
                seen.setdefault(r.shape.match_key(), r.shape)
        return list(seen.values())

    def configs(self, gpu: str, shape: ShapeSpec | None = None) -> list[KernelConfig]:
        seen: dict[str, KernelConfig] = {}
        for r in self.rows:
            if r.gpu == gpu and (shape is None or r.shape.match_key() == shape.match_key()):
                seen.setdefault(r.config.hash, r.config)
        return list(seen.values())

    def lookup(self, gpu: str, shape: ShapeSpec, config: KernelConfig) -> Measurement | None:
        """The recorded measurement of ``config`` on ``shape``; for a single pass (``block_n >= N``,
        no rescale runs) the row of its rescale twin, which is the same kernel."""
        row = self._index.get((gpu, *shape.match_key(), config.hash))
        if row is None and single_pass(config, shape.n):
            row = self._single.get((gpu, *shape.match_key(), _without_rescale(config).hash))
        return None if row is None else row.measurement

    def rows_for(self, gpu: str, shape: ShapeSpec) -> list[Row]:
        key = shape.match_key()
        return [r for k, r in self._index.items() if k[0] == gpu and r.shape.match_key() == key]

    def best(self, gpu: str, shape: ShapeSpec, sqnr_floor: float, metric: str = "latency_us") -> Row | None:
        """The correct row at or above the SQNR floor with the least ``metric`` (``latency_us``, or
        ``energy_uj`` where recorded): the exhaustive optimum."""
        ok = [
            r
            for r in self.rows_for(gpu, shape)
            if r.measurement.feasible(sqnr_floor) and getattr(r.measurement, metric) is not None
        ]
        return min(ok, key=lambda r: getattr(r.measurement, metric)) if ok else None

    def __len__(self) -> int:
        return len(self.rows)


def _without_rescale(config: KernelConfig) -> KernelConfig:
    return config.replace(rescale="split", rescale_bits=0)


def _split_meta(lines: Iterable[str], path: Path) -> tuple[dict[str, Any], list[str]]:
    meta: dict[str, Any] = {}
    body: list[str] = []
    for lineno, line in enumerate(lines, start=1):
        if line.startswith("#"):
            text = line[1:].strip()
            name, sep, value = text.partition(":")
            if sep and name.strip() in ("protocol", "environment"):
                try:
                    meta[name.strip()] = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: malformed {name.strip()} JSON: {exc}") from None
            continue
        body.append(line)
    return meta, body


def read_table(path: str | os.PathLike[str]) -> Table:
    """Load a recorded table; ValueError naming the file (and line) for a path that is not a
    file, a file that is not UTF-8 text, a last row cut short (no line end: a writer killed
    mid-row, a copy cut off) and a malformed row."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--simulate {path}: is a directory; give the table file (CSV) recorded by tools/sweep.py")
    if not path.is_file():
        raise ValueError(f"--simulate {path}: no such file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"--simulate {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not a measurement table (CSV text): byte {raw[exc.start]:#04x} at offset {exc.start} "
            "is not UTF-8"
        ) from None
    if "\0" in text:
        raise ValueError(f"{path}: not a measurement table (CSV text): it holds NUL bytes (offset {text.index(chr(0))})")
    if text and not text.endswith("\n"):
        line = text.count("\n") + 1
        raise ValueError(
            f"{path}:{line}: the last row is cut short (no line end after byte {len(raw)}: a sweep killed "
            f"mid-row, or a copy cut off); rerun the sweep with --record {path} to drop it and resume, or "
            "delete that line"
        )
    meta, body = _split_meta(text.splitlines(keepends=True), path)
    reader = csv.DictReader(io.StringIO("".join(body)))
    try:
        fieldnames = reader.fieldnames
    except csv.Error as exc:
        raise ValueError(f"{path}: not a measurement table: {exc}") from None
    missing = [c for c in COLUMNS if c not in (fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: not a qflash-gen measurement table; missing columns {missing}")
    has_energy = "energy_uj" in (fieldnames or [])
    rows: list[Row] = []
    records = iter(reader)
    for i in itertools.count(start=2):
        where = f"{path}: data row {i - 1}"
        try:
            rec = next(records)
        except StopIteration:
            break
        except csv.Error as exc:
            raise ValueError(f"{where}: {exc}") from None
        if None in rec or any(rec.get(c) is None for c in fieldnames):
            got = sum(v is not None for k, v in rec.items() if k is not None) + len(rec.get(None) or ())
            raise ValueError(f"{where}: {got} fields where the header has {len(fieldnames)} columns")
        try:
            config = KernelConfig.from_dict(json.loads(rec["config"]))
            shape = ShapeSpec(
                workload=rec["workload"],
                batch=int(rec["batch"]),
                b=int(rec["B"]),
                h=int(rec["H"]),
                n=int(rec["N"]),
                d=int(rec["D"]),
                masked=_bool(rec["masked"], "masked", where),
            )
            m = Measurement(
                latency_us=_num(rec["latency_us"]),
                spread_us=_num(rec["spread_us"]),
                sqnr_db=_num(rec["sqnr_db"]),
                correct=_bool(rec["correct"], "correct", where),
                error=rec["error"] or None,
                **({c: _num(rec.get(c) or "") for c in ENERGY_COLUMNS} if has_energy else {}),
            )
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        rows.append(Row(gpu=rec["gpu"].strip(), shape=shape, config=config, measurement=m))
    return Table(rows, meta, path=path, sha256=hashlib.sha256(raw).hexdigest(), has_energy=has_energy)


class TableWriter:
    """Append rows to a table file, creating it (with its ``#`` header) or resuming it.

    On resume the recorded protocol must equal ``protocol`` (timings taken two ways do not
    belong in one table); :meth:`done` tells which (gpu, shape, config) rows exist already.
    ``energy=True`` writes the :data:`ENERGY_COLUMNS` too (default: when the protocol measures
    energy, ``protocol["energy"]``)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        protocol: Mapping[str, Any],
        environment: Mapping[str, Any],
        *,
        energy: bool | None = None,
    ) -> None:
        self.path = Path(path)
        self.protocol = dict(protocol)
        energy = bool(self.protocol.get("energy")) if energy is None else energy
        self.energy = energy
        self._done: set[tuple] = set()
        if self.path.exists() and self.path.stat().st_size > 0:
            self._repair_tail()
            existing = read_table(self.path)
            if existing.protocol and existing.protocol != self.protocol:
                raise ValueError(
                    f"--record {self.path}: recorded with another protocol {existing.protocol}, "
                    f"this run uses {self.protocol}; record into another file"
                )
            if existing.has_energy != energy:
                raise ValueError(
                    f"--record {self.path}: recorded {'with' if existing.has_energy else 'without'} energy columns, "
                    f"this run {'measures' if energy else 'does not measure'} energy; record into another file"
                )
            self._done = {r.key() for r in existing.rows}
            self._fh = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115
            self._fh.write(MAGIC + "\n")
            self._fh.write("# protocol: " + json.dumps(self.protocol, sort_keys=True) + "\n")
            self._fh.write("# environment: " + json.dumps(dict(environment), sort_keys=True) + "\n")
            csv.writer(self._fh).writerow(COLUMNS + (ENERGY_COLUMNS if energy else ()))
            self._sync()
        self._writer = csv.writer(self._fh)

    def _repair_tail(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)

    def _sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def done(self, gpu: str, shape: ShapeSpec, config: KernelConfig) -> bool:
        return (gpu, *shape.match_key(), config.hash) in self._done

    @property
    def n_done(self) -> int:
        return len(self._done)

    def write(self, gpu: str, shape: ShapeSpec, config: KernelConfig, m: Measurement) -> None:
        error = (m.error or "").replace("\r", " ").replace("\n", " ")[:ERROR_MAX]
        self._writer.writerow(
            [
                gpu,
                shape.workload,
                shape.batch,
                shape.b,
                shape.h,
                shape.n,
                shape.d,
                "true" if shape.masked else "false",
                config_json(config),
                _fmt(m.latency_us),
                _fmt(m.spread_us),
                _fmt(m.sqnr_db),
                "true" if m.correct else "false",
                error,
                *((_fmt(getattr(m, c)) for c in ENERGY_COLUMNS) if self.energy else ()),
            ]
        )
        self._sync()
        self._done.add((gpu, *shape.match_key(), config.hash))

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
