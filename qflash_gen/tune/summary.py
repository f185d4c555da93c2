"""What ``qflash-tune`` prints: the consoles, the summary table, the DB write report."""

from __future__ import annotations

import argparse
from typing import Any

from qflash_gen.config import default_config
from qflash_gen.tune import objective


def fmt_us(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def summary_table(args: argparse.Namespace, gpu: str, source: Any, results: list, out: Any) -> None:
    from rich.table import Table

    table = Table(title=f"qflash-tune on {gpu} ({source}), SQNR floor {args.sqnr_floor:g} dB")
    for col in (
        "workload",
        "batch",
        "B,H,N,D",
        "measured",
        "this worker",
        "failed",
        "<floor",
        "best config",
        "us",
        "+-",
        "SQNR dB",
        "vs default",
    ):
        table.add_column(col, justify="left" if col in ("workload", "best config") else "right")
    for r, _ in results:
        best = r.best
        default_hash = default_config(r.shape.n, r.shape.d).hash
        default = next((t for t in r.history if t.config.hash == default_hash and t.measurement.ok), None)
        ratio = "-"
        if best is not None and default is not None and best.latency_us:
            ratio = f"{default.latency_us / best.latency_us:.2f}x"
        table.add_row(
            r.shape.workload,
            str(r.shape.batch),
            ",".join(map(str, r.shape.shape)),
            f"{r.n_measured}/{r.space_size}",
            "-" if r.slot is None else f"#{r.slot}: {r.n_mine}",
            str(r.n_failed),
            str(r.n_below_floor),
            best.config.short() if best else "[red]none meets the floor[/]",
            fmt_us(best.latency_us if best else None),
            fmt_us(best.measurement.spread_us if best else None),
            "-" if best is None else f"{best.sqnr_db:.1f}",
            ratio,
        )
    out.print(table)
    if objective.needs_energy(args.objective):
        for r, _ in results:
            b = r.best
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

