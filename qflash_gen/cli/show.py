"""``qflash-show``: the Triton source (or its TTIR ... SASS) of the kernel the runtime would run.

A tuned kernel is only trusted when it can be read.  This prints the exact source the runtime
would launch for a workload on a GPU (byte-identical to the cached file, whose name is its
sha256), says why that config was picked (``exact`` / ``nearest:<key>`` / ``sibling:<gpu>:...``
/ ``default``), diffs two variants, and compiles one down to SASS with its register, spill and
shared-memory use (:mod:`qflash_gen.codegen.asm`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from collections.abc import Sequence

import yaml

from qflash_gen import codegen, gpu
from qflash_gen.cli.common import (
    DTYPES,
    Printer,
    UsageError,
    guard,
    note,
    open_db,
    parse_arch,
    parse_args,
    parse_config,
    parse_shape,
    workload_shapes,
)
from qflash_gen.codegen.asm import ASM_STAGES, compile_asm
from qflash_gen.config import KernelConfig, check_workload
from qflash_gen.db import TuningDB
from qflash_gen.kernel import get_kernel

_COMMENT = {"llir": ";"}  # every other stage (MLIR, PTX, SASS) comments with //


# -- what to show: a config plus where it came from ------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    """One kernel to show: its config and the story of how it was chosen."""

    label: str
    config: KernelConfig
    why: str  # exact | nearest:<key> | sibling:<gpu>:... | default | explicit
    gpu: str | None = None
    shape: tuple[int, int, int, int] | None = None
    masked: bool = False
    out_dtype: str = "int8"  # the kernel's output tensor dtype (the workload key's out dtype)
    key: str | None = None
    origin: str | None = None  # the DB file the entry came from

    @property
    def text(self) -> str:
        return codegen.render(self.config)

    def describe(self) -> str:
        parts = [self.label]
        if self.shape is not None:
            b, h, n, d = self.shape
            parts.append(f"B={b} H={h} N={n} D={d}" + (" masked" if self.masked else "") + f" out={self.out_dtype}")
        if self.gpu:
            parts.append(f"gpu {self.gpu}")
        why = f"lookup {self.why}"
        if self.key:
            why += f" for key {self.key}"
        if self.origin:
            why += f" ({self.origin})"
        parts.append(why)
        parts.append(self.config.short())
        return " | ".join(parts)



def lookup(
    label: str,
    shape: tuple[int, int, int, int],
    *,
    masked: bool,
    gpu: str | None,
    dtype: str,
    out_dtype: str | None,
    database: TuningDB | None,
) -> Target:
    """What the runtime picks for this shape on ``gpu`` (``get_kernel``, nothing launched)."""
    try:
        kern = get_kernel(shape, dtype=dtype, masked=masked, out_dtype=out_dtype, gpu=gpu, db=database)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return Target(
        label=label,
        config=kern.config,
        why=kern.why,
        gpu=kern.gpu,
        shape=shape,
        masked=masked,
        out_dtype=kern.key.out_dtype,
        key=kern.key.to_str(),
        origin=str(kern.origin) if kern.origin is not None else None,
    )


def resolve_spec(spec: str, args: argparse.Namespace) -> list[Target]:
    """One ``--diff`` operand (or the positional target) → the kernel(s) it names.

    Grammar: ``config:FIELD=V,…`` (a config, no lookup) | ``shape:B,H,N,D[@GPU]`` |
    ``WORKLOAD[@GPU]``; ``@GPU`` overrides ``--gpu`` so one workload can be compared across cards.
    """
    if spec.startswith("config:"):
        return [Target(label=spec, config=parse_config(spec[len("config:") :]), why="explicit")]
    body, at, gpu = spec.partition("@")
    if at and not gpu:
        raise UsageError(f"{spec!r}: nothing after '@' (expected a GPU name such as h100)")
    common = dict(gpu=gpu or args.gpu, dtype=args.dtype, out_dtype=args.out_dtype, database=args.database)
    suffix = f"@{gpu}" if gpu else ""
    if body.startswith("shape:"):
        shape = parse_shape(body[len("shape:") :])
        return [lookup(spec, shape, masked=args.masked, **common)]
    return [
        lookup(f"{label}{suffix}", shape, masked=masked or args.masked, **common)
        for label, shape, masked in workload_shapes(body, args.batch)
    ]


def show_targets(args: argparse.Namespace) -> list[Target]:
    """The positional target, ``--shape`` and ``--config`` combined into the kernel(s) to show."""
    override = parse_config(args.config) if args.config is not None else None
    if args.target is not None and args.shape is not None:
        raise UsageError("give either a WORKLOAD or --shape, not both")
    out_dtype = args.out_dtype or args.dtype
    if args.target is None and args.shape is None:
        if override is None:
            raise UsageError("give a WORKLOAD (e.g. vit_b), --shape B,H,N,D or --config FIELD=V,…")
        return [Target(label="--config", config=override, why="explicit", masked=args.masked, out_dtype=out_dtype)]
    if override is None:
        return resolve_spec(args.target if args.target is not None else f"shape:{args.shape}", args)
    # A hand-picked config at a workload's (or raw) shape: no lookup, but --asm has a shape.
    if args.shape is not None:
        rows = [(f"shape:{args.shape}", parse_shape(args.shape), False)]
    else:
        rows = workload_shapes(args.target, args.batch)
    targets = [
        Target(
            label=label, config=override, why="explicit", shape=shape, masked=masked or args.masked, out_dtype=out_dtype
        )  # fmt: skip
        for label, shape, masked in rows
    ]
    for t in targets:  # shown anyway (it is what was asked), but never silently
        try:
            check_workload(t.config, t.shape[2], t.shape[3])
        except ValueError as exc:
            note(f"# warning: the runtime refuses this config for {t.label}: {exc}")
    return targets


# -- diff --------------------------------------------------------------------------------
def config_yaml(config: KernelConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=True)


def diff_targets(a: Target, b: Target, context: int = 0) -> str:
    """Unified diff of the configs, then of the rendered sources (``context`` lines around hunks).

    With the default ``context=0`` every ``-``/``+`` line is a changed line and nothing else is
    printed besides the ``---``/``+++``/``@@`` headers; ``-U 3`` gives the familiar context."""
    out: list[str] = []
    for what, text_a, text_b in (
        ("config", config_yaml(a.config), config_yaml(b.config)),
        ("source", a.text, b.text),
    ):
        out.extend(
            difflib.unified_diff(
                text_a.splitlines(keepends=True),
                text_b.splitlines(keepends=True),
                fromfile=f"{a.label} ({what}; {a.why})",
                tofile=f"{b.label} ({what}; {b.why})",
                n=context,
            )
        )
    return "".join(line if line.endswith("\n") else line + "\n" for line in out)



# -- assembly target ---------------------------------------------------------------------
def _current_arch() -> int | None:
    """Compute capability of the CUDA GPU present, or None (no device probing at import time)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return major * 10 + minor
    except Exception:  # a broken driver reads as "no GPU"; pick_arch's error says what to do
        return None
    return None


