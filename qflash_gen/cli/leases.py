"""``qflash-db leases``: the tuner's lease studies in a storage (who holds what), and ``--clean``
to remove the ones a killed run left behind (docs/distributed.md, tune/lease.py)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from qflash_gen.cli.common import Printer, UsageError, note


def add_leases_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "leases", parents=[common], help="the tuner's leases in a study storage; --clean removes dead ones"
    )
    p.add_argument("--storage", required=True, help="Optuna storage of the tuning runs (journal file or URL)")
    p.add_argument(
        "--clean",
        action="store_true",
        help="remove leases of dead processes (their RUNNING trials are failed) and of deleted studies",
    )
    p.add_argument(
        "--keep-slots",
        action="store_true",
        help="with --clean: keep dead slot leases (they tell a rerun which budget to resume)",
    )


def _holder_text(holder: dict[str, Any] | None, now: float) -> str:
    if not holder:
        return "(no holder record yet)"
    age = now - float(holder.get("heartbeat", 0.0) or 0.0)
    extra = f" trial {holder['trial']}" if holder.get("trial") is not None else ""
    return f"{holder.get('host')}:{holder.get('pid')}{extra}, heartbeat {age:.0f} s ago"


def run_leases(args: argparse.Namespace, printer: Printer) -> int:
    from qflash_gen.tune import lease
    from qflash_gen.tune.storage import open_storage

    if "://" not in args.storage and not Path(args.storage).expanduser().is_file():
        raise UsageError(f"--storage {args.storage}: no such journal file (or give a storage URL)")
    try:
        storage, shown = open_storage(args.storage)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    now = time.time()
    found = lease.stored_leases(storage)
    for x in found:
        state = "orphan (study deleted)" if x.study is None else "live" if x.alive else "dead"
        printer.line(
            f"{state:<22} {x.info.kind}:{x.info.key[:16]} of {x.study or f'study id {x.study_id}'}: "
            f"{_holder_text(x.info.holder, now)}"
        )
    if not args.clean:
        dead = sum(1 for x in found if x.study is None or not x.alive)
        note(f"{shown}: {len(found)} lease(s), {dead} dead or orphaned" + ("; --clean removes them" if dead else ""))
        return 0
    gone = lease.clean(storage, slots=not args.keep_slots)
    for x in gone:
        printer.line(f"removed {x.info.kind}:{x.info.key[:16]} of {x.study or f'study id {x.study_id}'}")
    note(f"{shown}: removed {len(gone)} of {len(found)} lease(s)")
    return 0
