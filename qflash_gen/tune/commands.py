"""The modes of ``qflash-tune``, each a small command over the tuner's public functions.

* :class:`Search` -- the default: open every study (a slot in each), then search each and write
  its winner;
* :class:`Export` -- ``--export``: write the DB from the studies in ``--storage``, measuring nothing;
* :class:`Devices` -- ``--devices``: one device runner (a ``qflash-tune`` process) per GPU;
* :class:`Sweep` -- ``--exhaustive``: measure a whole grid into a recorded table.
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from qflash_gen.gpu import check_gpu_name
from qflash_gen.tune import devices
from qflash_gen.tune.plan import make_plans
from qflash_gen.tune.setup import (
    UsageError,
    grid_for,
    open_storage_arg,
    simulated,
    smem_of,
    study_settings,
    tuner_settings,
)
from qflash_gen.tune.summary import consoles, fmt_us, report_db, summary_table


class Command:
    """One mode: :meth:`run` returns the exit status (UsageError for a bad argument)."""

    def run(self, args: argparse.Namespace, shapes: list, **context: Any) -> int:
        raise NotImplementedError


class Search(Command):
    """Tune: a slot in every study of the run, then each study in turn: its search, its final
    head-to-head and its DB write (:class:`StudyEnd`), so a run cut short keeps every study it
    finished; the summary of them all at the end."""

    def run(self, args: argparse.Namespace, shapes: list, *, measurer: Any, dtype: str, grid: Any, **_: Any) -> int:
        from rich.markup import escape

        from qflash_gen.tune import incumbent
        from qflash_gen.tune.winners import check_writable, verdicts_for

        out, err = consoles()
        shapes = self.replayable(args, measurer, shapes, err)
        storage, storage_desc = open_storage_arg(args)
        if not args.no_db:
            check_writable(args, measurer.gpu)  # before measuring anything
        record = self.measurer_record(args, measurer, dtype)
        plans = make_plans(args, measurer.gpu, dtype, shapes, grid, enqueue_db=True)
        label = f", device {args.device_label}" if args.device_label else ""
        err.print(escape(f"qflash-tune: gpu {measurer.gpu}{label}, {len(plans)} studies, storage {storage_desc}"))
        t_start = time.monotonic()
        results: list = []
        runs = self.open_studies(args, plans, storage, record)
        try:
            currents = {
                p.name: incumbent.settle(run.study, p.current, p.space, measurer, p.shape)
                for p, run in zip(plans, runs, strict=True)
            }
            end = StudyEnd(args, measurer, dtype, record, storage, storage_desc, err, currents)
            _search_all(args, measurer, plans, runs, results, err, on_done=end)
        finally:
            for run in runs:
                run.close()
        if args.no_db:
            written = None
            verdicts = verdicts_for(args, results, currents, end.duels)
        else:
            written = end.written
            results, verdicts = written.results, written.verdicts
        summary_table(args, measurer.gpu, measurer.provenance.get("source"), results, out, verdicts)
        if written is not None:
            report_db(out, written.report, written.fronts, written.notes)
        out.print(f"wall time {time.monotonic() - t_start:.1f} s")
        if written is not None and written.error:
            print(f"qflash-tune: error: {written.error}", file=sys.stderr)
            return 1
        return 0 if all(r.best is not None for r, _ in results) else 1

    @staticmethod
    def replayable(args: argparse.Namespace, measurer: Any, shapes: list, err: Any) -> list:
        """The shapes a replayed table holds (the others are skipped, with a note); all of them
        for a live measurer."""
        from rich.markup import escape

        from qflash_gen.tune.measure.simulate import SimulatedMeasurer

        if not isinstance(measurer, SimulatedMeasurer):
            return shapes
        missing = [s for s in shapes if not measurer.has_shape(s)]
        for s in missing:
            err.print(
                f"[yellow]{escape(f'skipped {s.label()} {s.shape}: the table {args.simulate} has no rows for it')}[/]"
            )
        kept = [s for s in shapes if s not in missing]
        if not kept:
            have = ", ".join(f"{s.label()} {s.shape}" for s in measurer.shapes())
            raise UsageError(
                f"--simulate {args.simulate}: none of the requested shapes is in the table; it holds {have}"
            )
        return kept

    @staticmethod
    def measurer_record(args: argparse.Namespace, measurer: Any, dtype: str) -> dict[str, Any]:
        """How this process measures: stored on each study, so ``qflash-tune --export`` can write
        the DB entry on a machine that measured nothing."""
        return {
            "gpu": measurer.gpu,
            "dtype": dtype,
            "protocol": measurer.protocol,
            "provenance": measurer.provenance,
            "tuner": tuner_settings(args),
        }

    @staticmethod
    def open_studies(args: argparse.Namespace, plans: list, storage: Any, record: dict[str, Any]) -> list:
        """A slot in every study first: processes started together each spend their own budget in
        every study, however far apart their progress drifts (``study.open_study``)."""
        from qflash_gen.tune import study

        environment = record["provenance"].get("environment") or {}
        worker_info: dict[str, Any] = {"device_name": environment.get("device")}
        if args.device_label:
            worker_info["device"] = args.device_label
        settings = study_settings(args)
        runs: list = []
        try:
            for s, space, name, _ in plans:
                runs.append(
                    study.open_study(
                        s,
                        space,
                        storage=storage,
                        name=name,
                        settings=settings,
                        worker_info=worker_info,
                        study_attrs={"measurer": record},
                    )  # fmt: skip
                )
        except BaseException:
            for run in runs:
                run.close()
            raise
        return runs


@dataclasses.dataclass
class StudyEnd:
    """What :class:`Search` does as each study's search ends, before the next study starts: the
    final head-to-head of its best and the runtime's current pick (a GPU measurer's,
    :func:`.incumbent.head_to_head`: stored on the study, so ``--export`` and a resumed run use
    it), then its DB write (:func:`.winners.write_winners`, unless ``--no-db``).  An interrupt
    after study k leaves studies 1..k written.  ``duels`` (by study name) and ``written`` (the
    writes folded together, :meth:`.winners.Written.add`) make the run's summary; after a DB
    error no later study is written (the error says how to write them: ``--export``)."""

    args: argparse.Namespace
    measurer: Any
    dtype: str
    record: dict[str, Any]
    storage: Any
    storage_desc: str
    err: Any
    currents: dict[str, Any]
    duels: dict[str, Any] = dataclasses.field(default_factory=dict)
    written: Any = None  # winners.Written

    def __post_init__(self) -> None:
        from qflash_gen.tune.winners import Written

        if self.written is None:
            self.written = Written.nothing()

    def __call__(self, run: Any, r: Any, space: Any) -> None:
        from rich.markup import escape

        from qflash_gen.tune import incumbent
        from qflash_gen.tune.winners import Written, verdicts_for, write_winners

        args, err, label = self.args, self.err, r.shape.label()
        log = not args.quiet
        duel = incumbent.head_to_head(
            run.study, r, space, self.currents.get(r.study_name), self.measurer,
            floor=args.sqnr_floor, objective=args.objective,
        )  # fmt: skip
        if duel is not None:
            self.duels[r.study_name] = duel
            if log and not err.is_terminal:
                again = " (stored by an earlier run, not measured again)" if duel.earlier else ""
                err.print(escape(f"{label}: best vs the runtime's pick, {duel.describe()}{again}"))
        if args.no_db:
            return
        one = [(r, space)]
        if self.written.error:  # the DB could not be written: the trials stay in the study storage
            self.written.add(Written(None, [], [], one, verdicts_for(args, one, self.currents, self.duels)))
            return
        w = write_winners(
            args, self.measurer.gpu, self.dtype, one, {r.study_name: self.record}, self.storage, self.storage_desc,
            err, currents=self.currents, duels=self.duels,
        )  # fmt: skip
        self.written.add(w)
        if log:
            for line in _db_lines(label, w):
                err.print(escape(line))


def _db_lines(label: str, w: Any) -> list[str]:
    """The log lines of one study's DB write, as it happens (the summary reports them all)."""
    if w.error:
        return [f"{label}: {w.error}; no later study of this run writes the DB"]
    if w.report is not None:
        rep = w.report
        what = "added to" if rep.added else "replaced in" if rep.replaced else "kept: a better one is stored in"
        return [f"{label}: DB entry {what} {rep.path}", *w.notes]
    if w.notes:
        return list(w.notes)
    return [f"{label}: {v.note}" for v in w.verdicts.values()]


