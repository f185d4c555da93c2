"""``qflash-tune``: tune the integer attention kernel for named workloads on this GPU.

Examples::

    qflash-tune --gpu h100 --workloads vit_b,swin_s                 # batches 1,8,64; DB under the user cache
    qflash-tune --gpu h100 --workloads A1,A2,A3 --batches 64 --trials 40 --db tuning_db
    qflash-tune --simulate tests/data/h100_sweep.csv --workloads vit_b --batches 8   # no GPU: replay a table
    qflash-tune --gpu h100 --workloads vit_b,swin_t --batches 8,64 --exhaustive --record sweep.csv
    qflash-tune --devices 0,1 --workloads swin_t --batches 8,64       # a worker per GPU, sharing each study
    qflash-tune --storage postgresql://tuner:pw@dbhost/qflash --devices 0,1,2,3 --workloads A1,A2 --no-db
    qflash-tune --storage postgresql://tuner:pw@dbhost/qflash --export --gpu h100 --workloads A1,A2 --db tuning_db
    qflash-tune --gpu h100 --workloads vit_b --batches 64 --objective energy --trials 20   # µJ/call (NVML)
    qflash-tune --simulate tests/data/h100_energy.csv --workloads vit_b --batches 64 \\
        --objective pareto --pareto-axes latency,energy,sqnr

One Optuna study per (GPU, workload, batch, dtype, search space); see :mod:`.study` for the rules
(correctness first, SQNR floor, no re-measurement, resume) and :mod:`.measure` for the protocol.
Exit status: 0 done, 1 a study found no config meeting the floor, 2 usage error (unknown
workload, ``--gpu`` not the GPU present, …), always without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from qflash_gen import workloads
from qflash_gen.config import KernelConfig

DEFAULT_TRIALS = 50
DEFAULT_TIMEOUT_S = 120.0


class UsageError(Exception):
    """Bad arguments: printed as ``qflash-tune: error: ...``, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from qflash_gen.tune.measure import TIMINGS
    from qflash_gen.tune.space import GRIDS

    p = argparse.ArgumentParser(
        prog="qflash-tune",
        description="Tune qflash-gen's integer attention kernel (Optuna) and merge the winners into the tuning DB.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1].split("One Optuna", 1)[0],
    )
    p.add_argument("--gpu", help="short GPU name (h100, h200, a100, ...); must be the GPU present, or the table's GPU")
    p.add_argument(
        "--workloads", required=True, help="comma-separated names: vit_b, swin_s (its 4 stages), A1..A7, ..."
    )
    p.add_argument("--batches", default="1,8,64", help="images per batch, comma-separated (default 1,8,64)")
    p.add_argument(
        "--trials",
        type=int,
        default=DEFAULT_TRIALS,
        help="configs this worker measures per study (default 50); concurrent workers each add theirs",
    )
    p.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per candidate (compile + check + timing)"
    )
    p.add_argument("--storage", help="Optuna storage URL (postgresql://..., sqlite:///...) or journal file path")
    p.add_argument("--study", default="qflash", help="study name prefix (default qflash)")
    p.add_argument("--db", help="tuning DB directory or <gpu>.yaml file to merge into (default: the user DB)")
    p.add_argument("--no-db", action="store_true", help="do not write the DB (and do not enqueue its entry)")
    p.add_argument("--sqnr-floor", type=float, default=30.0, help="minimum SQNR in dB vs fp64 (default 30)")
    p.add_argument(
        "--objective",
        choices=("latency", "energy", "pareto"),
        default="latency",
        help="latency (µs), energy (µJ per call, NVML counter; needs nvidia-ml-py, or a table with energy_uj), "
        "pareto (NSGA-II front over --pareto-axes)",
    )
    p.add_argument(
        "--pareto-axes",
        default=None,
        help="with --objective pareto: latency,sqnr (default) or latency,energy,sqnr",
    )
    p.add_argument(
        "--energy-seconds", type=float, default=1.0, help="energy: least GPU time of each measuring loop (default 1 s)"
    )
    p.add_argument("--energy-repeats", type=int, default=3, help="energy: rounds of idle + loop (default 3)")
    p.add_argument("--sampler", choices=("tpe", "random", "nsga2"), help="default: tpe (latency), nsga2 (pareto)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32", "int8"), help="workload dtype (default fp16)")
    p.add_argument(
        "--grid",
        choices=sorted(GRIDS),
        help="search grid (default: tune; --exhaustive: sweep; --simulate: the table's)",
    )
    p.add_argument(
        "--p-bits",
        metavar="B[,B]",
        help="softmax-numerator widths to search: 14 (default of the tune grid), 7 (the paper's, "
        "faster, loses accuracy on trained ViTs), or 7,14",
    )
    p.add_argument(
        "--max-regs",
        metavar="R[,R]",
        help="register caps per thread to search (Triton's maxnreg; 0 = the compiler's choice): "
        "default 0,168,128 on the tune grid",
    )
    p.add_argument(
        "--try",
        dest="try_configs",
        action="append",
        default=[],
        metavar="K=V,...",
        help="a config to measure first in every study (KernelConfig fields over the default config, "
        "as qflash-show --config; repeatable); skipped where the study's space cannot hold it",
    )
    p.add_argument("--simulate", metavar="FILE", help="replay a recorded table instead of measuring on a GPU")
    p.add_argument("--simulate-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--exhaustive", action="store_true", help="measure every config of the grid (needs --record)")
    p.add_argument("--record", metavar="FILE", help="table (CSV) to write with --exhaustive; resumed if it exists")
    p.add_argument("--max-configs", type=int, help="with --exhaustive: at most this many configs per shape group")
    p.add_argument(
        "--compile-jobs", type=int, default=min(8, os.cpu_count() or 1), help="parallel compile workers (--exhaustive)"
    )
    p.add_argument("--dry-run", action="store_true", help="with --exhaustive: print the plan and the time estimate")
    p.add_argument("--timing", choices=TIMINGS, default="do_bench", help="latency protocol (default do_bench)")
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=50.0)
    p.add_argument(
        "--devices",
        metavar="I,J,...",
        help="one worker process per GPU of this host (CUDA indices), all on the same studies; "
        "with --simulate: one simulated worker per index",
    )
    p.add_argument(
        "--export",
        action="store_true",
        help="write the DB from the studies in --storage and measure nothing (the last step of a tuning farm)",
    )
    p.add_argument("--device-label", help=argparse.SUPPRESS)  # set by --devices for each worker it starts
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# -- setup -----------------------------------------------------------------------------------------
def _shapes(args: argparse.Namespace):
    from qflash_gen.tune.measure import ShapeSpec

    try:
        wls = workloads.resolve(args.workloads)
    except ValueError as exc:
        raise UsageError(f"--workloads: {exc}") from None
    try:
        batches = workloads.parse_batches(args.batches)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return [ShapeSpec.of(w, b) for w in wls for b in batches]


