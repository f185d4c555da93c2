"""Writing a run's winners: one DB entry per study (with its evidence), and Pareto fronts.

Each entry's protocol carries the provenance (measured, or simulated from which table and its
sha256), the tuner settings and the workload.  The write goes through the study's turn
(:mod:`.db_turn`: the last slot to finish writes, once) and ``db.write_entries`` (atomic, locked;
a worse result never replaces a better one).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from qflash_gen import db
from qflash_gen.codegen import atomic_write
from qflash_gen.config import KernelConfig
from qflash_gen.reference import SQNR_FLOOR_DB
from qflash_gen.tune import db_turn, objective
from qflash_gen.tune.measure.base import ShapeSpec
from qflash_gen.tune.plan import db_file
from qflash_gen.tune.setup import tuner_settings


def entry_software(environment: Mapping[str, Any], space_hash: str) -> dict[str, str | None]:
    """Entry software fingerprint: the measuring machine's (a recorded table's environment, or this
    process when it measured live)."""
    if not environment or environment.get("triton") is None:
        return db.running_software(space_hash)
    return {
        "triton": environment.get("triton"),
        "torch": environment.get("torch"),
        "cuda": environment.get("cuda"),
        "template_hash": environment.get("template_sha256"),
        "search_space_hash": space_hash,
        "qflash_gen": environment.get("qflash_gen"),
    }


def plain(value: Any) -> Any:
    """YAML-safe copy (str keys, plain scalars, lists)."""
    """YAML-safe copy (str keys, plain scalars, lists)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@dataclasses.dataclass(frozen=True)
class BestResult:
    """What goes into one DB entry (filled by the CLI from a study's pick)."""

    shape: ShapeSpec
    dtype: str
    config: KernelConfig
    latency_us: float
    spread_us: float
    sqnr_db: float
    trials: int
    protocol: Mapping[str, Any]
    environment: Mapping[str, Any]
    space_hash: str
    measured_on_device: str | None = None  # default: the environment's device name
    energy_uj: float | None = None  # µJ per call where the measurer recorded energy (Entry.energy_uj)


def write_best(target: str | os.PathLike[str] | None, gpu_name: str, results: Sequence[BestResult]) -> db.WriteReport:
    """Merge the picks into ``<db>/<gpu>.yaml`` (atomic, locked; a worse result never replaces a
    better one).  Each entry's protocol carries the provenance (measured or simulated from which
    table), the tuner settings and the workload."""
    path = db_file(target, gpu_name)
    entries = []
    for r in results:
        device = r.measured_on_device or (r.environment.get("device") if r.environment else None)
        entries.append(
            db.Entry(
                key=r.shape.key(r.dtype),
                config=r.config,
                latency_us=float(r.latency_us),
                latency_spread_us=float(r.spread_us),
                sqnr_db=float(r.sqnr_db),
                trials=int(r.trials),
                protocol=plain(r.protocol),
                measured_on_device=str(device) if device else None,
                energy_uj=None if r.energy_uj is None else float(r.energy_uj),
                software=entry_software(r.environment, r.space_hash),
            )
        )
    return db.write_entries(path, entries, gpu=gpu_name)


def write_front(
    target: str | os.PathLike[str] | None, gpu_name: str, shape: ShapeSpec, dtype: str, front: list[dict[str, Any]]
) -> Path:
    """Store a Pareto front next to the DB: ``<db dir>/fronts/<gpu>/<key>.yaml`` (atomic)."""
    key = shape.key(dtype).to_str()
    path = db_file(target, gpu_name).parent / "fronts" / gpu_name / f"{key}.yaml"
    text = yaml.safe_dump(
        {"gpu": gpu_name, "key": key, "workload": shape.workload, "batch": shape.batch, "front": plain(front)},
        sort_keys=False,
    )
    return atomic_write(path, text)


def measured_on_device(best: Any, environment: dict) -> str | None:
    """What the DB records as the GPU that measured the winner: the device name, and with
    ``--devices`` (or a farm) which GPU of which host."""
    by = dict(best.measured_by or {})
    name = by.get("device_name") or environment.get("device")
    if name and by.get("device"):
        return f"{name} ({by['device']} on {by.get('host')})"
    return str(name) if name else None


