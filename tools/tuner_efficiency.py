#!/usr/bin/env python
"""Tuner efficiency on a recorded table: measured configs needed to get within 3 % of the optimum.

For every (GPU, shape) in the table, the exhaustive optimum is the fastest row that is correct
and meets the SQNR floor.  Each sampler (TPE, the tuner's default, and random search) then runs
the real search loop (``qflash_gen.tune.study.run_study``, in-memory storage) against the table
with seeds 0..S-1, and we count the *measured* configs (duplicates are free, so they do not count)
until the best feasible latency found is within 3 % of the optimum.  Prints a markdown table:
median (and quartiles) over seeds, as a fraction of the grid too.  Random search's expected count
without replacement, (M + 1) / (k + 1) for k good configs among M, is shown as a check.

    python tools/tuner_efficiency.py tests/data/h100_sweep.csv --seeds 20 > docs/tuner-efficiency.md

Issue 4's goal: TPE reaches 3 % within 20 % of the grid.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402

from qflash_gen.tune.measure.simulate import SimulatedMeasurer  # noqa: E402
from qflash_gen.tune.space import Grid, SearchSpace  # noqa: E402
from qflash_gen.tune.study import run_study  # noqa: E402
from qflash_gen.tune.table import read_table  # noqa: E402
from qflash_gen.tune.trials import TrialRecord  # noqa: E402


def trials_to_reach(
    measurer: SimulatedMeasurer,
    shape,
    space: SearchSpace,
    target_us: float,
    *,
    sampler: str,
    seed: int,
    sqnr_floor: float,
) -> int | None:
    """Measured configs until the best feasible latency is <= ``target_us`` (None: never)."""

    def reached(history: list[TrialRecord]) -> bool:
        return any(r.measurement.feasible(sqnr_floor) and r.latency_us <= target_us for r in history)

    result = run_study(
        shape,
        measurer,
        space,
        storage=optuna.storages.InMemoryStorage(),
        name=f"eff-{sampler}-{seed}",
        budget=space.size,
        sqnr_floor=sqnr_floor,
        seed=seed,
        sampler=sampler,
        should_stop=reached,
    )
    for i, r in enumerate(result.history, start=1):
        if r.measurement.feasible(sqnr_floor) and r.latency_us <= target_us:
            return i
    return None


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", help="recorded table (CSV) from tools/sweep.py")
    p.add_argument("--seeds", type=int, default=20, help="seeds per sampler (>= 10; default 20)")
    p.add_argument("--sqnr-floor", type=float, default=30.0)
    p.add_argument("--within", type=float, default=0.03, help="relative distance to the optimum (default 0.03)")
    p.add_argument("--samplers", default="tpe,random")
    p.add_argument("--gpu", help="GPU of the table to use (when it holds several)")
    args = p.parse_args(argv)
    if args.seeds < 10:
        p.error(f"--seeds {args.seeds}: use at least 10 for a median worth reporting")
    table = read_table(args.table)
    measurer = SimulatedMeasurer(table, gpu=args.gpu)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    grid = Grid.from_configs(measurer.configs())

    synthetic = table.environment.get("synthetic")
    print(f"Tuner efficiency on `{Path(args.table).name}` (sha256 {table.sha256[:12]}), GPU {measurer.gpu}")
    if synthetic:
        print(f"\n**{synthetic}**")
    print(
        f"\nMeasured configs to reach within {args.within:.0%} of the exhaustive best (correct, SQNR >= "
        f"{args.sqnr_floor:g} dB); median [q1, q3] over {args.seeds} seeds; duplicates not counted.\n"
    )
    head = "| workload | batch | B,H,N,D | grid | feasible | within | "
    head += " | ".join(f"{s} median [q1, q3] | {s} % grid" for s in samplers)
    head += " | random expected |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for shape in measurer.shapes():
        space = SearchSpace(grid, shape.n, shape.d)
        rows = table.rows_for(measurer.gpu, shape)
        best = table.best(measurer.gpu, shape, args.sqnr_floor)
        if best is None:
            print(f"| {shape.workload} | {shape.batch} | {','.join(map(str, shape.shape))} | {space.size} | 0 | - |")
            continue
        target = best.measurement.latency_us * (1 + args.within)
        feasible = [r for r in rows if r.measurement.feasible(args.sqnr_floor)]
        good = sum(1 for r in feasible if r.measurement.latency_us <= target)
        cells = []
        for sampler in samplers:
            counts = []
            for seed in range(args.seeds):
                n = trials_to_reach(
                    measurer, shape, space, target, sampler=sampler, seed=seed, sqnr_floor=args.sqnr_floor
                )
                counts.append(float(n if n is not None else space.size))
            q1, med, q3 = _quartiles(counts)
            cells.append(f"{med:.0f} [{q1:.0f}, {q3:.0f}] | {100 * med / space.size:.0f}%")
        expected = (space.size + 1) / (good + 1)
        print(
            f"| {shape.workload} | {shape.batch} | {','.join(map(str, shape.shape))} | {space.size} | "
            f"{len(feasible)} | {good} | " + " | ".join(cells) + f" | {expected:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