def _check_numbers(args: argparse.Namespace) -> None:
    if args.trials < 1:
        raise UsageError(f"--trials {args.trials} must be >= 1")
    if not args.timeout > 0:
        raise UsageError(f"--timeout {args.timeout} must be > 0 seconds")
    if not math.isfinite(args.sqnr_floor):
        raise UsageError(f"--sqnr-floor {args.sqnr_floor} must be a finite number of dB")
    if args.max_configs is not None and args.max_configs < 1:
        raise UsageError(f"--max-configs {args.max_configs} must be >= 1")
    if args.exhaustive and not args.record:
        raise UsageError("--exhaustive needs --record FILE (the table to write)")
    if args.record and not args.exhaustive:
        raise UsageError("--record FILE is only used with --exhaustive")
    if not (args.energy_seconds > 0 and math.isfinite(args.energy_seconds)) or args.energy_repeats < 1:
        raise UsageError(
            f"--energy-seconds {args.energy_seconds} must be > 0 and --energy-repeats {args.energy_repeats} >= 1"
        )


def _simulated(args: argparse.Namespace):
    from qflash_gen.tune import _dbio, study
    from qflash_gen.tune.simulate import SimulatedMeasurer

    try:
        measurer = SimulatedMeasurer(args.simulate, gpu=args.gpu, delay_s=args.simulate_delay)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if study.needs_energy(args.objective) and not measurer.table.has_energy:
        raise UsageError(
            f"--objective {args.objective}: the table {args.simulate} has no energy_uj column (recorded without "
            "energy); replay a table recorded by tools/energy_sweep.py"
        )
    out = measurer.protocol.get("out_dtype", "fp16")
    dtype = _dbio.dtype_for_kernel_out(out)
    if args.dtype and args.dtype != dtype:
        raise UsageError(f"--dtype {args.dtype}: the table {args.simulate} was recorded with {out} output ({dtype})")
    return measurer, dtype


