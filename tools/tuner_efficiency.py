#!/usr/bin/env python
"""Tuner efficiency on a recorded table: measured configs needed to get within 3 % of the optimum.

For every (GPU, shape) in the table, the exhaustive optimum is the fastest row that is correct
and meets the SQNR floor.  The real search loop (``qflash_gen.tune.study.run_study``, in-memory
storage) then runs against the table with seeds 0..S-1 in each of these modes, and we count the
*measured* configs (warm starts included; duplicates are free, so they do not count) until the
best feasible latency found is within 3 % of the optimum:

* ``cold``: the default search of ``qflash-tune`` with no DB (``--warm-start none``): the default
  config mapped into the table's space and its variants, then the staged climb, then TPE;
* ``warm``: the same with the warm starts of a run on a card with this checkout's shipped DBs
  (``--warm-start all``: the runtime's current pick, every shipped file's entries mapped into
  the table's space, the default, their variants);
* ``anywhere``: the staged climb and TPE from one config of the table drawn at random (by the
  seed): how the search does from a start that knows nothing;
* ``tpe``, ``random``: the sampler alone from the first trial (no warm start, no climb): the
  search before issue 17, and the baseline.

Prints a markdown table: median [q1, q3] over seeds, and as a fraction of the grid (counted in
distinct kernels: a single pass's rescale twins are one).  Random
search's expected count without replacement, (M + 1) / (k + 1) for k good configs among M, is
shown as a check.

    python tools/tuner_efficiency.py tests/data/h100_sweep.csv --seeds 10

Issue 17's goal: the default search reaches 3 % within 20 % of the table's configs (median).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402

from qflash_gen.tune.incumbent import current_pick  # noqa: E402
from qflash_gen.tune.measure.simulate import SimulatedMeasurer  # noqa: E402
from qflash_gen.tune.plan import warm_starts  # noqa: E402
from qflash_gen.tune.space import Grid, SearchSpace  # noqa: E402
from qflash_gen.tune.study import run_study  # noqa: E402
from qflash_gen.tune.table import read_table  # noqa: E402
from qflash_gen.tune.trials import TrialRecord  # noqa: E402

MODES = {  # mode -> (warm start, strategy, sampler)
    "cold": ("none", "staged", "tpe"),
    "warm": ("all", "staged", "tpe"),
    "anywhere": ("one random config", "staged", "tpe"),
    "tpe": (None, "sampler", "tpe"),
    "random": (None, "sampler", "random"),
}


def enqueue_for(
    mode: str, measurer: SimulatedMeasurer, shape, space: SearchSpace, db_dir: Path, seed: int = 0
) -> list:
    """The warm starts of ``mode`` for ``shape`` (``db_dir``: an empty user DB)."""
    warm = MODES[mode][0]
    if warm is None:
        return []
    if mode == "anywhere":
        return [random.Random(seed).choice(space.configs())]
    dtype = measurer.protocol.get("out_dtype", "fp16")
    current = current_pick(shape, dtype, measurer.gpu, db_dir) if warm == "all" else None
    return warm_starts(space, shape, measurer.gpu, dtype, target=db_dir, mode=warm, current=current)


def trials_to_reach(
    measurer: SimulatedMeasurer,
    shape,
    space: SearchSpace,
    target_us: float,
    *,
    mode: str,
    seed: int,
    sqnr_floor: float,
    enqueue: Sequence = (),
) -> int | None:
    """Measured configs until the best feasible latency is <= ``target_us`` (None: never)."""

    def reached(history: list[TrialRecord]) -> bool:
        return any(r.measurement.feasible(sqnr_floor) and r.latency_us <= target_us for r in history)

    _, strategy, sampler = MODES[mode]
    result = run_study(
        shape,
        measurer,
        space,
        storage=optuna.storages.InMemoryStorage(),
        name=f"eff-{mode}-{seed}",
        budget=space.size,
        sqnr_floor=sqnr_floor,
        seed=seed,
        sampler=sampler,
        strategy=strategy,
        enqueue=enqueue,
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


def efficiency(
    table_path: str | Path,
    *,
    seeds: int = 10,
    modes: Sequence[str] = ("cold",),
    sqnr_floor: float = 30.0,
    within: float = 0.03,
    gpu: str | None = None,
) -> list[dict]:
    """One dict per shape of the table: the grid, the optimum and, per mode, the counts per seed."""
    table = read_table(table_path)
    measurer = SimulatedMeasurer(table, gpu=gpu)
    grid = Grid.from_configs(measurer.configs())
    rows = []
    with tempfile.TemporaryDirectory() as empty_db:
        for shape in measurer.shapes():
            space = SearchSpace(grid, shape.n, shape.d)
            best = table.best(measurer.gpu, shape, sqnr_floor)
            kernels = len({space.canonical(c) for c in space.configs()})  # a single pass's rescale twins: one
            row = {"shape": shape, "grid": kernels, "best": best, "counts": {}}
            rows.append(row)
            if best is None:
                continue
            target = best.measurement.latency_us * (1 + within)
            feasible = [r for r in table.rows_for(measurer.gpu, shape) if r.measurement.feasible(sqnr_floor)]
            row["feasible"] = len(feasible)
            row["within"] = sum(1 for r in feasible if r.measurement.latency_us <= target)
            for mode in modes:
                row["counts"][mode] = [
                    trials_to_reach(
                        measurer,
                        shape,
                        space,
                        target,
                        mode=mode,
                        seed=seed,
                        sqnr_floor=sqnr_floor,
                        enqueue=enqueue_for(mode, measurer, shape, space, Path(empty_db), seed),
                    )
                    or kernels
                    for seed in range(seeds)
                ]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", help="recorded table (CSV) from tools/sweep.py")
    p.add_argument("--seeds", type=int, default=10, help="seeds per mode (>= 10; default 10)")
    p.add_argument("--sqnr-floor", type=float, default=30.0)
    p.add_argument("--within", type=float, default=0.03, help="relative distance to the optimum (default 0.03)")
    p.add_argument("--modes", default="cold,warm,anywhere,tpe,random", help=f"comma-separated, of {sorted(MODES)}")
    p.add_argument("--samplers", help=argparse.SUPPRESS)  # old name: tpe,random
    p.add_argument("--gpu", help="GPU of the table to use (when it holds several)")
    args = p.parse_args(argv)
    if args.seeds < 10:
        p.error(f"--seeds {args.seeds}: use at least 10 for a median worth reporting")
    modes = [m.strip() for m in (args.samplers or args.modes).split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"--modes {bad}: known modes are {sorted(MODES)}")
    table = read_table(args.table)
    rows = efficiency(
        args.table, seeds=args.seeds, modes=modes, sqnr_floor=args.sqnr_floor, within=args.within, gpu=args.gpu
    )
    gpu = SimulatedMeasurer(table, gpu=args.gpu).gpu
    synthetic = table.environment.get("synthetic")
    print(f"Tuner efficiency on `{Path(args.table).name}` (sha256 {table.sha256[:12]}), GPU {gpu}")
    if synthetic:
        print(f"\n**{synthetic}**")
    print(
        f"\nMeasured configs to reach within {args.within:.0%} of the exhaustive best (correct, SQNR >= "
        f"{args.sqnr_floor:g} dB); median [q1, q3] over {args.seeds} seeds; warm starts count, duplicates do not.\n"
    )
    head = "| workload | batch | B,H,N,D | grid | feasible | within | "
    head += " | ".join(f"{m} median [q1, q3] | {m} % grid" for m in modes)
    head += " | random expected |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for row in rows:
        shape, size = row["shape"], row["grid"]
        lead = f"| {shape.workload} | {shape.batch} | {','.join(map(str, shape.shape))} | {size} |"
        if row["best"] is None:
            print(f"{lead} 0 | - |")
            continue
        cells = []
        for mode in modes:
            q1, med, q3 = _quartiles([float(c) for c in row["counts"][mode]])
            cells.append(f"{med:.0f} [{q1:.0f}, {q3:.0f}] | {100 * med / size:.0f}%")
        expected = (size + 1) / (row["within"] + 1)
        print(f"{lead} {row['feasible']} | {row['within']} | " + " | ".join(cells) + f" | {expected:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
