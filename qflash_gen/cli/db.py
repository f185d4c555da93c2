"""``qflash-db``: list, show, validate and report on the YAML tuning databases."""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from qflash_gen import codegen, db
from qflash_gen.cli.common import (
    DTYPES,
    Printer,
    UsageError,
    guard,
    layer_name,
    note,
    open_db,
    parse_args,
    workload_shapes,
)
from qflash_gen.cli.dbfiles import (
    best_baseline,
    check_file,
    counts,
    fmt_db,
    fmt_us,
    labels_for,
    ladder,
    scan,
    tier_text,
    workload_labels,
)
from qflash_gen.cli.leases import add_leases_parser, run_leases
from qflash_gen.cli.report import run_report
from qflash_gen.gpu import check_gpu_name
from qflash_gen.keys import WorkloadKey, workload_key


def _db_ls(args: argparse.Namespace, printer: Printer) -> int:
    from rich.table import Table

    database = open_db(args.db)
    files = scan(database, args.gpu)
    if not files:
        where = ", ".join(str(d) for d in database.dirs)
        note(f"no tuning DB files{' for ' + args.gpu if args.gpu else ''} in {where}")
        return 0
    t = Table(title="tuning DB files", title_justify="left")
    for col in ("gpu", "layer", "file", "cc", "device", "triton", "template", "usable", "other Triton",
                "other template", "stale", "updated"):  # fmt: skip
        t.add_column(col)
    for f in files:
        if f.parsed is None:
            t.add_row(f.path.stem, f.layer, str(f.path), "", "", "", "", "", "", "", "", f"CORRUPT: {f.error}")
            continue
        h, p = f.parsed.header, f.parsed
        t.add_row(
            h.gpu, f.layer, str(f.path), h.compute_capability or "-", h.device_name or "-", h.triton or "-",
            (h.template_hash or "-")[:12], *(str(p.count(tier)) for tier in db.TIERS), str(len(p.stale)),
            h.updated or "-",
        )  # fmt: skip
    printer.table(t)
    labels = workload_labels()
    for gpu in sorted({f.path.stem for f in files if f.parsed is not None}):
        in_use = ladder(database, gpu)
        e = Table(title=f"{gpu}: entries in use (layers overlaid; per key the first tier that has it)",
                  title_justify="left")  # fmt: skip
        for col in ("key", "workloads", "config", "latency µs", "± µs", "best SDPA µs", "speedup", "SQNR dB", "trials",
                    "tier", "from"):  # fmt: skip
            e.add_column(col)
        for key in sorted(in_use, key=lambda k: (k.n, k.d, k.masked, k.in_dtype, k.out_dtype, k.bh_bucket)):
            entry, origin, tier = in_use[key]
            base = best_baseline(entry)
            e.add_row(
                key.to_str(), labels_for(key, labels), entry.config.short(), fmt_us(entry.latency_us),
                fmt_us(entry.latency_spread_us), f"{base[1]:.2f} ({base[0]})" if base else "-",
                f"{base[1] / entry.latency_us:.2f}x" if base else "-", fmt_db(entry.sqnr_db), str(entry.trials),
                tier_text(entry, tier), layer_name(origin),
            )  # fmt: skip
        if in_use:
            printer.table(e)
        else:
            printer.line(f"{gpu}: no entries in use (every workload runs the safe default)")
        stale = [(f, s) for f in files if f.parsed is not None and f.path.stem == gpu for s in f.parsed.stale]
        for f, s in stale:
            printer.line(f"  stale (not used): {s.key} at {f.path}:{s.line}: {s.reason}")
    return 1 if any(f.error for f in files) else 0


def _parse_key_arg(args: argparse.Namespace) -> Any:
    """``show KEY``: a key string (n197_d64_nomask_bh16_fp16-fp16) or a workload name + --batch."""
    text = args.key
    if re.match(r"^n\d+_d\d+_", text):
        try:
            return [WorkloadKey.from_str(text)]
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return [
        workload_key(shape, masked=masked or args.masked, in_dtype=args.dtype, out_dtype=args.out_dtype)
        for _, shape, masked in workload_shapes(text, args.batch)
    ]