def best_result(
    args: argparse.Namespace, r: Any, space: Any, dtype: str, record: dict, storage_desc: str, verdict: Any = None
):
    """The DB entry of a study: its pick (``verdict.pick``: the best measured, or the runtime's
    current pick where nothing measured beats it), with the evidence."""
    pick = r.best if verdict is None else verdict.pick
    m = pick.measurement
    provenance = dict(record.get("provenance") or {})
    environment = dict(provenance.get("environment") or {})
    protocol = {
        **dict(record.get("protocol") or {}),
        **{k: v for k, v in provenance.items() if k != "environment"},
        "workload": r.shape.workload,
        "batch": r.shape.batch,
        "shape": list(r.shape.shape),
        "tuner": {
            **tuner_settings(args),
            **dict(record.get("tuner") or {}),  # as the workers ran it (an --export may say otherwise)
            "study": r.study_name,
            "storage": storage_desc,
            "space_size": r.space_size,
            "measured": r.n_measured,
            "workers": {str(k): v for k, v in r.by_slot.items()},
            "measured_by": dict(pick.measured_by or {}),
            "tie_rule": ("least energy" if args.objective == "energy" else "fastest")
            + " feasible; a simpler config within max(1%, mean spread), <= 2%, wins; never slower than "
            "the runtime's current pick measured in the study",
        },
    }
    if verdict is not None:
        protocol["tuner"]["improves_on"] = verdict.note
        if verdict.head_to_head is not None:
            protocol["tuner"]["head_to_head"] = verdict.head_to_head.evidence()
        if verdict.current is not None:
            cur = verdict.current
            protocol["tuner"]["current_pick"] = {
                "config": cur.config.to_dict(),
                "latency_us": cur.latency_us,
                "sqnr_db": cur.sqnr_db,
                "error": cur.measurement.error,
            }
    return BestResult(
        shape=r.shape,
        dtype=dtype,
        config=pick.config,
        latency_us=m.latency_us,
        spread_us=m.spread_us or 0.0,
        sqnr_db=m.sqnr_db,
        trials=max(1, r.n_measured),
        protocol=protocol,
        environment=environment,
        space_hash=space.hash,
        measured_on_device=measured_on_device(pick, environment),
        energy_uj=m.energy_uj,
    )


@dataclasses.dataclass
class Written:
    """What :func:`write_winners` did: the DB report (None: nothing written), Pareto fronts,
    notes for the summary, the results as stored now, each study's verdict (by study name), and
    ``error``: why the DB could not be written (the trials are safe in the study storage)."""

    report: Any
    fronts: list
    notes: list[str]
    results: list
    verdicts: dict[str, Any]
    error: str | None = None

    @classmethod
    def nothing(cls) -> Written:
        """No study written yet: what :meth:`add` folds each study's write into."""
        return cls(None, [], [], [], {})

    def add(self, other: Written) -> None:
        """Fold ``other`` (the write of the next study, :func:`write_winners`) into this one, as
        if both had been written in one call: the reports' keys, fronts, notes (once each),
        results and verdicts in order; the first error."""
        if self.report is None:
            self.report = other.report
        elif other.report is not None:
            a, b = self.report, other.report
            self.report = dataclasses.replace(
                a,
                added=[*a.added, *b.added],
                replaced=[*a.replaced, *b.replaced],
                kept=[*a.kept, *b.kept],
                not_fresh=[*a.not_fresh, *b.not_fresh],
            )
        self.fronts += other.fronts
        self.notes += [n for n in other.notes if n not in self.notes]
        self.results += other.results
        self.verdicts.update(other.verdicts)
        self.error = self.error or other.error


def verdicts_for(
    args: argparse.Namespace, results: list, currents: Mapping[str, Any], duels: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Each study's :class:`~.incumbent.Verdict` from its records (``currents``: study name ->
    the runtime's current pick, :class:`~.incumbent.CurrentPick` or None; ``duels``: study name
    -> its final head-to-head, :class:`~.headtohead.HeadToHead`, where one was measured)."""
    from qflash_gen.tune.incumbent import judge

    duels = duels or {}
    return {
        r.study_name: judge(
            r,
            space,
            currents.get(r.study_name),
            floor=args.sqnr_floor,
            objective=args.objective,
            duel=duels.get(r.study_name),
        )
        for r, space in results
    }


def check_writable(args: argparse.Namespace, gpu: str) -> None:
    """Before any measuring: can this run write its DB file?  A ``UsageError`` naming ``--db`` if
    not (a run that tunes for minutes and then cannot write helps nobody)."""
    from qflash_gen.tune.setup import UsageError

    try:
        path = db_file(args.db, gpu)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    where = f"--db {args.db}" if args.db else f"the user DB {path.parent} (${db.ENV_DB_DIR} or --db to change it)"
    if path.parent.exists() and not path.parent.is_dir():
        raise UsageError(f"{where}: {path.parent} is a file, not the directory that holds {path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(
            f"{where}: cannot write {path}: {exc.strerror or exc}; give a writable --db DIR, or --no-db to tune "
            "without writing (then --export writes it later)"
        ) from None


def export_hint(args: argparse.Namespace, gpu: str, storage_desc: str) -> str:
    """The ``qflash-tune --export`` command that writes this run's DB later, measuring nothing."""
    import shlex

    storage = storage_desc.removeprefix("journal:")
    parts = ["qflash-tune", "--export", "--storage", storage]
    parts += ["--simulate", str(args.simulate)] if args.simulate else ["--gpu", gpu]
    parts += ["--workloads", args.workloads, "--batches", args.batches]
    for flag, attr, default in (
        ("--study", "study", "qflash"),
        ("--grid", "grid", None),
        ("--p-bits", "p_bits", None),
        ("--max-regs", "max_regs", None),
        ("--dtype", "dtype", None),
        ("--objective", "objective", "latency"),
        ("--sqnr-floor", "sqnr_floor", SQNR_FLOOR_DB),
    ):
        value = getattr(args, attr, None)
        if value is not None and value != default:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts) + " --db DIR"


