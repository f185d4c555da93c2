#!/usr/bin/env python
"""Record latency, SQNR and energy per call for a small grid on this GPU (a table to replay).

    python tools/energy_sweep.py --gpu h100 --record tests/data/h100_energy.csv

Writes the measurement table of ``tools/sweep.py`` (what ``qflash-tune --simulate`` replays) with
four more columns: ``energy_uj`` (total µJ per call), ``energy_spread_uj`` (max - min of the
rounds), ``above_idle_uj`` and ``idle_w`` (qflash_gen/energy.py: NVML's total-energy counter around
>= ``--energy-seconds`` of CUDA-graph replay, ``--energy-repeats`` rounds, each with an idle span).
Each candidate is first checked bit for bit against the oracle and timed as in the sweep
(do_bench, L2 flushed); the shapes sharing (N, D, mask) are one worker job, their loops interleaved
in each round with one shared idle span.  Rows are written as measured; a rerun resumes the file.

Default grid (ENERGY_GRID, 12 configs): block_m 32/64 x block_n 64/256 x exp shift/poly2, 4 warps,
2 stages, rescale shift8 -> 8 configs for ViT (N=197) and 4 for Swin (N=49: block_n 64 covers the
row); the default config m64n64w4s2 shift is among them.  Shapes: vit_b and the four swin_t stages
at batch 64.  ``--dry-run`` prints the plan and a time estimate.  Needs nvidia-ml-py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qflash_gen import workloads  # noqa: E402
from qflash_gen.gpu import check_gpu_name, smem_limit  # noqa: E402
from qflash_gen.tune.space import Grid  # noqa: E402

ENERGY_GRID = Grid(
    block_m=(32, 64),
    block_n=(64, 256),
    num_warps=(4,),
    num_stages=(2,),
    exp=("shift", "poly2"),
    rescale=("shift8",),
)
# Per energy span (loop or idle): the loop's length x 1.05 margin, 0.1 s settle, ~one counter step.
SPAN_OVERHEAD_S = 0.25
PER_JOB_S = 1.0  # oracle check, do_bench timing and graph capture per shape, worker round trip


def estimate_s(plan, energy_s: float, repeats: int) -> float:
    """Rough GPU time of a plan: per job and round one idle span plus one loop per shape."""
    total = 0.0
    for _, _, shapes in plan.todo:
        spans = repeats * (1 + len(shapes))
        total += spans * (energy_s + SPAN_OVERHEAD_S) + PER_JOB_S * len(shapes)
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", required=True, help="short GPU name; must be the GPU present")
    p.add_argument("--record", required=True, help="table (CSV) to write; resumed if it exists")
    p.add_argument("--workloads", default="vit_b,swin_t")
    p.add_argument("--batches", default="64")
    p.add_argument("--energy-seconds", type=float, default=1.0, help="least GPU time of each loop (default 1 s)")
    p.add_argument("--energy-repeats", type=int, default=2, help="rounds of idle + loops per config (default 2)")
    p.add_argument("--compile-jobs", type=int, default=min(14, os.cpu_count() or 1))
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per candidate job")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate, measure nothing")
    args = p.parse_args(argv)

    from qflash_gen.tune import devices
    from qflash_gen.tune.measure import GPUMeasurer, Protocol, ShapeSpec
    from qflash_gen.tune.sweep import make_plan, run_plan
    from qflash_gen.tune.table import TableWriter

    try:
        shapes = [
            ShapeSpec.of(w, b) for w in workloads.resolve(args.workloads) for b in workloads.parse_batches(args.batches)
        ]
        check_gpu_name(args.gpu, argument="--gpu")
        protocol = Protocol(
            seed=args.seed, energy=True, energy_min_s=args.energy_seconds, energy_repeats=args.energy_repeats
        )
    except ValueError as exc:
        print(f"energy_sweep.py: error: {exc}", file=sys.stderr)
        return 2
    plan = make_plan(shapes, ENERGY_GRID, args.gpu, None, smem_limit=smem_limit(args.gpu), seed=args.seed)
    for g in plan.groups:
        n_cfg = len(plan.configs[(g.n, g.d, g.masked)])
        print(f"N={g.n} D={g.d} masked={g.masked}: {n_cfg} configs x [{', '.join(s.label() for s in g.shapes)}]")
    est = estimate_s(plan, args.energy_seconds, args.energy_repeats)
    print(
        f"{plan.n_configs} configs, {plan.n_measurements} measurements; estimated GPU time {est / 60:.1f} min "
        f"(energy loops of >= {args.energy_seconds:g} s, {args.energy_repeats} rounds) + compile"
    )
    if args.dry_run:
        return 0

    present, what = devices.present_gpu()
    if present != args.gpu:
        print(f"energy_sweep.py: error: --gpu {args.gpu} but {what}", file=sys.stderr)
        return 2
    from qflash_gen.energy import EnergyUnavailable, probe

    try:
        counter = probe()
    except EnergyUnavailable as exc:
        print(f"energy_sweep.py: error: {exc}", file=sys.stderr)
        return 2
    measurer = GPUMeasurer(args.gpu, protocol, timeout_s=args.timeout)
    try:
        env = {
            **measurer.environment(),
            "energy_counter": counter,
            "grid": ENERGY_GRID.to_dict(),
            "recorded_by": "tools/energy_sweep.py",
        }
        with TableWriter(args.record, measurer.protocol, env, energy=True) as writer:
            plan = make_plan(shapes, ENERGY_GRID, args.gpu, writer, smem_limit=smem_limit(args.gpu))
            print(f"to measure: {plan.n_measurements} rows ({writer.n_done} already in {args.record})", flush=True)
            t0 = time.monotonic()

            def done(config, shapes_, results) -> None:
                for s, m in zip(shapes_, results, strict=True):
                    if m.ok and m.energy_uj is not None:
                        what = (
                            f"{m.latency_us:.1f} us, {m.energy_uj:.1f} uJ (+-{(m.energy_spread_uj or 0) / 2:.1f}, "
                            f"above idle {m.above_idle_uj:.1f}), idle {m.idle_w:.1f} W, {m.sqnr_db:.1f} dB"
                        )
                    else:
                        what = f"FAILED: {m.error}"
                    print(f"{time.monotonic() - t0:6.0f} s  {s.label():<14} {config.short():<44} {what}", flush=True)

            # compiled first, not streamed: the energy loops and idle spans need a quiet GPU
            run_plan(plan, measurer, writer, compile_jobs=args.compile_jobs, on_config=done, stream=False)
        print(f"recorded {plan.n_measurements} rows in {time.monotonic() - t0:.0f} s into {args.record}")
    finally:
        measurer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