def _live(args: argparse.Namespace):
    from qflash_gen.tune import _dbio, study
    from qflash_gen.tune.measure import GPUMeasurer, Protocol

    if args.gpu is not None:
        try:
            _dbio.check_gpu_name(args.gpu)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    present, what = _dbio.present_gpu()
    if present is None:
        named = f"--gpu {args.gpu}: " if args.gpu else ""
        raise UsageError(
            f"{named}{what}; tuning measures on the GPU it names. Without a GPU, replay a table recorded "
            "on one: --simulate FILE"
        )
    if args.gpu is not None and args.gpu != present:
        raise UsageError(f"--gpu {args.gpu} does not match the GPU present: {what}")
    energy = study.needs_energy(args.objective)
    if energy:
        from qflash_gen.energy import EnergyUnavailable, probe

        try:
            probe()
        except EnergyUnavailable as exc:
            raise UsageError(f"--objective {args.objective} measures energy, but {exc}") from None
    dtype = args.dtype or "fp16"
    try:
        protocol = Protocol(
            timing=args.timing,
            warmup_ms=args.warmup_ms,
            rep_ms=args.rep_ms,
            out_dtype=_dbio.kernel_out_dtype(dtype),
            seed=args.seed,
            energy=energy,
            energy_min_s=args.energy_seconds,
            energy_repeats=args.energy_repeats,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return GPUMeasurer(present, protocol, timeout_s=args.timeout), dtype


def _grid(args: argparse.Namespace, measurer: Any):
    from qflash_gen.tune.simulate import SimulatedMeasurer
    from qflash_gen.tune.space import Grid, get_grid

    if args.grid:
        grid = get_grid(args.grid)
    elif isinstance(measurer, SimulatedMeasurer):
        grid = Grid.from_configs(measurer.configs())
    else:
        grid = get_grid("sweep" if args.exhaustive else "tune")
    for flag, field in (("--p-bits", "p_bits"), ("--max-regs", "max_regs")):
        text = getattr(args, field, None)
        if text:
            try:
                grid = dataclasses.replace(grid, **{field: tuple(int(x) for x in text.split(","))})
            except ValueError as exc:
                raise UsageError(f"{flag} {text!r}: {exc}") from None
    return grid


# -- tuning ----------------------------------------------------------------------------------------
def _fmt_us(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _try_configs(args: argparse.Namespace) -> list[KernelConfig]:
    from qflash_gen import cli as show_cli

    out = []
    for text in getattr(args, "try_configs", None) or []:
        try:
            out.append(show_cli.parse_config(text))
        except (show_cli.UsageError, ValueError) as exc:
            raise UsageError(f"--try {text!r}: {exc}") from None
    return out


def _plans(args: argparse.Namespace, gpu: str, dtype: str, shapes: list, grid: Any, *, enqueue_db: bool) -> list:
    """``(shape, space, study name, configs to enqueue)`` per study, in the order they run."""
    from qflash_gen import runtime
    from qflash_gen.tune import _dbio, study
    from qflash_gen.tune.space import SMEM_LIMITS, SearchSpace

    smem = SMEM_LIMITS.get(gpu)
    tries = _try_configs(args)
    plans = []
    for s in shapes:
        space = SearchSpace(grid, s.n, s.d, smem_limit=smem)
        name = study.study_name(args.study, gpu, s, dtype, space, args.objective)
        enqueue: list[KernelConfig] = []
        if enqueue_db and not args.no_db:
            try:
                # A replay (--simulate) lives in its table's world: the shipped DB's live
                # measurements would make it depend on what this checkout ships.
                incumbent = _dbio.db_best(args.db, gpu, _dbio.key_for(s, dtype), shipped=not args.simulate)
            except ValueError as exc:
                raise UsageError(f"--db: {exc}") from None
            if incumbent is not None:
                enqueue.append(incumbent)
            # stale winners (an older template or P width), mapped into this space: a warm start
            key = _dbio.key_for(s, dtype)
            seeds = _dbio.db_seeds(args.db, gpu, key, shipped=not args.simulate)
            # then the winners at other batch buckets of the same N and D (nearest first)
            seeds += _dbio.db_neighbors(args.db, gpu, key, shipped=not args.simulate)
            for seed in seeds:
                adapted = space.adapt(seed)
                if adapted is not None and adapted not in enqueue:
                    enqueue.append(adapted)
        default = runtime.default_config(s.n, s.d)
        enqueue.append(space.adapt(default) or default)
        # then, seed by seed, the same tiling under each register cap of the space (the cap moves
        # latency a lot for the big single-pass tiles) and as a pipelined loop over 2+ heads per
        # program (num_stages >= 2): axes TPE rarely lands on together (docs/perf-notes.md)
        # --try first, as given (no variants), where the space holds it and it fits
        first = [c for c in tries if space.params_for(c) is not None and space.check(c) is None]
        plans.append((s, space, name, first + [c for c in _seed_variants(space, enqueue) if c not in first]))
    return plans


def _seed_variants(space, seeds: list[KernelConfig]) -> list[KernelConfig]:
    """``seeds`` in order, each followed by its register-capped and head-grouped variants that
    the space can produce and that fit."""
    out: list[KernelConfig] = []

    def add(c: KernelConfig) -> None:
        if c not in out and space.params_for(c) is not None and space.check(c) is None:
            out.append(c)

    for seed in seeds:
        if seed not in out:
            out.append(seed)
        for r in space.choices["max_regs"]:
            capped = seed.replace(max_regs=r)
            add(capped)
            for g in space.choices["heads_per_program"]:
                if g > 1:
                    add(capped.replace(heads_per_program=g, num_stages=max(2, capped.num_stages)))
    return out


def _open_storage(args: argparse.Namespace):
    from qflash_gen.tune.storage import open_storage

    try:
        return open_storage(args.storage)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _measured_on_device(best: Any, environment: dict) -> str | None:
    """What the DB records as the GPU that measured the winner: the device name, and with
    ``--devices`` (or a farm) which GPU of which host."""
    by = dict(best.measured_by or {})
    name = by.get("device_name") or environment.get("device")
    if name and by.get("device"):
        return f"{name} ({by['device']} on {by.get('host')})"
    return str(name) if name else None


def _tuner_settings(args: argparse.Namespace) -> dict[str, Any]:
    """How the search ran (stored on each study with the measurer's record, for ``--export``)."""
    from qflash_gen.tune import study

    return {
        "objective": args.objective,
        "sampler": args.sampler or ("nsga2" if study.is_pareto(args.objective) else "tpe"),
        "seed": args.seed,
        "sqnr_floor": args.sqnr_floor,
    }


def _best_result(args: argparse.Namespace, r: Any, space: Any, dtype: str, record: dict, storage_desc: str):
    from qflash_gen.tune import _dbio

    m = r.best.measurement
    provenance = dict(record.get("provenance") or {})
    environment = dict(provenance.get("environment") or {})
    protocol = {
        **dict(record.get("protocol") or {}),
        **{k: v for k, v in provenance.items() if k != "environment"},
        "workload": r.shape.workload,
        "batch": r.shape.batch,
        "shape": list(r.shape.shape),
        "tuner": {
            **_tuner_settings(args),
            **dict(record.get("tuner") or {}),  # as the workers ran it (an --export may say otherwise)
            "study": r.study_name,
            "storage": storage_desc,
            "space_size": r.space_size,
            "measured": r.n_measured,
            "workers": {str(k): v for k, v in r.by_worker.items()},
            "measured_by": dict(r.best.measured_by or {}),
            "tie_rule": ("least energy" if args.objective == "energy" else "fastest")
            + " feasible; a simpler config within max(1%, mean spread), <= 2%, wins",
        },
    }
    return _dbio.BestResult(
        shape=r.shape,
        dtype=dtype,
        config=r.best.config,
        latency_us=m.latency_us,
        spread_us=m.spread_us or 0.0,
        sqnr_db=m.sqnr_db,
        trials=max(1, r.n_measured),
        protocol=protocol,
        environment=environment,
        space_hash=space.hash,
        measured_on_device=_measured_on_device(r.best, environment),
        energy_uj=m.energy_uj,
    )


def _write_db(
    args: argparse.Namespace,
    gpu: str,
    dtype: str,
    results: list,
    records: dict,
    storage: Any,
    storage_desc: str,
    err: Any,
    *,
    force: bool = False,
) -> tuple[Any, list, list[str], list]:
    """Write the winners this process has the turn for (:func:`study.claim_db_write`).

    Returns ``(report, fronts, notes, results)`` with the results refreshed from storage where
    this process wrote them (they then hold every worker's trials)."""
    from rich.markup import escape

    from qflash_gen.tune import _dbio, study

    turns, notes, fresh = [], [], []
    for r, space in results:
        if r.best is None:
            fresh.append((r, space))
            continue
        turn, why = study.claim_db_write(
            storage, r.study_name, r.shape, space, objective=args.objective, sqnr_floor=args.sqnr_floor, force=force
        )
        if turn is None:
            notes.append(f"{r.shape.label()}: DB entry not written by this worker: {why}")
            fresh.append((r, space))
            continue
        turns.append((turn, space))
        # the study as stored now (every worker's trials), with this worker's own counts kept
        fresh.append((dataclasses.replace(turn.result, worker=r.worker, new_measurements=r.new_measurements), space))
    report, fronts = None, []
    if not turns:
        return report, fronts, notes, fresh
    best = [
        _best_result(args, t.result, space, dtype, records[t.result.study_name], storage_desc)
        for t, space in turns
        if t.result.best is not None
    ]
    try:
        report = _dbio.write_best(args.db, gpu, best) if best else None
        if report is not None and report.kept and args.objective == "energy":
            notes.append(
                "energy: the DB keeps the faster of two entries for a key, so these least-energy picks did not "
                "replace faster stored ones; give energy tuning its own --db"
            )
        if study.is_pareto(args.objective):
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
                    fronts.append(_dbio.write_front(args.db, gpu, t.result.shape, dtype, front))
    except ValueError as exc:  # includes db.DBError: a corrupt or foreign DB file (file:line)
        for t, _ in turns:
            t.cancel()
        err.print(
            f"[red]{escape(f'qflash-tune: DB not written: {exc}')}[/] (the studies keep every trial; rerun to retry)"
        )
        return None, [], notes, fresh
    for t, _ in turns:
        t.done(db=str(report.path) if report is not None else None, device=args.device_label)
    return report, fronts, notes, fresh


def _summary(args: argparse.Namespace, gpu: str, source: Any, results: list, out: Any) -> None:
    from rich.table import Table

    from qflash_gen import runtime
    from qflash_gen.tune import study

    table = Table(title=f"qflash-tune on {gpu} ({source}), SQNR floor {args.sqnr_floor:g} dB")
    for col in (
        "workload",
        "batch",
        "B,H,N,D",
        "measured",
        "this worker",
        "failed",
        "<floor",
        "best config",
        "us",
        "+-",
        "SQNR dB",
        "vs default",
    ):
        table.add_column(col, justify="left" if col in ("workload", "best config") else "right")
    for r, _ in results:
        best = r.best
        default_hash = runtime.default_config(r.shape.n, r.shape.d).hash
        default = next((t for t in r.history if t.config.hash == default_hash and t.measurement.ok), None)
        ratio = "-"
        if best is not None and default is not None and best.latency_us:
            ratio = f"{default.latency_us / best.latency_us:.2f}x"
        table.add_row(
            r.shape.workload,
            str(r.shape.batch),
            ",".join(map(str, r.shape.shape)),
            f"{r.n_measured}/{r.space_size}",
            "-" if r.worker is None else f"#{r.worker}: {r.n_mine}",
            str(r.n_failed),
            str(r.n_below_floor),
            best.config.short() if best else "[red]none meets the floor[/]",
            _fmt_us(best.latency_us if best else None),
            _fmt_us(best.measurement.spread_us if best else None),
            "-" if best is None else f"{best.sqnr_db:.1f}",
            ratio,
        )
    out.print(table)
    if study.needs_energy(args.objective):
        for r, _ in results:
            b = r.best
            if b is not None and b.energy_uj is not None:
                m = b.measurement
                default_hash = runtime.default_config(r.shape.n, r.shape.d).hash
                d = next(
                    (
                        t
                        for t in r.history
                        if t.config.hash == default_hash and t.energy_uj and t.measurement.feasible(args.sqnr_floor)
                    ),
                    None,
                )
                vs = f", the default config takes {d.energy_uj / m.energy_uj:.2f}x" if d is not None else ""
                out.print(
                    f"energy {r.shape.label()}: {b.config.short()} {m.energy_uj:.1f} uJ/call "
                    f"(spread {m.energy_spread_uj or 0.0:.1f}, above idle {m.above_idle_uj or 0.0:.1f}, "
                    f"idle {m.idle_w or 0.0:.1f} W{vs})"
                )
    if study.is_pareto(args.objective):
        for r, _ in results:
            pts = ", ".join(
                f"{t.latency_us:.1f}us/"
                + (f"{t.energy_uj:.1f}uJ/" if t.energy_uj is not None else "")
                + f"{t.sqnr_db:.1f}dB"
                for t in r.front
            )
            out.print(f"front {r.shape.label()}: {pts or 'empty'}")


def _consoles():
    from rich.console import Console

    err = Console(stderr=True, soft_wrap=True)
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)  # piped: one line per row, not wrapped to 80 columns
    return out, err


def _report_db(out: Any, report: Any, fronts: list, notes: list[str]) -> None:
    from rich.markup import escape

    for note in notes:
        out.print(escape(note))
    if report is not None:
        out.print(
            f"DB {report.path}: added {len(report.added)}, replaced {len(report.replaced)}, "
            f"kept better stored {len(report.kept)}"
        )
    for path in fronts:
        out.print(f"front written: {path}")


def _tune(args: argparse.Namespace, measurer: Any, dtype: str, shapes: list, grid: Any) -> int:
    from rich.markup import escape

    from qflash_gen.tune import study
    from qflash_gen.tune.simulate import SimulatedMeasurer

    out, err = _consoles()
    if isinstance(measurer, SimulatedMeasurer):
        missing = [s for s in shapes if not measurer.has_shape(s)]
        for s in missing:
            err.print(
                f"[yellow]{escape(f'skipped {s.label()} {s.shape}: the table {args.simulate} has no rows for it')}[/]"
            )
        shapes = [s for s in shapes if s not in missing]
        if not shapes:
            have = ", ".join(f"{s.label()} {s.shape}" for s in measurer.shapes())
            raise UsageError(
                f"--simulate {args.simulate}: none of the requested shapes is in the table; it holds {have}"
            )
    storage, storage_desc = _open_storage(args)

    gpu = measurer.gpu
    provenance = measurer.provenance
    environment = provenance.get("environment") or {}
    # How this worker measures: stored on each study, so `qflash-tune --export` can write the DB
    # entry on a machine that measured nothing.
    record = {
        "gpu": gpu,
        "dtype": dtype,
        "protocol": measurer.protocol,
        "provenance": provenance,
        "tuner": _tuner_settings(args),
    }
    worker_info: dict[str, Any] = {"device_name": environment.get("device")}
    if args.device_label:
        worker_info["device"] = args.device_label
    plans = _plans(args, gpu, dtype, shapes, grid, enqueue_db=True)

    label = f", device {args.device_label}" if args.device_label else ""
    err.print(escape(f"qflash-tune: gpu {gpu}{label}, {len(plans)} studies, storage {storage_desc}"))
    results = []
    t_start = time.monotonic()
    # A worker slot in every study first: workers started together each spend their own budget
    # in every study, however far apart their progress drifts (study.open_study).
    runs = []
    try:
        for s, space, name, _ in plans:
            runs.append(
                study.open_study(
                    s,
                    space,
                    storage=storage,
                    name=name,
                    budget=args.trials,
                    objective=args.objective,
                    sqnr_floor=args.sqnr_floor,
                    seed=args.seed,
                    sampler=args.sampler,
                    worker_info=worker_info,
                    study_attrs={"measurer": record},
                )
            )
        _search_all(args, measurer, plans, runs, results, err)
    finally:
        for run in runs:
            run.close()

    report, fronts, notes = None, [], []
    if not args.no_db:
        records = {r.study_name: record for r, _ in results}
        report, fronts, notes, results = _write_db(args, gpu, dtype, results, records, storage, storage_desc, err)
    _summary(args, gpu, provenance.get("source"), results, out)
    _report_db(out, report, fronts, notes)
    out.print(f"wall time {time.monotonic() - t_start:.1f} s")
    return 0 if all(r.best is not None for r, _ in results) else 1


def _search_all(args: argparse.Namespace, measurer: Any, plans: list, runs: list, results: list, err: Any) -> None:
    """The studies' searches, one after the other, with a progress bar each."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from qflash_gen.tune import study

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[best]}"),
        TimeElapsedColumn(),
        console=err,
        disable=args.quiet,
    ) as bar:
        tasks = {}
        for s, space, _, _ in plans:
            total = min(args.trials, space.size)
            tasks[s] = bar.add_task(f"{s.label():<16}", total=total, best="")

        for (s, space, _, enqueue), run in zip(plans, runs, strict=True):
            task = tasks[s]

            def progress(r: study.StudyResult, task: Any = task) -> None:
                best = f"best {r.best.latency_us:.2f} us" if r.best else "no feasible config yet"
                bar.update(task, completed=r.n_mine, best=f"{best}  ({r.n_failed} failed, {r.n_measured} in study)")

            r = run.search(measurer, enqueue=enqueue, on_progress=progress)
            progress(r)
            results.append((r, space))
            if r.new_measurements == 0 and r.n_mine >= args.trials:
                err.print(
                    escape(
                        f"{s.label()}: worker slot #{r.worker} had spent its budget of {args.trials} in an earlier "
                        "run (a run resumes a slot; to measure more, raise --trials)"
                    )
                )
            if not err.is_terminal and not args.quiet:  # a log: one line per finished study
                best = f"best {r.best.latency_us:.2f} us {r.best.config.short()}" if r.best else "no feasible config"
                err.print(
                    escape(
                        f"{s.label()}: worker #{r.worker} measured {r.n_mine} ({r.new_measurements} new), "
                        f"{r.n_measured} in study ({r.n_failed} failed), {best}, {r.wall_s:.0f} s"
                    )
                )


def _export(args: argparse.Namespace, shapes: list) -> int:
    """``--export``: write the DB from the studies in ``--storage``, measuring nothing."""
    from rich.markup import escape

    from qflash_gen.tune import _dbio, study
    from qflash_gen.tune.lease import _backend
    from qflash_gen.tune.space import get_grid

    if args.no_db:
        raise UsageError("--export writes the DB; it cannot be combined with --no-db")
    if args.simulate:
        measurer, dtype = _simulated(args)
        gpu, grid = measurer.gpu, _grid(args, measurer)
    else:
        if args.gpu is None:
            raise UsageError("--export needs --gpu NAME (the GPU the studies were tuned on), or --simulate FILE")
        try:
            gpu = _dbio.check_gpu_name(args.gpu)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        dtype = args.dtype or "fp16"
        grid = get_grid(args.grid or "tune")
    out, err = _consoles()
    storage, storage_desc = _open_storage(args)
    results, records = [], {}
    for s, space, name, _ in _plans(args, gpu, dtype, shapes, grid, enqueue_db=False):
        try:
            r = study.load_result(storage, name, s, space, objective=args.objective, sqnr_floor=args.sqnr_floor)
        except KeyError:
            err.print(f"[yellow]{escape(f'{s.label()}: no study {name} in {storage_desc}: not tuned (skipped)')}[/]")
            continue
        record = _backend(storage).get_study_user_attrs(r.study_id).get("measurer")
        if not record:
            raise UsageError(
                f"--export: study {name} does not record how it was measured (tuned by an older qflash-tune); "
                "rerun one worker on it (it measures nothing new when its budget is spent) and export again"
            )
        records[name] = record
        results.append((r, space))
    if not results:
        raise UsageError(
            f"--export: none of the requested studies is in {storage_desc}; check --gpu, --workloads, --batches, "
            "--dtype, --grid, --objective and --study (they name the study)"
        )
    report, fronts, notes, results = _write_db(
        args, gpu, dtype, results, records, storage, storage_desc, err, force=True
    )
    _summary(args, gpu, "export", results, out)
    _report_db(out, report, fronts, notes)
    return 0 if report is not None and all(r.best is not None for r, _ in results) else 1


def _run_devices(args: argparse.Namespace, argv: list[str], shapes: list) -> int:
    """``--devices``: one worker process per GPU on this host, all on the same studies."""
    from rich.markup import escape
    from rich.table import Table

    from qflash_gen.tune import _dbio, devices, study

    try:
        indices = devices.parse_devices(args.devices)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.exhaustive or args.export:
        raise UsageError("--devices runs the search on several GPUs; it cannot be combined with --exhaustive/--export")
    if args.simulate:
        measurer, dtype = _simulated(args)
        gpu, grid = measurer.gpu, _grid(args, measurer)
        workers = [(f"sim:{i}", {}) for i in indices]
    else:
        try:
            models = _dbio.device_models(indices)
            gpu = devices.check_same_model(models)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if args.gpu is not None and args.gpu != gpu:
            shown = ", ".join(f"{i} = {name}" for i, _, name in models)
            raise UsageError(f"--gpu {args.gpu} does not match the GPUs of --devices {args.devices}: {shown}")
        dtype = args.dtype or "fp16"
        grid = _grid(args, None)
        workers = [(f"cuda:{i}", {"CUDA_VISIBLE_DEVICES": devices.physical_index(i)}) for i in indices]
    out, err = _consoles()
    _open_storage(args)  # a bad --storage is a usage error here, not once per worker
    t0 = time.monotonic()
    err.print(escape(f"qflash-tune: {len(workers)} workers ({', '.join(w for w, _ in workers)}) on gpu {gpu}"))
    codes = devices.run_workers(devices.child_argv(argv), workers, err=err)
    wall = time.monotonic() - t0

    storage, storage_desc = _open_storage(args)
    labels = [w for w, _ in workers]
    table = Table(title=f"qflash-tune --devices {args.devices}: {len(workers)} workers on {gpu}, wall {wall:.1f} s")
    for col in ("workload", "batch", "measured", *labels, "other hosts", "best config", "us", "DB written by"):
        table.add_column(col, justify="left" if col in ("workload", "best config", "DB written by") else "right")
    backend = None
    for s, space, name, _ in _plans(args, gpu, dtype, shapes, grid, enqueue_db=False):
        try:
            r = study.load_result(storage, name, s, space, objective=args.objective, sqnr_floor=args.sqnr_floor)
        except KeyError:
            continue
        from qflash_gen.tune.lease import _backend

        backend = backend or _backend(storage)
        written = backend.get_study_user_attrs(r.study_id).get(study.DB_WRITTEN) or {}
        host = socket.gethostname()
        per = {d: n for (h, d), n in r.measured_per("host", "device").items() if h == host}
        table.add_row(
            s.workload,
            str(s.batch),
            f"{r.n_measured}/{r.space_size}",
            *(str(per.get(w, 0)) for w in labels),
            str(r.n_measured - sum(per.values())),
            r.best.config.short() if r.best else "-",
            _fmt_us(r.best.latency_us if r.best else None),
            str(written.get("device") or written.get("by") or "-"),
        )
    out.print(table)
    out.print(f"storage {storage_desc}; wall time {wall:.1f} s")
    bad = [c for c in codes if c != 0]
    if not bad:
        return 0
    return 2 if 2 in bad else 130 if 130 in bad else max(bad)


def _exhaustive(args: argparse.Namespace, measurer: Any, shapes: list, grid: Any) -> int:
    from qflash_gen.tune.simulate import SimulatedMeasurer
    from qflash_gen.tune.space import SMEM_LIMITS
    from qflash_gen.tune.sweep import sweep

    env = measurer.provenance.get("environment") or {}
    if isinstance(measurer, SimulatedMeasurer):
        env = {**env, "replayed_from": measurer.provenance.get("table"), "table_sha256": measurer.table.sha256}
    try:
        sweep(
            measurer,
            shapes,
            grid,
            args.record,
            smem_limit=SMEM_LIMITS.get(measurer.gpu),
            max_configs=args.max_configs,
            compile_jobs=args.compile_jobs,
            environment=env,
            dry_run=args.dry_run,
            progress=not args.quiet,
            seed=args.seed,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``qflash-tune`` (see the module doc)."""
    from qflash_gen.tune.isolate import WorkerError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        _check_numbers(args)
        try:  # the study objective: --objective pareto --pareto-axes latency,energy,sqnr is "pareto-energy"
            from qflash_gen.tune.study import objective_for

            args.objective = objective_for(args.objective, args.pareto_axes)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        shapes = _shapes(args)
        if args.devices is not None:
            return _run_devices(args, argv, shapes)
        if args.export:
            return _export(args, shapes)
        measurer, dtype = _simulated(args) if args.simulate else _live(args)
        try:
            grid = _grid(args, measurer)
            if args.exhaustive:
                return _exhaustive(args, measurer, shapes, grid)
            return _tune(args, measurer, dtype, shapes, grid)
        finally:
            measurer.close()  # no worker process outlives the command
    except UsageError as exc:
        print(f"qflash-tune: error: {exc}", file=sys.stderr)
        return 2
    except WorkerError as exc:  # the measuring worker cannot start: every candidate would fail alike
        print(f"qflash-tune: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qflash-tune: interrupted; finished trials are in the study storage, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
