"""``qflash-tune`` arguments turned into what the modes run: shapes, measurer, grid, storage.

Every function here raises :class:`UsageError` (exit status 2) for a bad argument, with the
flag named."""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

from qflash_gen import workloads
from qflash_gen.gpu import check_gpu_name, smem_limit
from qflash_gen.tune import devices


class UsageError(Exception):
    """Bad arguments: printed as ``qflash-tune: error: ...``, exit status 2."""


def shapes_from(args: argparse.Namespace):
    from qflash_gen.tune.measure.base import ShapeSpec

    try:
        wls = workloads.resolve(args.workloads)
    except ValueError as exc:
        raise UsageError(f"--workloads: {exc}") from None
    try:
        batches = workloads.parse_batches(args.batches)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return [ShapeSpec.of(w, b) for w in wls for b in batches]



def check_numbers(args: argparse.Namespace) -> None:
    if args.trials < 1:
        raise UsageError(f"--trials {args.trials} must be >= 1")
    if not args.timeout > 0:
        raise UsageError(f"--timeout {args.timeout} must be > 0 seconds")
    if not math.isfinite(args.sqnr_floor):
        raise UsageError(f"--sqnr-floor {args.sqnr_floor} must be a finite number of dB")
    if args.compile_jobs < 0:
        raise UsageError(f"--compile-jobs {args.compile_jobs} must be >= 0 (0: no compiling ahead)")
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



def simulated(args: argparse.Namespace):
    """``--simulate FILE``: the replaying measurer and the workload dtype its table was recorded with."""
    from qflash_gen.tune import objective
    from qflash_gen.tune.measure.simulate import SimulatedMeasurer

    try:
        measurer = SimulatedMeasurer(args.simulate, gpu=args.gpu, delay_s=args.simulate_delay)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if objective.needs_energy(args.objective) and not measurer.table.has_energy:
        raise UsageError(
            f"--objective {args.objective}: the table {args.simulate} has no energy_uj column (recorded without "
            "energy); replay a table recorded by tools/energy_sweep.py"
        )
    dtype = measurer.protocol.get("out_dtype", "fp16")  # a workload's kernel output has its dtype
    if args.dtype and args.dtype != dtype:
        raise UsageError(f"--dtype {args.dtype}: the table {args.simulate} was recorded with {dtype} output ({dtype})")
    return measurer, dtype


def live(args: argparse.Namespace):
    """The GPU measurer for the GPU present (``--gpu`` must name it) and the workload dtype."""
    from qflash_gen.tune import objective
    from qflash_gen.tune.measure.base import Protocol
    from qflash_gen.tune.measure.gpu import GPUMeasurer

    if args.gpu is not None:
        try:
            check_gpu_name(args.gpu, argument="--gpu")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    present, what = devices.present_gpu()
    if present is None:
        named = f"--gpu {args.gpu}: " if args.gpu else ""
        raise UsageError(
            f"{named}{what}; tuning measures on the GPU it names. Without a GPU, replay a table recorded "
            "on one: --simulate FILE"
        )
    if args.gpu is not None and args.gpu != present:
        raise UsageError(f"--gpu {args.gpu} does not match the GPU present: {what}")
    energy = objective.needs_energy(args.objective)
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
            out_dtype=dtype,
            seed=args.seed,
            energy=energy,
            energy_min_s=args.energy_seconds,
            energy_repeats=args.energy_repeats,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return GPUMeasurer(present, protocol, timeout_s=args.timeout), dtype




def grid_for(args: argparse.Namespace, measurer: Any):
    """The search grid: ``--grid``, else a replayed table's own, else ``tune`` (``sweep`` with
    ``--exhaustive``); ``--p-bits`` and ``--max-regs`` replace those axes."""
    from qflash_gen.tune.measure.simulate import SimulatedMeasurer
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




def smem_of(gpu: str) -> int | None:
    return smem_limit(gpu)


def open_storage_arg(args: argparse.Namespace):
    """``--storage`` opened: ``(storage, description)``."""
    from qflash_gen.tune.storage import open_storage

    try:
        return open_storage(args.storage)
    except ValueError as exc:
        raise UsageError(str(exc)) from None




def warm_start_mode(args: argparse.Namespace) -> str:
    """``--warm-start`` as given, else ``none`` with ``--no-db`` (it reads no DB either), ``db``
    with ``--simulate``, ``all`` otherwise (qflash_gen.tune.plan)."""
    given = getattr(args, "warm_start", None)
    if given:
        return given
    if getattr(args, "no_db", False):
        return "none"
    return "db" if getattr(args, "simulate", None) else "all"


def tuner_settings(args: argparse.Namespace) -> dict[str, Any]:
    """How the search ran (stored on each study with the measurer's record, for ``--export``)."""
    from qflash_gen.tune import objective

    return {
        "objective": args.objective,
        "sampler": args.sampler or ("nsga2" if objective.is_pareto(args.objective) else "tpe"),
        "seed": args.seed,
        "sqnr_floor": args.sqnr_floor,
        "strategy": getattr(args, "strategy", None) or "staged",
        "warm_start": warm_start_mode(args),
    }


def study_settings(args: argparse.Namespace):
    """The :class:`~qflash_gen.tune.study.StudySettings` of every study this run opens."""
    from qflash_gen.tune.study import StudySettings

    try:
        return StudySettings(
            budget=args.trials, objective=args.objective, sqnr_floor=args.sqnr_floor, seed=args.seed,
            sampler=args.sampler, strategy=getattr(args, "strategy", None) or "staged",
            compile_jobs=args.compile_jobs,
        )  # fmt: skip
    except ValueError as exc:
        raise UsageError(str(exc)) from None
