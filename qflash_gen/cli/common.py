"""What ``qflash-show`` and ``qflash-db`` share: errors and exit codes, output, argument parsers.

Conventions of both commands:

* stdout carries the artefact (source, diff, assembly, YAML, table); notes such as the lookup
  path go to stderr, so ``qflash-show vit_b > k.py`` writes exactly the rendered file;
* colour only on a terminal (``--color auto``), plain text when piped;
* exit status 0 = done, 1 = the thing asked for failed (compile error, corrupt DB file),
  2 = usage error (unknown workload, bad ``--config`` value, ...), always without a traceback.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from qflash_gen import config as config_mod
from qflash_gen import db, workloads
from qflash_gen.codegen.asm import CompileError
from qflash_gen.config import DEFAULT_CONFIG, KernelConfig
from qflash_gen.gpu import is_valid_gpu_name
from qflash_gen.keys import DTYPE_NAMES

DTYPES: tuple[str, ...] = DTYPE_NAMES
_LEXERS = {"llir": "llvm"}  # pygments has no MLIR/PTX/SASS lexer: those stay plain text


class UsageError(Exception):
    """Bad command line (unknown workload, malformed value, ...): exit status 2."""


class CommandError(Exception):
    """The request was understood but could not be carried out: exit status 1."""


# -- small parsers -------------------------------------------------------------------------
def parse_config(text: str, base: KernelConfig = DEFAULT_CONFIG) -> KernelConfig:
    """``config.parse_config`` with its errors as :class:`UsageError` (``--config``, ``--try``)."""
    try:
        return config_mod.parse_config(text, base)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``B,H,N,D`` (SDPA layout) → a 4-tuple of ints."""
    parts = [p.strip() for p in text.split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 0:
        raise UsageError(f"shape {text!r} is not B,H,N,D (four non-negative ints, e.g. 1,12,197,64)")
    return dims  # type: ignore[return-value]


def parse_arch(text: str) -> int:
    """``sm90`` / ``sm_90a`` / ``90`` / ``9.0`` → compute capability 90 (what GPUTarget takes)."""
    m = re.fullmatch(r"(?:sm_?)?(\d+)(?:\.(\d))?a?", text.strip().lower())
    if not m:
        raise UsageError(f"--arch {text!r} is not an NVIDIA arch such as sm80, sm90, sm_90a, sm100 or 9.0")
    cap = int(m.group(1)) * 10 + int(m.group(2)) if m.group(2) is not None else int(m.group(1))
    if cap < 70:
        raise UsageError(f"--arch {text!r}: Triton's CUDA backend needs sm70 or newer (int8 dots need sm80)")
    return cap



def workload_shapes(name: str, batch: int) -> list[tuple[str, tuple[int, int, int, int], bool]]:
    """``vit_b`` -> [(label, (B, H, N, D), masked)]; ``swin_t`` gives one row per stage."""
    try:
        return workloads.attention_shapes(name, batch=batch)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# -- output ------------------------------------------------------------------------------
class Printer:
    """Writes artefacts to stdout: highlighted with rich on a terminal, plain bytes otherwise."""

    def __init__(self, color: str = "auto", stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        if color == "auto":
            self.color = self.stream.isatty() and "NO_COLOR" not in os.environ
        else:
            self.color = color == "always"

    def code(self, text: str, lexer: str = "python") -> None:
        if not self.color:
            self.stream.write(text if text.endswith("\n") or not text else text + "\n")
            self.stream.flush()
            return
        from rich.console import Console
        from rich.syntax import Syntax

        body = text.rstrip("\n")
        # As wide as the longest line: rich would otherwise fold lines at its console width and
        # `--color always | less -R` would show another text than the plain output.
        width = max((len(line) for line in body.splitlines()), default=0) + 1
        console = Console(file=self.stream, force_terminal=True, width=max(width, 20))
        lexer = _LEXERS.get(lexer, lexer if lexer in ("python", "diff", "yaml") else "text")
        console.print(Syntax(body, lexer, theme="monokai", background_color="default"))

    def table(self, table: Any) -> None:
        from rich import box
        from rich.console import Console

        if self.color:
            Console(file=self.stream, force_terminal=True).print(table)
            return
        # Piped: ASCII rules, wide enough that no cell wraps, no trailing padding.
        table.box = box.ASCII2
        console = Console(file=io.StringIO(), force_terminal=False, no_color=True, width=1000)
        with console.capture() as cap:
            console.print(table)
        self.stream.write("".join(line.rstrip() + "\n" for line in cap.get().splitlines()))
        self.stream.flush()

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def note(message: str) -> None:
    """A human note on stderr (lookup path, compile target): never mixed into the artefact."""
    print(message, file=sys.stderr, flush=True)

# -- DB layers shared by both commands -------------------------------------------------------
def open_db(dirs: Sequence[str] | None) -> db.TuningDB:
    """``--db DIR|FILE`` (repeatable, lowest priority first) or the default layers (shipped, user)."""
    if not dirs:
        try:
            return db.TuningDB.default()
        except ValueError as exc:  # $QFLASH_GEN_DB names a file that is not <gpu>.yaml
            raise UsageError(str(exc)) from None
    for d in dirs:
        path = Path(d)
        if db.is_file_layer(path):
            if not path.is_file():
                raise UsageError(f"--db {d}: no such DB file (give a <gpu>.yaml file or the folder holding them)")
            if not is_valid_gpu_name(path.stem) or path.suffix != ".yaml":
                raise UsageError(f"--db {d}: a DB file is named <gpu>.yaml with a short GPU name, e.g. h100.yaml")
        elif not path.is_dir():
            raise UsageError(f"--db {d}: not a directory or a <gpu>.yaml file (give the folder holding them)")
    return db.TuningDB(list(dirs))


def layer_name(path: Path) -> str:
    parent = path.parent.resolve()
    if parent == db.shipped_db_dir().resolve():
        return "shipped"
    try:
        user = db.user_db_location()
    except ValueError:
        return str(path.parent)
    if path.resolve() == user.resolve() or parent == user.resolve():
        return "user"
    return str(path.parent)


# -- running a command -------------------------------------------------------------------
def guard(fn: Callable[[], int], prog: str) -> int:
    """Map our exceptions to exit codes and one-line messages: no traceback for user errors."""
    try:
        return fn()
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (CommandError, CompileError, db.DBError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `qflash-show vit_b | head`: the reader left, not an error
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's flush at exit
        except OSError:
            pass
        return 0


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 on --help
        return int(exc.code or 0)


