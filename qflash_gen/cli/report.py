"""``qflash-db report``: latency vs SDPA and SQNR per DB entry, and a study's tuning history, as a
PNG (or Markdown tables with the PNG beside them)."""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import math
from pathlib import Path
from typing import Any

from qflash_gen import db
from qflash_gen.cli.common import Printer, UsageError, note, open_db
from qflash_gen.cli.dbfiles import FileStatus, counts, fmt_db, labels_for, ladder, scan, tier_text, workload_labels
from qflash_gen.reference import SQNR_FLOOR_DB


@dataclasses.dataclass(frozen=True)
class ReportRow:
    key: str
    workloads: str
    config: str
    latency_us: float
    spread_us: float
    sqnr_db: float
    trials: int
    baselines: dict[str, float]
    date: str
    timing: str = "do_bench"  # how latency_us was measured (protocol.timing): baselines must match it
    tier: str = "usable"  # usable, or usable (other Triton / template): which Triton and template measured it

    @property
    def best_baseline(self) -> tuple[str, float] | None:
        if not self.baselines:
            return None
        name = min(self.baselines, key=lambda k: self.baselines[k])
        return name, self.baselines[name]

    @property
    def label(self) -> str:
        return self.workloads.split(",")[0] if self.workloads else self.key


def report_rows(database: db.TuningDB, gpu: str, names: str = "paper") -> list[ReportRow]:
    """Entries in use on ``gpu``, labelled with the workloads/batches they serve, in workload order."""
    in_use = ladder(database, gpu)
    labels = workload_labels(names)
    order = {lab: i for i, labs in enumerate(labels.values()) for lab in labs}
    rows = []
    for key, (entry, _, tier) in in_use.items():
        wl = labels_for(key, labels)
        rows.append(
            ReportRow(
                key=key.to_str(),
                workloads=wl,
                config=entry.config.short(),
                latency_us=float(entry.latency_us),
                spread_us=float(entry.latency_spread_us),
                sqnr_db=float(entry.sqnr_db),
                trials=int(entry.trials),
                baselines={k: float(v) for k, v in entry.baselines.items()},
                date=entry.date,
                timing=_timing(entry),
                tier=tier_text(entry, tier),
            )
        )
    rows.sort(key=lambda r: (order.get(r.label, len(order)), r.key))
    return rows


def _timing(entry: db.Entry) -> str:
    """``do_bench`` or ``cudagraph``: the protocol an entry's latency was measured with."""
    timing = entry.protocol.get("timing") if isinstance(entry.protocol, dict) else None
    return "cudagraph" if str(timing or "").lower() in ("cudagraph", "cuda_graph", "graph") else "do_bench"


# tools/bench.py rows with SDPA fp16 times, by the protocol they were taken with
BENCH_MODES = {"do_bench": "fp16", "cudagraph": "graph"}