def pick_arch(arch: str | None, gpu_name: str | None) -> int:
    """``--arch`` wins; else the card named by ``--gpu``; else the GPU present; else a clear error."""
    if arch:
        return parse_arch(arch)
    cap = gpu.arch_of(gpu_name)
    if cap is not None:
        return cap
    cap = _current_arch()
    if cap is not None:
        return cap
    raise UsageError(
        "--asm compiles for a CUDA GPU and none is present: run on a machine with one, name a known "
        "card with --gpu (h100, a100, …) or the arch with --arch (sm90 for H100/H200, sm80 for A100); "
        "Triton cross-compiles with the ptxas it ships, so no GPU is needed then"
    )



# -- qflash-show -------------------------------------------------------------------------
SHOW_EPILOG = """\
targets (the positional WORKLOAD and the --diff operands):
  vit_b                      a named workload (swin_t, paper expand to one kernel per launch)
  vit_b@h200                 the same, looked up in another GPU's DB
  shape:1,12,197,64[@h100]   a raw (B, H, N, D) shape
  config:block_n=256,...     a config, rendered as is (no lookup)

stdout is the artefact (source, diff or assembly); the lookup path goes to stderr.
exit status: 0 done, 1 compile failed, 2 usage error.

examples:
  qflash-show vit_b --gpu h100
  qflash-show --config block_m=64,block_n=256,exp_variant=poly2
  qflash-show --diff config:block_n=128 config:block_n=256
  qflash-show --diff vit_b@h100 vit_b@h200
  qflash-show vit_b --gpu h100 --asm ptx           # cross-compiles for sm90 without a GPU
"""