def _db_show(args: argparse.Namespace, printer: Printer) -> int:
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    database = open_db(args.db)
    if args.gpu is not None:  # a GPU that is neither known nor has a DB file is a typo, not "no entry"
        try:
            check_gpu_name(args.gpu, also=tuple(database.gpus()), argument="--gpu")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    keys = _parse_key_arg(args)
    files = scan(database, args.gpu)
    docs: list[dict[str, Any]] = []
    for key in keys:
        ks = key.to_str()
        for gpu in sorted({f.path.stem for f in files}):
            in_use = ladder(database, gpu)
            for f in (f for f in files if f.path.stem == gpu):
                if f.parsed is None:
                    docs.append({"gpu": gpu, "file": str(f.path), "status": f"CORRUPT: {f.error}"})
                    continue
                for tier in db.TIERS:
                    entry = f.parsed.tier(tier).get(key)
                    if entry is None:
                        continue
                    used = in_use.get(key)
                    if used is not None and used[0] is entry:
                        status = "in use"
                    else:  # another layer's entry, or one of a better tier, answers for this key
                        status = f"not used; the {db.TIER_LABELS[used[2]]} entry in the {layer_name(used[1])} layer answers"
                    doc = {"gpu": gpu, "file": str(f.path), "layer": f.layer, "tier": tier_text(entry, tier),
                           "status": status, **entry.to_dict()}  # fmt: skip
                    base = best_baseline(entry)
                    if base:
                        doc["speedup_vs_best_baseline"] = round(base[1] / entry.latency_us, 3)
                    docs.append(doc)
                for s in f.parsed.stale:
                    if s.key == ks:
                        docs.append(
                            {"gpu": gpu, "file": f"{f.path}:{s.line}", "key": ks, "status": f"stale: {s.reason}"}
                        )
    if not docs:
        gpus = f" for {args.gpu}" if args.gpu else ""
        note(f"no entry{gpus} for {', '.join(k.to_str() for k in keys)} (get_kernel falls back to nearest/default)")
        return 1
    printer.code(yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True, width=120), "yaml")
    return 0


def _db_check(args: argparse.Namespace, printer: Printer) -> int:
    database = open_db(args.db)
    files = scan(database, args.gpu)
    for extra in args.files or []:
        files.append(check_file(Path(extra)))
    if not files:
        note(f"no tuning DB files in {', '.join(str(d) for d in database.dirs)}: nothing to check")
        return 0
    corrupt = stale = fallbacks = 0
    for f in files:
        if f.parsed is None:
            corrupt += 1
            printer.line(f"CORRUPT {f.error}")
            continue
        bad_render = []
        usable = [*f.parsed.entries.values(), *(fb.entry for fb in f.parsed.fallbacks)]
        for entry in usable:
            try:  # a config that validates but no longer renders would only fail at launch
                codegen.render(entry.config)
            except Exception as exc:  # noqa: BLE001 - report every failure kind, keep checking
                bad_render.append(f"{entry.key.to_str()}: render failed: {exc}")
        printer.line(f"{'OK' if not bad_render else 'BROKEN'}      {f.path}: {counts(f.parsed)}")
        fallbacks += len(f.parsed.fallbacks)
        if args.verbose:
            for fb in f.parsed.fallbacks:
                printer.line(f"  {fb.tier:<15} {f.path}:{fb.line}: {fb.entry.key.to_str()}: {fb.label}")
        for s in f.parsed.stale:
            stale += 1
            printer.line(f"  stale   {f.path}:{s.line}: {s.key}: {s.reason}")
        for msg in bad_render:
            corrupt += 1
            printer.line(f"  BROKEN  {msg}")
    summary = (
        f"{len(files)} file(s), {corrupt} corrupt, {stale} stale entr{'y' if stale == 1 else 'ies'}, "
        f"{fallbacks} of another Triton or template (used after fresh ones; -v lists them)"
    )
    note(summary)
    if corrupt:
        return 1
    return 1 if args.strict and stale else 0


