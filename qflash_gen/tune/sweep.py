"""Exhaustive sweep: measure every config of a grid on given shapes and record the table.

The recorded table is what ``qflash-tune --simulate`` replays and what the tuner's efficiency is
measured against (trials to reach within 3 % of the exhaustive best).  Run it on the GPU::

    python tools/sweep.py --gpu h100 --workloads vit_b,swin_t --batches 8,64 \\
        --grid sweep --record tests/data/h100_sweep.csv

(or ``qflash-tune --exhaustive --record FILE ...``).  Shapes that share N, D and masking share
one compile per config: each candidate is one worker job timing all of them, and the configs are
compiled ahead by ``--compile-jobs`` parallel workers into Triton's on-disk cache (:mod:`.ahead`),
so the timed worker mostly loads binaries.  Every row is written (and fsynced) as soon as it is
measured; a rerun on the same file skips what is there, so an interrupted sweep resumes.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from qflash_gen.config import KernelConfig
from qflash_gen.tune.ahead import compile_ahead
from qflash_gen.tune.measure.base import Measurement, Measurer, ShapeSpec
from qflash_gen.tune.space import Grid, SearchSpace
from qflash_gen.tune.table import Table, TableWriter, read_table

# Rough cost model for the printed estimate (H100, do_bench warmup 10 ms + rep 50 ms): a compile
# of this kernel takes ~1.5 s of one CPU core, a measurement (oracle check + timing) ~0.12 s.
EST_COMPILE_S = 1.5
EST_MEASURE_S = 0.12


@dataclasses.dataclass(frozen=True)
class Group:
    """Shapes sharing (N, D, masked): one search space, one compile per config."""

    n: int
    d: int
    masked: bool
    shapes: tuple[ShapeSpec, ...]


def group_shapes(shapes: Sequence[ShapeSpec]) -> list[Group]:
    groups: dict[tuple[int, int, bool], list[ShapeSpec]] = {}
    for s in shapes:
        groups.setdefault((s.n, s.d, s.masked), []).append(s)
    return [Group(n, d, m, tuple(v)) for (n, d, m), v in groups.items()]


@dataclasses.dataclass
class Plan:
    """What a sweep will do: per group the configs and the (config, shapes) still to measure."""

    groups: list[Group]
    configs: dict[tuple[int, int, bool], list[KernelConfig]]
    todo: list[tuple[Group, KernelConfig, tuple[ShapeSpec, ...]]]

    @property
    def n_measurements(self) -> int:
        return sum(len(shapes) for _, _, shapes in self.todo)

    @property
    def n_configs(self) -> int:
        return len(self.todo)

    def estimate_s(self, compile_jobs: int) -> float:
        compile_s = self.n_configs * EST_COMPILE_S / max(1, compile_jobs)
        return compile_s + self.n_measurements * EST_MEASURE_S


def make_plan(
    shapes: Sequence[ShapeSpec],
    grid: Grid,
    gpu: str,
    writer: TableWriter | _Done | None,
    *,
    smem_limit: int | None = None,
    max_configs: int | None = None,
    seed: int = 0,
) -> Plan:
    """Every feasible config of ``grid`` per shape group, less the rows already recorded.

    ``max_configs`` caps the configs per group by a seeded random subset (the table then is not
    exhaustive; its environment line records the cap)."""
    groups = group_shapes(shapes)
    configs: dict[tuple[int, int, bool], list[KernelConfig]] = {}
    todo = []
    for g in groups:
        space = SearchSpace(grid, g.n, g.d, smem_limit=smem_limit)
        # one row per compiled kernel: a single pass's rescale twins run the same kernel, so the
        # space's canonical one is measured and a replay finds the others by Table.lookup
        cfgs = [c for c in space.configs() if space.canonical(c) == c]
        if max_configs is not None and len(cfgs) > max_configs:
            keep = {c.hash for c in random.Random(seed).sample(cfgs, max_configs)}
            cfgs = [c for c in cfgs if c.hash in keep]
        configs[(g.n, g.d, g.masked)] = cfgs
        for c in cfgs:
            left = tuple(s for s in g.shapes if writer is None or not writer.done(gpu, s, c))
            if left:
                todo.append((g, c, left))
    return Plan(groups, configs, todo)


def run_plan(
    plan: Plan,
    measurer: Measurer,
    writer: TableWriter,
    *,
    compile_jobs: int = 0,
    on_config: Callable[[KernelConfig, Sequence[ShapeSpec], list[Measurement]], None] | None = None,
    on_compiled: Callable[[KernelConfig, str | None], None] | None = None,
) -> int:
    """Measure everything in ``plan``, writing each row as it comes; returns rows written."""
    compile_ahead(measurer, [(c, shapes) for _, c, shapes in plan.todo], compile_jobs, on_compiled)
    written = 0
    for _, config, shapes in plan.todo:
        results = measurer.measure_many(config, shapes)
        for s, m in zip(shapes, results, strict=True):
            writer.write(measurer.gpu, s, config, m)
            written += 1
        if on_config is not None:
            on_config(config, shapes, results)
    return written


def sweep(
    measurer: Measurer,
    shapes: Sequence[ShapeSpec],
    grid: Grid,
    record: str | os.PathLike[str],
    *,
    smem_limit: int | None = None,
    max_configs: int | None = None,
    compile_jobs: int = 0,
    environment: dict | None = None,
    dry_run: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> Plan:
    """Plan and run an exhaustive sweep into the table ``record`` (created or resumed)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True, soft_wrap=True)
    env = dict(environment or {})
    if max_configs is not None:
        env["max_configs"] = max_configs
    env["grid"] = grid.to_dict()
    if dry_run:  # plan against what the file holds, without creating or touching it
        existing = read_table(record) if Path(record).is_file() else None
        done = _Done(existing, measurer.gpu)
        plan = make_plan(shapes, grid, measurer.gpu, done, smem_limit=smem_limit, max_configs=max_configs, seed=seed)
        _describe(console, plan, record, done.n_done, compile_jobs)
        return plan
    with TableWriter(record, measurer.protocol, env) as writer:
        plan = make_plan(shapes, grid, measurer.gpu, writer, smem_limit=smem_limit, max_configs=max_configs, seed=seed)
        _describe(console, plan, record, writer.n_done, compile_jobs)
        if not plan.todo:
            return plan
        t0 = time.monotonic()
        plain = not console.is_terminal  # a log: print a line now and then instead of a live bar
        with Progress(
            TextColumn("[bold]sweep[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not progress or plain,
        ) as bar:
            comp = bar.add_task("compile", total=plan.n_configs, status="precompiling", visible=compile_jobs > 0)
            task = bar.add_task("measure", total=plan.n_measurements, status="")
            state = {"failed": 0, "rows": 0, "configs": 0, "compiled": 0}

            def compiled(config: KernelConfig, error: str | None) -> None:
                bar.advance(comp)
                state["compiled"] += 1
                if plain and progress and state["compiled"] % 50 == 0:
                    console.print(f"compiled {state['compiled']}/{plan.n_configs} ({time.monotonic() - t0:.0f} s)")

            def measured(config: KernelConfig, shapes: Sequence[ShapeSpec], results: list[Measurement]) -> None:
                state["failed"] += sum(1 for m in results if not m.ok)
                state["rows"] += len(shapes)
                state["configs"] += 1
                ok = [m.latency_us for m in results if m.ok and m.latency_us is not None]
                lat = f"{min(ok):.1f} us" if ok else "failed"
                status = f"{config.short()}: {lat}  ({state['failed']} failed)"
                bar.update(task, advance=len(shapes), status=escape(status))
                if plain and progress and (state["configs"] % 20 == 0 or state["rows"] == plan.n_measurements):
                    elapsed = time.monotonic() - t0
                    console.print(
                        escape(
                            f"measured {state['rows']}/{plan.n_measurements} rows, {state['failed']} failed, "
                            f"{elapsed:.0f} s; last {status}"
                        )
                    )

            run_plan(plan, measurer, writer, compile_jobs=compile_jobs, on_config=measured, on_compiled=compiled)
        console.print(f"recorded {plan.n_measurements} rows in {time.monotonic() - t0:.0f} s into {record}")
    return plan


class _Done:
    """Read-only stand-in for a TableWriter's ``done`` (dry runs)."""

    def __init__(self, table: Table | None, gpu: str) -> None:
        self._keys = {r.key() for r in table.rows} if table is not None else set()
        self.n_done = len(self._keys)

    def done(self, gpu: str, shape: ShapeSpec, config: KernelConfig) -> bool:
        return (gpu, *shape.match_key(), config.hash) in self._keys


def _describe(console, plan: Plan, record, n_done: int, compile_jobs: int) -> None:
    from rich.markup import escape

    for g in plan.groups:
        n_cfg = len(plan.configs[(g.n, g.d, g.masked)])
        labels = ", ".join(s.label() for s in g.shapes)
        console.print(escape(f"N={g.n} D={g.d} masked={g.masked}: {n_cfg} configs x [{labels}]"))
    console.print(
        f"to measure: {plan.n_configs} configs, {plan.n_measurements} measurements "
        f"({n_done} rows already in {record}); estimated {plan.estimate_s(compile_jobs) / 60:.1f} min "
        f"on an H100 with --compile-jobs {compile_jobs}"
    )
