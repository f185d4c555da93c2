"""``qflash-tune``: tune the integer attention kernel for named workloads on this GPU.

Examples::

    qflash-tune --gpu h100 --workloads vit_b,swin_s                 # batches 1,8,64; DB under the user cache
    qflash-tune --gpu h100 --workloads A1,A2,A3 --batches 64 --trials 40 --db tuning_db
    qflash-tune --simulate tests/data/h100_sweep.csv --workloads vit_b --batches 8   # no GPU: replay a table
    qflash-tune --gpu h100 --workloads vit_b,swin_t --batches 8,64 --exhaustive --record sweep.csv

One Optuna study per (GPU, workload, batch, dtype, search space); see :mod:`.study` for the rules
(correctness first, SQNR floor, no re-measurement, resume) and :mod:`.measure` for the protocol.
Exit status: 0 done, 1 a study found no config meeting the floor, 2 usage error (unknown
workload, ``--gpu`` not the GPU present, …), always without a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
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
    p.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help="configs to measure per study (default 50)")
    p.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per candidate (compile + check + timing)"
    )
    p.add_argument("--storage", help="Optuna storage URL (postgresql://..., sqlite:///...) or journal file path")
    p.add_argument("--study", default="qflash", help="study name prefix (default qflash)")
    p.add_argument("--db", help="tuning DB directory or <gpu>.yaml file to merge into (default: the user DB)")
    p.add_argument("--no-db", action="store_true", help="do not write the DB (and do not enqueue its entry)")
    p.add_argument("--sqnr-floor", type=float, default=30.0, help="minimum SQNR in dB vs fp64 (default 30)")
    p.add_argument("--objective", choices=("latency", "pareto"), default="latency")
    p.add_argument("--sampler", choices=("tpe", "random", "nsga2"), help="default: tpe (latency), nsga2 (pareto)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32", "int8"), help="workload dtype (default fp16)")
    p.add_argument(
        "--grid",
        choices=sorted(GRIDS),
        help="search grid (default: tune; --exhaustive: sweep; --simulate: the table's)",
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


def _simulated(args: argparse.Namespace):
    from qflash_gen.tune import _dbio
    from qflash_gen.tune.simulate import SimulatedMeasurer

    try:
        measurer = SimulatedMeasurer(args.simulate, gpu=args.gpu, delay_s=args.simulate_delay)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out = measurer.protocol.get("out_dtype", "fp16")
    dtype = _dbio.dtype_for_kernel_out(out)
    if args.dtype and args.dtype != dtype:
        raise UsageError(f"--dtype {args.dtype}: the table {args.simulate} was recorded with {out} output ({dtype})")
    return measurer, dtype


def _live(args: argparse.Namespace):
    from qflash_gen.tune import _dbio
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
    dtype = args.dtype or "fp16"
    try:
        protocol = Protocol(
            timing=args.timing,
            warmup_ms=args.warmup_ms,
            rep_ms=args.rep_ms,
            out_dtype=_dbio.kernel_out_dtype(dtype),
            seed=args.seed,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return GPUMeasurer(present, protocol, timeout_s=args.timeout), dtype


def _grid(args: argparse.Namespace, measurer: Any):
    from qflash_gen.tune.simulate import SimulatedMeasurer
    from qflash_gen.tune.space import Grid, get_grid

    if args.grid:
        return get_grid(args.grid)
    if isinstance(measurer, SimulatedMeasurer):
        return Grid.from_configs(measurer.configs())
    return get_grid("sweep" if args.exhaustive else "tune")


# -- tuning ----------------------------------------------------------------------------------------
def _fmt_us(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _tune(args: argparse.Namespace, measurer: Any, dtype: str, shapes: list, grid: Any) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from qflash_gen import runtime
    from qflash_gen.tune import _dbio, study
    from qflash_gen.tune.simulate import SimulatedMeasurer
    from qflash_gen.tune.space import SMEM_LIMITS, SearchSpace
    from qflash_gen.tune.storage import open_storage

    err = Console(stderr=True, soft_wrap=True)
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)  # piped: one line per row, not wrapped to 80 columns
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
    try:
        storage, storage_desc = open_storage(args.storage)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    gpu = measurer.gpu
    smem = SMEM_LIMITS.get(gpu)
    environment = measurer.provenance.get("environment") or {}
    plans = []
    for s in shapes:
        space = SearchSpace(grid, s.n, s.d, smem_limit=smem)
        name = study.study_name(args.study, gpu, s, dtype, space, args.objective)
        enqueue: list[KernelConfig] = []
        if not args.no_db:
            try:
                incumbent = _dbio.db_best(args.db, gpu, _dbio.key_for(s, dtype))
            except ValueError as exc:
                raise UsageError(f"--db: {exc}") from None
            if incumbent is not None:
                enqueue.append(incumbent)
        enqueue.append(runtime.default_config(s.n, s.d))
        plans.append((s, space, name, enqueue))

    err.print(escape(f"qflash-tune: gpu {gpu}, {len(plans)} studies, storage {storage_desc}"))
    results = []
    t_start = time.monotonic()
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

        for s, space, name, enqueue in plans:
            task = tasks[s]

            def progress(r: study.StudyResult, task: Any = task) -> None:
                best = f"best {r.best.latency_us:.2f} us" if r.best else "no feasible config yet"
                bar.update(task, completed=r.n_measured, best=f"{best}  ({r.n_failed} failed)")

            r = study.run_study(
                s,
                measurer,
                space,
                storage=storage,
                name=name,
                budget=args.trials,
                objective=args.objective,
                sqnr_floor=args.sqnr_floor,
                seed=args.seed,
                sampler=args.sampler,
                enqueue=enqueue,
                on_progress=progress,
            )
            progress(r)
            results.append((r, space))
            if not err.is_terminal and not args.quiet:  # a log: one line per finished study
                best = f"best {r.best.latency_us:.2f} us {r.best.config.short()}" if r.best else "no feasible config"
                err.print(
                    escape(f"{s.label()}: {r.n_measured} measured ({r.n_failed} failed), {best}, {r.wall_s:.0f} s")
                )

    # -- DB ----------------------------------------------------------------------------------------
    provenance = measurer.provenance
    best_results = []
    for r, space in results:
        if r.best is None:
            continue
        m = r.best.measurement
        protocol = {
            **measurer.protocol,
            **{k: v for k, v in provenance.items() if k != "environment"},
            "workload": r.shape.workload,
            "batch": r.shape.batch,
            "shape": list(r.shape.shape),
            "tuner": {
                "objective": args.objective,
                "sampler": args.sampler or ("nsga2" if args.objective == "pareto" else "tpe"),
                "seed": args.seed,
                "sqnr_floor": args.sqnr_floor,
                "study": r.study_name,
                "storage": storage_desc,
                "space_size": r.space_size,
                "measured": r.n_measured,
                "tie_rule": "fastest feasible; a simpler config within max(1%, mean spread), <= 2%, wins",
            },
        }
        best_results.append(
            _dbio.BestResult(
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
            )
        )
    report = None
    if best_results and not args.no_db:
        try:
            report = _dbio.write_best(args.db, gpu, best_results)
        except ValueError as exc:  # includes db.DBError: a corrupt or foreign DB file (file:line)
            err.print(
                f"[red]{escape(f'qflash-tune: DB not written: {exc}')}[/] (the studies keep every trial; rerun to retry)"
            )
    fronts = []
    if args.objective == "pareto" and not args.no_db:
        for r, _ in results:
            front = [
                {"config": t.config.to_dict(), "latency_us": t.latency_us, "sqnr_db": t.sqnr_db, "trial": t.number}
                for t in r.front
            ]
            if front:
                fronts.append(_dbio.write_front(args.db, gpu, r.shape, dtype, front))

    # -- summary -----------------------------------------------------------------------------------
    table = Table(title=f"qflash-tune on {gpu} ({provenance.get('source')}), SQNR floor {args.sqnr_floor:g} dB")
    for col in (
        "workload",
        "batch",
        "B,H,N,D",
        "measured",
        "failed",
        "<floor",
        "best config",
        "us",
        "+-",
        "SQNR dB",
        "vs default",
    ):
        table.add_column(col, justify="left" if col in ("workload", "best config") else "right")
    default_hashes = {}
    for r, _ in results:
        default_hashes[r.shape] = runtime.default_config(r.shape.n, r.shape.d).hash
    for r, _ in results:
        best = r.best
        default = next((t for t in r.history if t.config.hash == default_hashes[r.shape] and t.measurement.ok), None)
        ratio = "-"
        if best is not None and default is not None and best.latency_us:
            ratio = f"{default.latency_us / best.latency_us:.2f}x"
        table.add_row(
            r.shape.workload,
            str(r.shape.batch),
            ",".join(map(str, r.shape.shape)),
            f"{r.n_measured}/{r.space_size}",
            str(r.n_failed),
            str(r.n_below_floor),
            best.config.short() if best else "[red]none meets the floor[/]",
            _fmt_us(best.latency_us if best else None),
            _fmt_us(best.measurement.spread_us if best else None),
            "-" if best is None else f"{best.sqnr_db:.1f}",
            ratio,
        )
    out.print(table)
    if args.objective == "pareto":
        for r, _ in results:
            pts = ", ".join(f"{t.latency_us:.1f}us/{t.sqnr_db:.1f}dB" for t in r.front)
            out.print(f"front {r.shape.label()}: {pts or 'empty'}")
    if report is not None:
        out.print(
            f"DB {report.path}: added {len(report.added)}, replaced {len(report.replaced)}, "
            f"kept better stored {len(report.kept)}"
        )
    for path in fronts:
        out.print(f"front written: {path}")
    out.print(f"wall time {time.monotonic() - t_start:.1f} s")
    return 0 if all(r.best is not None for r, _ in results) else 1


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
    args = parser.parse_args(argv)
    try:
        _check_numbers(args)
        shapes = _shapes(args)
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