def write_winners(
    args: argparse.Namespace,
    gpu: str,
    dtype: str,
    results: list,
    records: dict,
    storage: Any,
    storage_desc: str,
    err: Any,
    *,
    currents: Mapping[str, Any] | None = None,
    duels: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Written:
    """Write the winners this process has the turn for (:func:`study.claim_db_write`), each only
    where it beats the runtime's current pick (``currents``, :func:`.incumbent.judge`; from the
    final head-to-head in ``duels`` where there is one).  ``qflash-tune`` calls it for each study
    as that study's search ends (:meth:`Written.add` gathers the run's report); ``--export``
    once for all.

    The results come back refreshed from storage where this process wrote them (they then hold
    every slot's trials); the verdicts are judged on those same records.  A DB that cannot be
    written (a corrupt file, no permission, a full disk) ends the turns unwritten and says why
    in ``error``: every trial stays in the study storage."""

    currents = currents or {}
    turns, notes, fresh = [], [], []
    for r, space in results:
        if r.best is None:
            fresh.append((r, space))
            continue
        turn, why = db_turn.claim_db_write(
            storage, r.study_name, r.shape, space, objective=args.objective, sqnr_floor=args.sqnr_floor, force=force
        )
        if turn is None:
            notes.append(f"{r.shape.label()}: DB entry not written by this worker: {why}")
            fresh.append((r, space))
            continue
        turns.append((turn, space))
        # the study as stored now (every slot's trials), with this process's own counts kept
        fresh.append((dataclasses.replace(turn.result, slot=r.slot, new_measurements=r.new_measurements), space))
    report, fronts = None, []
    verdicts = verdicts_for(args, fresh, currents, duels)
    if not turns:
        return Written(report, fronts, notes, fresh, verdicts)
    best = []
    for t, space in turns:
        v = verdicts[t.result.study_name]
        if v.pick is not None and v.write:
            best.append(best_result(args, t.result, space, dtype, records[t.result.study_name], storage_desc, v))
    try:
        report = write_best(args.db, gpu, best) if best else None
        if report is not None and report.kept and args.objective == "energy":
            notes.append(
                "energy: the DB keeps the faster of two entries for a key, so these least-energy picks did not "
                "replace faster stored ones; give energy tuning its own --db"
            )
        if objective.is_pareto(args.objective):
            for t, _ in turns:
                front = [
                    {
                        "config": x.config.to_dict(),
                        "latency_us": x.latency_us,
                        **({"energy_uj": x.energy_uj} if x.energy_uj is not None else {}),
                        "sqnr_db": x.sqnr_db,
                        "trial": x.number,
                    }
                    for x in t.result.front
                ]
                if front:
                    fronts.append(write_front(args.db, gpu, t.result.shape, dtype, front))
    except (ValueError, OSError) as exc:  # db.DBError (a corrupt or foreign file: file:line), permissions, disk
        for t, _ in turns:
            t.cancel()
        why = f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc)
        error = (
            f"DB {db_file(args.db, gpu)} not written: {why}. Every measured trial is kept in the study storage "
            f"{storage_desc}; rerun to retry, or write the DB later without measuring: "
            f"{export_hint(args, gpu, storage_desc)}"
        )
        return Written(None, [], notes, fresh, verdicts, error)  # the caller prints it after the summary
    except BaseException:  # an interrupt: the turns end unwritten (a rerun writes them)
        for t, _ in turns:
            t.cancel()
        raise
    for t, _ in turns:
        t.done(db=str(report.path) if report is not None else None, device=args.device_label)
    return Written(report, fronts, notes, fresh, verdicts)
