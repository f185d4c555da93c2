"""What ``qflash-tune`` prints: the consoles, the summary table, the DB write report."""

from __future__ import annotations

import argparse
from typing import Any

from qflash_gen.config import default_config
from qflash_gen.tune import objective


def fmt_us(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def summary_table(
    args: argparse.Namespace, gpu: str, source: Any, results: list, out: Any, verdicts: dict | None = None
) -> None:
    """One row per study: counts, the DB entry's config (the verdict's pick: the best measured,
    or the runtime's current pick where nothing beats it) and, from the same records, how it
    compares with the default config and with the current pick (> 1x: the entry is faster).
    Where the verdict rests on a final head-to-head (a GPU's, :mod:`.headtohead`), ``us`` and
    ``+-`` are the entry's median there and ``vs current`` is the ratio of the two medians.
    Below the table, one line per study says what the entry improves on."""
    from rich.markup import escape
    from rich.table import Table

    from qflash_gen.tune.incumbent import judge

    verdicts = verdicts or {}
    table = Table(title=f"qflash-tune on {gpu} ({source}), SQNR floor {args.sqnr_floor:g} dB")
    cols = ("workload", "batch", "B,H,N,D", "measured", "this worker", "failed", "<floor", "pick", "us", "+-")
    for col in (*cols, "SQNR dB", "vs default", "current pick", "vs current"):
        table.add_column(col, justify="left" if col in ("workload", "pick", "current pick") else "right")
    lines = []
    for r, space in results:
        v = verdicts.get(r.study_name) or judge(r, space, None, floor=args.sqnr_floor, objective=args.objective)
        pick = v.pick
        current = v.current_why or "-"
        table.add_row(
            r.shape.workload,
            str(r.shape.batch),
            ",".join(map(str, r.shape.shape)),
            f"{r.n_measured}/{r.space_size}",
            "-" if r.slot is None else f"#{r.slot}: {r.n_mine}",
            str(r.n_failed),
            str(r.n_below_floor),
            escape(pick.config.short()) if pick else "[red]none meets the floor[/]",
            fmt_us(pick.latency_us if pick else None),
            fmt_us(pick.measurement.spread_us if pick else None),
            "-" if pick is None or pick.sqnr_db is None else f"{pick.sqnr_db:.1f}",
            _ratio(v.ratio(v.default)),
            escape(current),
            _ratio(v.ratio(v.current)),
        )
        lines.append(f"{r.shape.label()}: " + ("--no-db, so not written; the entry would be: " if args.no_db else "") + v.note)
    out.print(table)
    for line in lines:
        out.print(escape(line))
    if objective.needs_energy(args.objective):
        for r, _ in results:
            v = verdicts.get(r.study_name)
            b = v.pick if v is not None else r.best
            if b is not None and b.energy_uj is not None:
                m = b.measurement
                default_hash = default_config(r.shape.n, r.shape.d).hash
                d = next(
                    (
                        t
                        for t in r.history
                        if t.config.hash == default_hash and t.energy_uj and t.measurement.feasible(args.sqnr_floor)
                    ),
                    None,
                )
                vs = f", the default config takes {d.energy_uj / m.energy_uj:.2f}x" if d is not None else ""
                out.print(
                    f"energy {r.shape.label()}: {b.config.short()} {m.energy_uj:.1f} uJ/call "
                    f"(spread {m.energy_spread_uj or 0.0:.1f}, above idle {m.above_idle_uj or 0.0:.1f}, "
                    f"idle {m.idle_w or 0.0:.1f} W{vs})"
                )
    if objective.is_pareto(args.objective):
        for r, _ in results:
            pts = ", ".join(
                f"{t.latency_us:.1f}us/"
                + (f"{t.energy_uj:.1f}uJ/" if t.energy_uj is not None else "")
                + f"{t.sqnr_db:.1f}dB"
                for t in r.front
            )
            out.print(f"front {r.shape.label()}: {pts or 'empty'}")


def consoles():
    from rich.console import Console

    err = Console(stderr=True, soft_wrap=True)
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)  # piped: one line per row, not wrapped to 80 columns
    return out, err


def report_db(out: Any, report: Any, fronts: list, notes: list[str]) -> None:
    from rich.markup import escape

    for note in notes:
        out.print(escape(note))
    if report is not None:
        out.print(escape(report.describe()), soft_wrap=True)  # where the DB is (get_kernel reads it), what changed
    for path in fronts:
        out.print(f"front written: {path}")

