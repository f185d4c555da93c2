"""``qflash-tune``: tune the integer attention kernel for named workloads on this GPU.

Examples::

    qflash-tune --gpu h100 --workloads vit_b,swin_s                 # batches 1,8,64; DB under the user cache
    qflash-tune --gpu h100 --workloads A1,A2,A3 --batches 64 --trials 40 --db tuning_db
    qflash-tune --simulate tests/data/h100_sweep.csv --workloads vit_b --batches 8   # no GPU: replay a table
    qflash-tune --gpu h100 --workloads vit_b,swin_t --batches 8,64 --exhaustive --record sweep.csv
    qflash-tune --devices 0,1 --workloads swin_t --batches 8,64       # a process per GPU, sharing each study
    qflash-tune --storage postgresql://tuner:pw@dbhost/qflash --devices 0,1,2,3 --workloads A1,A2 --no-db
    qflash-tune --storage postgresql://tuner:pw@dbhost/qflash --export --gpu h100 --workloads A1,A2 --db tuning_db
    qflash-tune --gpu h100 --workloads vit_b --batches 64 --objective energy --trials 20   # µJ/call (NVML)
    qflash-tune --simulate tests/data/h100_energy.csv --workloads vit_b --batches 64 \\
        --objective pareto --pareto-axes latency,energy,sqnr

One Optuna study per (GPU, workload, batch, dtype, search space); see :mod:`.study` for the rules
(correctness first, SQNR floor, no re-measurement, resume) and :mod:`.measure` for the protocol.
This module is the argument parser and the dispatch; the modes are in :mod:`.commands`.
Exit status: 0 done, 1 a study found no config meeting the floor or the DB could not be written
(the trials stay in the study storage; ``--export`` writes it later), 2 usage error (unknown
workload, ``--gpu`` not the GPU present, an unwritable ``--db``, …), always without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from qflash_gen.keys import DTYPE_NAMES
from qflash_gen.reference import SQNR_FLOOR_DB
from qflash_gen.tune import commands
from qflash_gen.tune.setup import UsageError, check_numbers, grid_for, live, shapes_from, simulated

__all__ = ["UsageError", "build_parser", "main"]

DEFAULT_TRIALS = 50
DEFAULT_TIMEOUT_S = 120.0


def build_parser() -> argparse.ArgumentParser:
    from qflash_gen.tune.measure.base import TIMINGS
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
    p.add_argument(
        "--sqnr-floor",
        type=float,
        default=SQNR_FLOOR_DB,
        help=f"minimum SQNR in dB vs fp64 (default {SQNR_FLOOR_DB:g})",
    )
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
    p.add_argument(
        "--strategy",
        choices=("staged", "sampler"),
        default="staged",
        help="after the warm starts: staged (default: climb the grid's axes from the fastest config, tiling, "
        "then numeric variants, then register caps and heads per program; the sampler once that is done) "
        "or sampler (the sampler alone)",
    )
    p.add_argument(
        "--warm-start",
        choices=("all", "db", "none"),
        help="what each study measures first: all (default: the runtime's current pick, the DB's and every "
        "shipped DB's entries, the default, their variants), db (--db only: the default with --simulate), "
        "none (--try and the default only: a cold start; the default with --no-db)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="workload dtype (default fp16)")
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
        "--compile-jobs",
        type=int,
        default=max(1, min(15, (os.cpu_count() or 2) - 1)),
        help="parallel workers that compile configs ahead of their timing: a study's warm starts and each "
        "stage of its climb (as a batch, before it is timed), --exhaustive's whole grid (streamed: each "
        "config is timed as soon as it is compiled, beside the next compiles) (default: CPUs - 1, at most 15: one core stays with the timed worker; 0: "
        "compile each as it is measured; GPU only, --simulate compiles nothing)",
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
    p.add_argument("--device-label", help=argparse.SUPPRESS)  # set by --devices for each device runner it starts
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``qflash-tune`` (see the module doc)."""
    from qflash_gen.tune.measure.isolation import WorkerError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        check_numbers(args)
        try:  # the study objective: --objective pareto --pareto-axes latency,energy,sqnr is "pareto-energy"
            from qflash_gen.tune.objective import objective_for

            args.objective = objective_for(args.objective, args.pareto_axes)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        shapes = shapes_from(args)
        if args.devices is not None:
            return commands.Devices().run(args, shapes, argv=argv)
        if args.export:
            return commands.Export().run(args, shapes)
        measurer, dtype = simulated(args) if args.simulate else live(args)
        try:
            grid = grid_for(args, measurer)
            mode = commands.Sweep() if args.exhaustive else commands.Search()
            return mode.run(args, shapes, measurer=measurer, dtype=dtype, grid=grid)
        finally:
            measurer.close()  # no worker process outlives the command
    except UsageError as exc:
        print(f"qflash-tune: error: {exc}", file=sys.stderr)
        return 2
    except WorkerError as exc:  # the measuring worker cannot start: every candidate would fail alike
        print(f"qflash-tune: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        kept = (
            f"the rows measured are in {args.record}" if args.exhaustive else "finished trials are in the study storage"
        )
        if not (args.exhaustive or args.export or args.no_db):
            kept += " and each finished study's winner in the DB"
        print(f"qflash-tune: interrupted; {kept}, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