def _show_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qflash-show",
        description="Print the Triton source (or its TTIR..SASS) of the kernel qflash-gen runs for a workload.",
        epilog=SHOW_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", nargs="?", help="workload name (vit_b, swin_t, A1..A7, …) or a target spec")
    p.add_argument("--gpu", help="GPU whose tuning DB is consulted (h100, h200, …; default: the GPU present)")
    p.add_argument("--shape", help="raw attention shape B,H,N,D instead of a workload")
    p.add_argument(
        "--masked", action="store_true", help="the masked / biased variant (Swin workloads are masked already)"
    )
    p.add_argument("--batch", type=int, default=1, help="images per batch for a workload (default 1)")
    p.add_argument("--dtype", choices=DTYPES, default="fp16", help="workload input dtype (default fp16)")
    p.add_argument("--out-dtype", choices=DTYPES, help="workload output dtype (default: --dtype)")
    p.add_argument("--config", metavar="FIELD=V,…", help="render this config (fields over the default config)")
    p.add_argument("--diff", nargs=2, metavar=("A", "B"), help="unified diff of two targets' configs and sources")
    p.add_argument("-U", "--context", type=int, default=0, help="context lines in --diff hunks (default 0)")
    p.add_argument("--asm", choices=ASM_STAGES, help="compile and print this stage instead of the source")
    p.add_argument("--arch", help="compile for this arch (sm80, sm90, …; default: --gpu's, else the GPU present)")
    p.add_argument("--db", action="append", metavar="DIR", help="tuning DB folder(s), lowest priority first")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto", help="highlighting (default auto)")
    return p


def _run_show(args: argparse.Namespace, printer: Printer) -> int:
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    if args.context < 0:
        raise UsageError(f"--context must be >= 0, got {args.context}")
    if args.arch and not args.asm:
        raise UsageError("--arch only applies with --asm")
    args.database = open_db(args.db) if args.db else None
    if args.diff:
        if args.target or args.shape or args.config or args.asm:
            raise UsageError("--diff takes its two targets itself; drop WORKLOAD/--shape/--config/--asm")
        a_list, b_list = resolve_spec(args.diff[0], args), resolve_spec(args.diff[1], args)
        if len(a_list) != len(b_list):
            raise UsageError(f"--diff operands name {len(a_list)} and {len(b_list)} kernels; compare like with like")
        for a, b in zip(a_list, b_list, strict=True):
            note(f"# A: {a.describe()}\n# B: {b.describe()}")
            text = diff_targets(a, b, context=args.context)
            if text:
                printer.code(text, "diff")
            else:
                note("# identical: same config, same source")
        return 0
    targets = show_targets(args)
    for t in targets:
        if args.asm:
            if t.shape is None:
                raise UsageError("--asm compiles for a shape: give a WORKLOAD or --shape B,H,N,D with --config")
            arch = pick_arch(args.arch, t.gpu or args.gpu)
            res = compile_asm(t.config, t.shape, masked=t.masked, out_dtype=t.out_dtype, arch=arch)
            c = _COMMENT.get(args.asm, "//")
            if not printer.color:  # piped to a file: the summary still reaches the terminal
                note(f"# {t.describe()}\n# {res.summary()}")
            printer.code(f"{c} qflash-show: {t.describe()}\n{c} {res.summary()}\n" + res.stages[args.asm], args.asm)
        else:
            note(f"# {t.describe()}")
            if len(targets) > 1:  # several kernels in one stream: say where each starts
                printer.line(f"# ==== qflash-show: {t.describe()}")
            printer.code(t.text, "python")
    return 0



def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qflash-show``; returns the exit status."""
    parser = _show_parser()
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    return guard(lambda: _run_show(args, Printer(args.color)), parser.prog)