def bench_baselines(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """SDPA times per DB key and timing protocol from a ``tools/bench.py`` CSV: rows ``mode=fp16``
    (do_bench medians) and ``mode=graph`` (CUDA-graph replay), ``impl=sdpa_*``.  The bench runs
    unmasked attention, so only unmasked keys get baselines."""
    import csv

    import torch

    from qflash_gen.keys import workload_key

    if not path.is_file():
        raise UsageError(f"--bench {path}: no such file (a CSV written by tools/bench.py)")
    timing_of = {mode: timing for timing, mode in BENCH_MODES.items()}
    out: dict[str, dict[str, dict[str, float]]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.DictReader(fh), start=2):
            try:
                if row.get("mode") not in timing_of or not row.get("impl", "").startswith("sdpa_"):
                    continue
                shape = tuple(int(row[c]) for c in ("B", "H", "N", "D"))
                us = float(row["us"])
            except (KeyError, TypeError, ValueError) as exc:
                raise UsageError(f"--bench {path}:{i}: not a tools/bench.py row ({exc})") from None
            key = workload_key(shape, masked=False, in_dtype=torch.float16).to_str()
            slot = out.setdefault(key, {}).setdefault(timing_of[row["mode"]], {})
            slot[row["impl"]] = min(us, slot.get(row["impl"], us))
    return out


def with_bench_baselines(rows: list[ReportRow], path: Path) -> list[ReportRow]:
    """Rows with SDPA baselines from a bench CSV taken with the row's own timing protocol (a
    CUDA-graph latency against graph-replayed SDPA, a do_bench one against do_bench); an entry's
    own recorded baselines (same run, same protocol) win."""
    bench = bench_baselines(path)
    return [
        dataclasses.replace(r, baselines={**bench.get(r.key, {}).get(r.timing, {}), **r.baselines}) for r in rows
    ]


@dataclasses.dataclass(frozen=True)
class StudyHistory:
    """One Optuna study, reduced to what the report draws."""

    name: str
    directions: tuple[str, ...]
    points: list[tuple[int, float, bool]]  # (trial number, latency µs, feasible)
    n_trials: int
    n_failed: int
    best: tuple[int, float, str] | None  # (trial, latency, config)
    study: Any  # the optuna.Study, for optuna's own plots


def load_histories(storage_spec: str, pattern: str) -> list[StudyHistory]:
    """Studies in ``storage_spec`` whose name matches ``pattern`` (exact or a glob)."""
    import optuna
    from optuna.trial import TrialState

    from qflash_gen.tune.lease import is_lease_name
    from qflash_gen.tune.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if "://" not in storage_spec and not Path(storage_spec).expanduser().is_file():
        raise UsageError(
            f"--storage {storage_spec}: no such journal file (or give a storage URL such as sqlite:///x.db)"
        )
    try:
        storage, _ = open_storage(storage_spec)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # lease studies are the distributed tuner's claims (tune/lease.py), not tuning runs
    names = [
        s.study_name
        for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        if not is_lease_name(s.study_name)
    ]
    chosen = [n for n in names if n == pattern] or [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not chosen:
        listing = "\n  ".join(sorted(names)) or "(none)"
        raise UsageError(f"--study {pattern!r} matches no study in {storage_spec}; studies there:\n  {listing}")
    out = []
    for name in sorted(chosen):
        study = optuna.load_study(study_name=name, storage=storage)
        points: list[tuple[int, float, bool]] = []
        failed = 0
        for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
            if t.state == TrialState.FAIL and "claimed_by" not in t.user_attrs:  # a lost claim is no failure
                failed += 1
            # measured trials below the floor are PRUNED with their value (tune/storage.py)
            if t.state not in (TrialState.COMPLETE, TrialState.PRUNED) or not t.values:
                continue
            feasible = float(t.user_attrs.get("constraint", 0.0)) <= 0.0
            points.append((t.number, float(t.values[0]), feasible))
        best = None
        ok = [p for p in points if p[2]]
        if ok:
            num, lat, _ = min(ok, key=lambda p: p[1])
            trial = study.trials[num] if num < len(study.trials) else None
            cfg = str(trial.user_attrs.get("config_short", trial.params)) if trial is not None else "?"
            best = (num, lat, cfg)
        dirs = tuple(d.name.lower() for d in study.directions)
        out.append(StudyHistory(name, dirs, points, len(study.trials), failed, best, study))
    return out


def _plot_report(rows: list[ReportRow], histories: list[StudyHistory], gpu: str, path: Path) -> None:
    """One PNG: latency vs SDPA per workload/batch, SQNR per entry, and the tuning history."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (also on a machine without a display)
    import matplotlib.pyplot as plt

    n_panels = 2 + (1 if histories else 0)
    fig, axes = plt.subplots(n_panels, 1, figsize=(max(8.0, 0.9 * len(rows) + 3), 4.2 * n_panels), squeeze=False)
    ax_lat, ax_sqnr = axes[0][0], axes[1][0]
    labels = [f"{r.label}\n{r.key}".replace("_fp16", "\n fp16").replace("_int8", "\n int8") for r in rows]
    x = list(range(len(rows)))
    baseline_names = sorted({b for r in rows for b in r.baselines})
    width = 0.8 / (1 + len(baseline_names))
    if rows:
        ax_lat.bar([i - 0.4 + width / 2 for i in x], [r.latency_us for r in rows], width,
                   yerr=[r.spread_us for r in rows], label="qflash-gen", color="tab:red")  # fmt: skip
        for j, name in enumerate(baseline_names):
            xs = [i - 0.4 + width * (j + 1.5) for i, r in zip(x, rows, strict=True) if name in r.baselines]
            ys = [r.baselines[name] for r in rows if name in r.baselines]
            ax_lat.bar(xs, ys, width, label=name, alpha=0.75)
        for i, r in zip(x, rows, strict=True):
            best = r.best_baseline
            if best is not None:
                ax_lat.annotate(f"{best[1] / r.latency_us:.2f}x", (i, max([r.latency_us, *r.baselines.values()])),
                                ha="center", va="bottom", fontsize=8)  # fmt: skip
        ax_lat.set_xticks(x, labels, fontsize=8)
        ax_lat.legend(fontsize=8)
    else:
        ax_lat.text(0.5, 0.5, f"no usable entries for {gpu}", ha="center", va="center", transform=ax_lat.transAxes)
    ax_lat.set_ylabel("latency µs")
    if baseline_names:
        ax_lat.set_title(f"{gpu}: kernel latency vs SDPA baselines (speedup = best baseline / qflash-gen)")
    else:
        ax_lat.set_title(f"{gpu}: kernel latency (no SDPA baselines recorded in these entries)")
    finite = [min(r.sqnr_db, 200.0) for r in rows]
    ax_sqnr.bar(x, finite, color="tab:blue")
    ax_sqnr.axhline(SQNR_FLOOR_DB, color="gray", linestyle="--", label=f"floor {SQNR_FLOOR_DB:.0f} dB")
    if rows:
        ax_sqnr.set_xticks(x, labels, fontsize=8)
        ax_sqnr.legend(fontsize=8)
    ax_sqnr.set_ylabel("SQNR dB vs fp64")
    ax_sqnr.set_title("accuracy per entry")
    if histories:
        ax = axes[2][0]
        for i, h in enumerate(histories):
            color = f"C{i % 10}"
            xs = [p[0] for p in h.points]
            ys = [p[1] for p in h.points]
            ax.scatter(xs, ys, s=12, c=[color if p[2] else "lightgray" for p in h.points])
            best, run = math.inf, []
            for p in h.points:
                if p[2]:
                    best = min(best, p[1])
                run.append(best if math.isfinite(best) else None)
            pts = [(xv, yv) for xv, yv in zip(xs, run, strict=True) if yv is not None]
            if pts:
                ax.step(
                    [p[0] for p in pts], [p[1] for p in pts], where="post", color=color, label=f"{h.name} (best so far)"
                )
        ax.set_xlabel("trial")
        ax.set_ylabel("latency µs")
        ax.set_title("tuning history (grey: below the SQNR floor)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _optuna_plots(histories: list[StudyHistory], stem: Path) -> list[Path]:
    """Optuna's own matplotlib plots next to the report: history (or Pareto front) per study."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    written = []
    for i, h in enumerate(histories):
        if not h.points:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
            if len(h.directions) > 1:
                names = (
                    ["latency µs", "energy µJ", "SQNR dB"]
                    if len(h.study.directions) == 3
                    else ["latency µs", "SQNR dB"]
                )
                ax = ovm.plot_pareto_front(h.study, target_names=names)
            else:
                ax = ovm.plot_optimization_history(h.study, target_name="latency µs")
        fig = ax.figure if hasattr(ax, "figure") else plt.gcf()
        out = stem.with_name(f"{stem.name}.study{i + 1}.png")
        fig.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(out)
    return written


def _report_markdown(
    rows: list[ReportRow], histories: list[StudyHistory], gpu: str, files: list[FileStatus], image: str | None
) -> str:
    lines = [f"# qflash-gen tuning report: {gpu}", ""]
    for f in files:
        if f.parsed is None:
            lines.append(f"- `{f.path}` ({f.layer}): **corrupt**: {f.error}")
            continue
        h = f.parsed.header
        lines.append(
            f"- `{f.path}` ({f.layer}): {h.device_name or gpu}, cc {h.compute_capability or '?'}, "
            f"triton {h.triton or '?'}, torch {h.torch or '?'}, template {(h.template_hash or '?')[:12]}, "
            f"updated {h.updated or '?'}; {counts(f.parsed)}"
        )
    lines += ["", "## Latency and accuracy per entry", ""]
    if rows:
        lines.append(
            "| workloads | key | config | timing | latency µs | ± µs | best SDPA µs | speedup | SQNR dB | trials | tier |"
        )
        lines.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            best = r.best_baseline
            lines.append(
                f"| {r.workloads or '-'} | `{r.key}` | `{r.config}` | {r.timing} | {r.latency_us:.2f} | {r.spread_us:.2f} | "
                + (f"{best[1]:.2f} ({best[0]}) | {best[1] / r.latency_us:.2f}x" if best else "- | -")
                + f" | {fmt_db(r.sqnr_db)} | {r.trials} | {r.tier} |"
            )
    else:
        lines.append(f"No usable entries for {gpu}: every workload runs the safe default.")
    stale = [(f, s) for f in files if f.parsed is not None for s in f.parsed.stale]
    if stale:
        lines += ["", "## Stale entries (kept in the file, not used)", ""]
        lines += [f"- `{f.path}:{s.line}` `{s.key}`: {s.reason}" for f, s in stale]
    if histories:
        lines += [
            "",
            "## Tuning history",
            "",
            "| study | trials | failed | feasible | fastest feasible µs | its config |",
        ]
        lines.append("|---|---:|---:|---:|---:|---|")
        for h in histories:
            best = f"{h.best[1]:.2f} (trial {h.best[0]}) | `{h.best[2]}`" if h.best else "- | -"
            lines.append(f"| `{h.name}` | {h.n_trials} | {h.n_failed} | {sum(p[2] for p in h.points)} | {best} |")
    if image:
        lines += ["", f"![latency, SQNR and tuning history]({image})"]
    return "\n".join(lines) + "\n"


def run_report(args: argparse.Namespace, printer: Printer) -> int:
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".md"):
        raise UsageError(f"--out {out}: give a .png (plot) or .md (tables + plot next to it)")
    if bool(args.storage) != bool(args.study):
        raise UsageError("--storage and --study go together (the study's storage and its name or a glob)")
    from qflash_gen.gpu import check_gpu_name

    database = open_db(args.db)
    try:
        check_gpu_name(args.gpu, also=tuple(database.gpus()))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        rows = report_rows(database, args.gpu, args.workloads)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.bench:
        rows = with_bench_baselines(rows, Path(args.bench))
    histories = load_histories(args.storage, args.study) if args.storage else []
    files = scan(database, args.gpu)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out if out.suffix.lower() == ".png" else out.with_suffix(".png")
    _plot_report(rows, histories, args.gpu, png)
    written = [png]
    written += _optuna_plots(histories, png.with_suffix(""))
    if out.suffix.lower() == ".md":
        out.write_text(_report_markdown(rows, histories, args.gpu, files, png.name), encoding="utf-8")
        written.insert(0, out)
    for p in written:
        printer.line(str(p))
    note(f"{args.gpu}: {len(rows)} entries, {len(histories)} stud{'y' if len(histories) == 1 else 'ies'}")
    return 1 if any(f.error for f in files) else 0