DB_EPILOG = """\
DB folders: --db DIR or FILE (repeatable, lowest priority first); default: the shipped tuning_db/
and the user DB ($QFLASH_GEN_DB, else <user cache dir>/qflash-gen/tuning_db), user entries on top.
Entries measured with another Triton or template are "usable (other Triton/template)": get_kernel
takes them after every fresh entry; "stale" ones cannot be used at all.
exit status: 0 done, 1 a corrupt file (or, with check --strict, a stale entry), 2 usage error.

examples:
  qflash-db ls
  qflash-db show n197_d64_nomask_bh16_fp16-fp16 --gpu h100
  qflash-db show vit_b --batch 8 --gpu h100
  qflash-db check
  qflash-db report --gpu h100 --out report.md
  qflash-db report --gpu h100 --out report.png --storage ~/.cache/qflash-gen/tune/studies.journal --study 'qflash/h100/A3/*'
  qflash-db leases --storage ~/.cache/qflash-gen/tune/studies.journal --clean
"""


def _db_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db", action="append", metavar="DIR", help="tuning DB folder(s) or <gpu>.yaml file(s), lowest priority first"
    )
    common.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    p = argparse.ArgumentParser(
        prog="qflash-db",
        description="List, show, validate and report on qflash-gen's YAML tuning databases.",
        epilog=DB_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{ls,show,check,report,leases}")
    ls = sub.add_parser("ls", parents=[common], help="GPUs, their DB files and the entries in use")
    ls.add_argument("--gpu", help="only this GPU")
    show = sub.add_parser("show", parents=[common], help="one key's entries, as YAML, on every GPU (or --gpu)")
    show.add_argument("key", help="workload key (n197_d64_nomask_bh16_fp16-fp16) or workload name (vit_b)")
    show.add_argument("--gpu", help="only this GPU")
    show.add_argument("--batch", type=int, default=1, help="with a workload name: images per batch (default 1)")
    show.add_argument("--dtype", choices=DTYPES, default="fp16", help="with a workload name: input dtype")
    show.add_argument("--out-dtype", choices=DTYPES, help="with a workload name: output dtype (default --dtype)")
    show.add_argument("--masked", action="store_true", help="with a workload name: the masked variant")
    check = sub.add_parser("check", parents=[common], help="validate every DB file; list stale entries")
    check.add_argument("files", nargs="*", help="extra DB files to check besides the layers")
    check.add_argument("--gpu", help="only this GPU's files")
    check.add_argument("--strict", action="store_true", help="exit 1 on stale entries too")
    check.add_argument("-v", "--verbose", action="store_true", help="also list entries of another Triton or template")
    rep = sub.add_parser("report", parents=[common], help="latency vs SDPA, SQNR and tuning history (PNG or MD)")
    rep.add_argument("--gpu", required=True, help="GPU whose entries are reported")
    rep.add_argument("--out", required=True, help="report.png (plot) or report.md (tables; plot next to it)")
    rep.add_argument("--workloads", default="paper", help="names that label entries (default paper = A1..A7)")
    rep.add_argument("--storage", help="Optuna storage of the tuning runs (journal file or URL)")
    rep.add_argument("--study", help="study name, or a glob such as 'qflash/h100/*'")
    rep.add_argument(
        "--bench", metavar="CSV", help="SDPA baselines from a tools/bench.py CSV (docs/benchmarks/<gpu>.csv)"
    )
    add_leases_parser(sub, common)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qflash-db``; returns the exit status."""
    parser = _db_parser()
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    run = {"ls": _db_ls, "show": _db_show, "check": _db_check, "report": run_report, "leases": run_leases}[
        args.command
    ]
    # Every command lists stale entries itself, with file:line; db's per-file WARNING would repeat them.
    db_logger = logging.getLogger("qflash_gen.db")
    level = db_logger.level
    db_logger.setLevel(logging.ERROR)
    try:
        return guard(lambda: run(args, Printer(args.color)), f"{parser.prog} {args.command}")
    finally:
        db_logger.setLevel(level)