class Export(Command):
    def run(self, args: argparse.Namespace, shapes: list, **_: Any) -> int:
        return _export(args, shapes)


class Devices(Command):
    def run(self, args: argparse.Namespace, shapes: list, *, argv: list[str], **_: Any) -> int:
        return _run_devices(args, argv, shapes)


class Sweep(Command):
    def run(self, args: argparse.Namespace, shapes: list, *, measurer: Any, grid: Any, **_: Any) -> int:
        return _exhaustive(args, measurer, shapes, grid)


def _search_all(
    args: argparse.Namespace,
    measurer: Any,
    plans: list,
    runs: list,
    results: list,
    err: Any,
    on_done: Callable[[Any, Any, Any], None] | None = None,
) -> None:
    """The studies' searches, one after the other, with a progress bar each; ``on_done(run,
    result, space)`` after each, before the next starts (:class:`StudyEnd`)."""
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

            def compiling(n: int, jobs: int, task: Any = task, label: str = s.label()) -> None:
                bar.update(task, best=f"precompiling {n} configs ({jobs} jobs)")
                if not err.is_terminal and not args.quiet:  # a log: the bar is not shown
                    err.print(escape(f"{label}: precompiling {n} configs ({jobs} jobs)"))

            r = run.search(measurer, enqueue=enqueue, on_progress=progress, on_compile=compiling)
            progress(r)
            results.append((r, space))
            if r.new_measurements == 0 and r.n_mine >= args.trials:
                err.print(
                    escape(
                        f"{s.label()}: worker slot #{r.slot} had spent its budget of {args.trials} in an earlier "
                        "run (a run resumes a slot; to measure more, raise --trials)"
                    )
                )
            if not err.is_terminal and not args.quiet:  # a log: one line per finished study
                best = f"best {r.best.latency_us:.2f} us {r.best.config.short()}" if r.best else "no feasible config"
                err.print(
                    escape(
                        f"{s.label()}: worker #{r.slot} measured {r.n_mine} ({r.new_measurements} new), "
                        f"{r.n_measured} in study ({r.n_failed} failed), {best}, {r.wall_s:.0f} s"
                    )
                )
            if on_done is not None:
                on_done(run, r, space)


