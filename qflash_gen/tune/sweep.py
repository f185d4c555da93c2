"""Exhaustive sweep: measure every config of a grid on given shapes and record the table.

The recorded table is what ``qflash-tune --simulate`` replays and what the tuner's efficiency is
measured against (trials to reach within 3 % of the exhaustive best).  Run it on the GPU::

    python tools/sweep.py --gpu h100 --workloads vit_b,swin_t --batches 8,64 \\
        --grid sweep --record tests/data/h100_sweep.csv

(or ``qflash-tune --exhaustive --record FILE ...``).  Shapes that share N, D and masking share
one compile per config: each candidate is one worker job timing all of them.  ``--compile-jobs``
parallel workers compile the configs into Triton's on-disk cache while the one timed worker
measures each config as soon as its compile is done (:func:`.ahead.in_compile_order`), so the
timed worker mostly loads binaries and the GPU starts timing within seconds.  Every row is
written (and fsynced) as soon as it is measured; a rerun on the same file skips what is there,
so an interrupted sweep (``timeout -s INT``, Ctrl-C) keeps its rows and resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from qflash_gen.config import KernelConfig
from qflash_gen.tune.ahead import compiles_ahead, in_compile_order
from qflash_gen.tune.measure.base import Measurement, Measurer, ShapeSpec
from qflash_gen.tune.space import Grid, SearchSpace
from qflash_gen.tune.table import Table, TableWriter, read_table

# Rough cost model for the printed estimate -- an estimate, not a measurement.  A compile of this
# kernel: ~1.5 s of one CPU core on the H100 host; issue 17's H200 call had not compiled 2,664
# configs after 379 s on 15 workers (> 2.1 s each), so 2.5 s.  A measurement (oracle check +
# do_bench timing, warmup 10 ms + rep 50 ms): ~0.12 s (H100).  Starting the workers on a fresh
# machine (Python, torch, Triton, a CUDA context) and the first compile: ~30 s.  With compile
# workers the compiles run beside the measurements, so a config costs the larger of its share of
# the compile workers' time and its measurements; without, the timed worker compiles it first.
EST_COMPILE_S = 2.5
EST_MEASURE_S = 0.12
EST_START_S = 30.0
CALL_S = 570.0  # one device call: under its 10-minute limit (timeout -s INT 570)


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

    def config_costs(self, compile_jobs: int) -> list[float]:
        """Estimated seconds each config of ``todo`` adds (the module's cost model)."""
        if compile_jobs > 0:
            return [max(EST_COMPILE_S / compile_jobs, EST_MEASURE_S * len(s)) for _, _, s in self.todo]
        return [EST_COMPILE_S + EST_MEASURE_S * len(s) for _, _, s in self.todo]

    def estimate_s(self, compile_jobs: int) -> float:
        """Estimated wall time of the whole plan on a fresh machine (an estimate)."""
        if not self.todo:
            return 0.0
        return EST_START_S + sum(self.config_costs(compile_jobs))

    def fits(self, seconds: float, compile_jobs: int) -> tuple[int, int]:
        """Estimated (configs, rows) of the plan a call of ``seconds`` on a fresh machine records."""
        left, configs, rows = seconds - EST_START_S, 0, 0
        for (_, _, shapes), cost in zip(self.todo, self.config_costs(compile_jobs), strict=True):
            left -= cost
            if left < 0:
                break
            configs, rows = configs + 1, rows + len(shapes)
        return configs, rows


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
    stream: bool = True,
) -> int:
    """Measure everything in ``plan``, writing each row as it comes; returns rows written.

    With ``compile_jobs`` workers each config is measured as soon as its compile is done while
    the next ones compile (``stream``; ``stream=False``: all compiled first, the energy sweep).
    An exception (``KeyboardInterrupt``) stops the compiles at once; the rows written stay."""
    items = [(c, shapes) for _, c, shapes in plan.todo]
    written = 0
    with contextlib.closing(in_compile_order(measurer, items, compile_jobs, on_compiled, stream=stream)) as ready:
        for config, shapes in ready:
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
    if compiles_ahead(measurer, compile_jobs):  # the timings were taken beside running compiles
        env["compile_jobs"] = compile_jobs
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
            ahead = compiles_ahead(measurer, compile_jobs)
            comp = bar.add_task("compile", total=plan.n_configs, status="compiling", visible=ahead)
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

            try:
                run_plan(plan, measurer, writer, compile_jobs=compile_jobs, on_config=measured, on_compiled=compiled)
            except KeyboardInterrupt:
                console.print(
                    f"interrupted after {time.monotonic() - t0:.0f} s: {state['rows']} rows recorded into {record} "
                    f"({state['compiled']} configs compiled); the same command resumes"
                )
                raise
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
        f"with --compile-jobs {compile_jobs} on a fresh machine"
    )
    if plan.todo:
        configs, rows = plan.fits(CALL_S, compile_jobs)
        console.print(
            f"estimate: a {CALL_S:.0f} s call records about {configs} configs ({rows} rows); "
            "the cost model is in qflash_gen/tune/sweep.py"
        )