def _export(args: argparse.Namespace, shapes: list) -> int:
    """``--export``: write the DB from the studies in ``--storage``, measuring nothing."""
    from rich.markup import escape

    from qflash_gen.tune import incumbent, study
    from qflash_gen.tune.space import get_grid
    from qflash_gen.tune.storage import as_backend
    from qflash_gen.tune.winners import write_winners

    if args.no_db:
        raise UsageError("--export writes the DB; it cannot be combined with --no-db")
    if args.simulate:
        measurer, dtype = simulated(args)
        gpu, grid = measurer.gpu, grid_for(args, measurer)
    else:
        if args.gpu is None:
            raise UsageError("--export needs --gpu NAME (the GPU the studies were tuned on), or --simulate FILE")
        try:
            gpu = check_gpu_name(args.gpu, argument="--gpu")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        dtype = args.dtype or "fp16"
        grid = get_grid(args.grid or "tune")
    out, err = consoles()
    storage, storage_desc = open_storage_arg(args)
    results, records, currents, duels = [], {}, {}, {}
    for s, space, name, _ in make_plans(args, gpu, dtype, shapes, grid, enqueue_db=False):
        try:
            r = study.load_result(storage, name, s, space, objective=args.objective, sqnr_floor=args.sqnr_floor)
        except KeyError:
            err.print(f"[yellow]{escape(f'{s.label()}: no study {name} in {storage_desc}: not tuned (skipped)')}[/]")
            continue
        attrs = as_backend(storage).get_study_user_attrs(r.study_id)
        record = attrs.get("measurer")
        currents[name] = incumbent.CurrentPick.from_attr(attrs.get(incumbent.CURRENT_ATTR))
        duels[name] = incumbent.stored_head_to_head(attrs)
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
    written = write_winners(
        args, gpu, dtype, results, records, storage, storage_desc, err, currents=currents, duels=duels, force=True
    )
    summary_table(args, gpu, "export", written.results, out, written.verdicts)
    report_db(out, written.report, written.fronts, written.notes)
    if written.error:
        print(f"qflash-tune: error: {written.error}", file=sys.stderr)
        return 1
    kept = all(not v.write for v in written.verdicts.values() if v.pick is not None)
    ok = (written.report is not None or kept) and all(r.best is not None for r, _ in written.results)
    return 0 if ok else 1


def _run_devices(args: argparse.Namespace, argv: list[str], shapes: list) -> int:
    from qflash_gen.tune import db_turn

    """``--devices``: one worker process per GPU on this host, all on the same studies."""
    from rich.markup import escape
    from rich.table import Table

    from qflash_gen.tune import study

    try:
        indices = devices.parse_devices(args.devices)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.exhaustive or args.export:
        raise UsageError("--devices runs the search on several GPUs; it cannot be combined with --exhaustive/--export")
    if args.simulate:
        measurer, dtype = simulated(args)
        gpu, grid = measurer.gpu, grid_for(args, measurer)
        runners = [(f"sim:{i}", {}) for i in indices]
    else:
        try:
            models = devices.device_models(indices)
            gpu = devices.check_same_model(models)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if args.gpu is not None and args.gpu != gpu:
            shown = ", ".join(f"{i} = {name}" for i, _, name in models)
            raise UsageError(f"--gpu {args.gpu} does not match the GPUs of --devices {args.devices}: {shown}")
        dtype = args.dtype or "fp16"
        grid = grid_for(args, None)
        runners = [(f"cuda:{i}", {"CUDA_VISIBLE_DEVICES": devices.physical_index(i)}) for i in indices]
    out, err = consoles()
    open_storage_arg(args)  # a bad --storage is a usage error here, not once per device runner
    t0 = time.monotonic()
    err.print(escape(f"qflash-tune: {len(runners)} workers ({', '.join(w for w, _ in runners)}) on gpu {gpu}"))
    codes = devices.run_device_runners(devices.child_argv(argv), runners, err=err)
    wall = time.monotonic() - t0

    storage, storage_desc = open_storage_arg(args)
    labels = [w for w, _ in runners]
    table = Table(title=f"qflash-tune --devices {args.devices}: {len(runners)} workers on {gpu}, wall {wall:.1f} s")
    for col in ("workload", "batch", "measured", *labels, "other hosts", "best config", "us", "DB written by"):
        table.add_column(col, justify="left" if col in ("workload", "best config", "DB written by") else "right")
    backend = None
    for s, space, name, _ in make_plans(args, gpu, dtype, shapes, grid, enqueue_db=False):
        try:
            r = study.load_result(storage, name, s, space, objective=args.objective, sqnr_floor=args.sqnr_floor)
        except KeyError:
            continue
        from qflash_gen.tune.storage import as_backend

        backend = backend or as_backend(storage)
        written = backend.get_study_user_attrs(r.study_id).get(db_turn.DB_WRITTEN) or {}
        host = socket.gethostname()
        per = {d: n for (h, d), n in r.measured_per("host", "device").items() if h == host}
        table.add_row(
            s.workload,
            str(s.batch),
            f"{r.n_measured}/{r.space_size}",
            *(str(per.get(w, 0)) for w in labels),
            str(r.n_measured - sum(per.values())),
            r.best.config.short() if r.best else "-",
            fmt_us(r.best.latency_us if r.best else None),
            str(written.get("device") or written.get("by") or "-"),
        )
    out.print(table)
    out.print(f"storage {storage_desc}; wall time {wall:.1f} s")
    bad = [c for c in codes if c != 0]
    if not bad:
        return 0
    return 2 if 2 in bad else 130 if 130 in bad else max(bad)


def _exhaustive(args: argparse.Namespace, measurer: Any, shapes: list, grid: Any) -> int:
    from qflash_gen.tune.measure.simulate import SimulatedMeasurer
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
            smem_limit=smem_of(measurer.gpu),
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
