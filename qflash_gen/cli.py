"""Console scripts ``qflash-show`` and ``qflash-db``: read the kernel that runs, and the DB behind it.

A tuned kernel is only trusted when it can be read.  ``qflash-show`` prints the exact Triton
source the runtime would launch for a workload on a GPU (byte-identical to the cached file, whose
name is its sha256), says why that config was picked (``exact`` / ``nearest:<key>`` /
``sibling:<gpu>:...`` / ``default``), diffs two variants, and compiles one down to TTIR … SASS
with its register, spill and shared-memory use.  ``qflash-db`` lists, shows, validates and reports on the YAML tuning DBs.

Conventions shared by both commands:

* stdout carries the artefact (source, diff, assembly, YAML, table); notes such as the lookup
  path go to stderr, so ``qflash-show vit_b > k.py`` writes exactly the rendered file;
* colour only on a terminal (``--color auto``), plain text when piped;
* exit status 0 = done, 1 = the thing asked for failed (compile error, corrupt DB file),
  2 = usage error (unknown workload, bad ``--config`` value, …), always without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import fnmatch
import importlib.util
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TextIO

import yaml

from qflash_gen import codegen
from qflash_gen.config import DEFAULT_CONFIG, KernelConfig, check_workload

if TYPE_CHECKING:  # heavy or optional imports stay lazy: `qflash-show --config` needs neither
    from qflash_gen import db as db_mod

ASM_STAGES: tuple[str, ...] = ("ttir", "ttgir", "llir", "ptx", "sass")
DTYPES: tuple[str, ...] = ("int8", "fp16", "bf16", "fp32")
SQNR_FLOOR_DB = 30.0  # DESIGN §6: the tuner's default accuracy floor, drawn on the report
_LEXERS = {"llir": "llvm"}  # pygments has no MLIR/PTX/SASS lexer: those stay plain text
_COMMENT = {"llir": ";"}  # every other stage (MLIR, PTX, SASS) comments with //


class UsageError(Exception):
    """Bad command line (unknown workload, malformed value, …): exit status 2."""


class CommandError(Exception):
    """The request was understood but could not be carried out: exit status 1."""


# -- small parsers -------------------------------------------------------------------------
def _field_types() -> dict[str, type]:
    # KernelConfig uses `from __future__ import annotations`, so field types are strings.
    return {f.name: int if f.type in ("int", int) else str for f in dataclasses.fields(KernelConfig)}


def parse_config(text: str, base: KernelConfig = DEFAULT_CONFIG) -> KernelConfig:
    """``block_m=64,block_n=256,exp_variant=poly2`` → KernelConfig (unnamed fields from ``base``).

    Values of int fields are parsed as ints so the user types what the YAML stores.  Switching
    ``rescale`` to ``idiv`` or ``exp_variant`` away from ``lut`` resets the field that becomes
    meaningless (``rescale_bits`` / ``lut_bits``) unless it is given too (and ``exp_variant=lut``
    starts at ``lut_bits=5``); otherwise every such config would need that field spelled out.
    Errors are KernelConfig's own ValueError text, raised as :class:`UsageError`.
    """
    types = _field_types()
    changes: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise UsageError(f"--config item {item!r} is not NAME=VALUE (fields: {', '.join(types)})")
        if name not in types:
            raise UsageError(f"unknown KernelConfig field {name!r}; known: {', '.join(types)}")
        if types[name] is int:
            try:
                changes[name] = int(value, 0)
            except ValueError:
                raise UsageError(f"KernelConfig.{name}={value!r} is not supported: expected an int") from None
        else:
            changes[name] = value
    if changes.get("rescale") in ("idiv", "split") and "rescale_bits" not in changes:
        changes["rescale_bits"] = 0
    if changes.get("rescale") == "shift" and "rescale_bits" not in changes and base.rescale_bits == 0:
        changes["rescale_bits"] = 8  # the paper's Q8 alpha
    if "exp_variant" in changes and "lut_bits" not in changes:
        if changes["exp_variant"] == "lut" and base.lut_bits == 0:
            changes["lut_bits"] = 5  # DESIGN §8: k=5 is the documented starting point
        elif changes["exp_variant"] != "lut":
            changes["lut_bits"] = 0
    try:
        return KernelConfig.from_dict({**base.to_dict(), **changes})
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
def open_db(dirs: Sequence[str] | None) -> db_mod.TuningDB:
    """``--db DIR`` (repeatable, lowest priority first) or the default layers (shipped, user)."""
    from qflash_gen import db

    if not dirs:
        return db.TuningDB.default()
    for d in dirs:
        if not Path(d).is_dir():
            raise UsageError(f"--db {d}: not a directory (give the folder holding <gpu>.yaml files)")
    return db.TuningDB(list(dirs))


def _layer_name(path: Path) -> str:
    from qflash_gen import db

    parent = path.parent.resolve()
    if parent == db.shipped_db_dir().resolve():
        return "shipped"
    if parent == db.user_db_dir().resolve():
        return "user"
    return str(path.parent)


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


def workload_shapes(name: str, batch: int) -> list[tuple[str, tuple[int, int, int, int], bool]]:
    """``vit_b`` → [(label, (B, H, N, D), masked)]; ``swin_t`` gives one row per stage."""
    from qflash_gen import workloads

    try:
        return workloads.attention_shapes(name, batch=batch)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def lookup(
    label: str,
    shape: tuple[int, int, int, int],
    *,
    masked: bool,
    gpu: str | None,
    dtype: str,
    out_dtype: str | None,
    database: db_mod.TuningDB | None,
) -> Target:
    """What the runtime picks for this shape on ``gpu`` (``get_kernel``, nothing launched)."""
    from qflash_gen.kernel import get_kernel

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


# -- assembly ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AsmResult:
    """One compiled kernel: every stage's text plus the resource line an engineer looks for."""

    arch: int
    arch_name: str  # what ptxas was given, e.g. sm_90a (Triton picks the arch-specific variant)
    stages: dict[str, str]
    registers: int | None
    spill_stores: int | None
    spill_loads: int | None
    stack: int | None
    shared: int
    num_warps: int
    num_stages: int

    def summary(self) -> str:
        def val(x: int | None) -> str:
            return "?" if x is None else str(x)

        return (
            f"{self.arch_name}: registers {val(self.registers)}/thread, spills {val(self.spill_stores)} B stores / "
            f"{val(self.spill_loads)} B loads, stack {val(self.stack)} B, shared {self.shared} B, "
            f"num_warps {self.num_warps}, num_stages {self.num_stages}"
        )


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


def _gpu_arch(gpu: str | None) -> int | None:
    """The compute capability a short GPU name implies (``qflash_gen.gpu.KNOWN_GPUS``)."""
    from qflash_gen.gpu import KNOWN_GPUS

    spec = KNOWN_GPUS.get(gpu) if gpu else None
    return None if spec is None else spec.cc[0] * 10 + spec.cc[1]


def pick_arch(arch: str | None, gpu: str | None) -> int:
    """``--arch`` wins; else the card named by ``--gpu``; else the GPU present; else a clear error."""
    if arch:
        return parse_arch(arch)
    cap = _gpu_arch(gpu)
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


def _load_compilable(source: str) -> ModuleType:
    """Import the rendered source under its own module name, apart from ``codegen.load``'s cache.

    Keeps ``--asm`` independent of whatever ``codegen.load`` imported earlier in this process."""
    path = codegen.write_source(source)
    name = f"qflash_gen_kernels._asm{codegen.source_hash(source)[:20]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - importlib contract
        raise CommandError(f"cannot import rendered kernel {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


class _Ptr:
    """Stands in for a CUDA tensor argument: Triton only asks for its dtype and alignment."""

    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 0  # CUDA allocations are 256-byte aligned; 0 specializes the same way ("D")


def kernel_arguments(
    config: KernelConfig, shape: tuple[int, int, int, int], *, masked: bool, out_dtype: str
) -> tuple[list[Any], dict[str, Any]]:
    """The positional and keyword arguments ``runtime.launch`` passes, for contiguous inputs.

    Triton specializes on argument values (ints equal to 1 become constants, multiples of 16 get
    a divisibility hint), so the strides are the real ones of contiguous (B, H, N, D) tensors and
    of a (1, H, N, N) bias expanded over B, as Swin's relative-position bias is."""
    import torch

    from qflash_gen.keys import torch_dtype

    b, h, n, d = shape
    qkv = (h * n * d, n * d, d, 1)
    bias = (0, n * n, n, 1) if masked else (0, 0, 0, 0)
    ptrs = [_Ptr(torch.int8)] * 3 + [_Ptr(torch_dtype(out_dtype))]
    ptrs += [_Ptr(torch.int32), _Ptr(torch.int32), _Ptr(torch.float32), _Ptr(torch.int32)]
    args: list[Any] = [*ptrs, *qkv, *qkv, *qkv, *qkv, *bias, h]
    kwargs = dict(
        N_CTX=n, HEAD_DIM=d, HAS_BIAS=masked, OUT_FLOAT=out_dtype != "int8", V_KEYS=n,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, HPP=config.heads_for(b * h),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if config.max_regs:
        kwargs["maxnreg"] = config.max_regs
    return args, kwargs


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _ptxas_usage(ptx: str, arch: int) -> dict[str, int | None]:
    """Registers, stack and spills from ``ptxas -v`` on the PTX Triton produced.

    Triton learns ``n_regs``/``n_spills`` only when it loads the cubin on a device; running the
    ptxas it ships with the same ``--gpu-name`` gives the same numbers on any machine."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", str(src)]
        proc = subprocess.run([*cmd, "-o", str(src) + ".o"], capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    usage: dict[str, int | None] = {}
    for name, rx in _PTXAS_RE.items():
        m = rx.search(log)
        usage[name] = int(m.group(1)) if m else None
    return usage


def compile_asm(
    config: KernelConfig,
    shape: tuple[int, int, int, int],
    *,
    masked: bool,
    out_dtype: str,
    arch: int,
) -> AsmResult:
    """Compile the rendered kernel exactly as the runtime's launch would, for ``sm_<arch>``.

    Uses the kernel's own binder so signature, constants and divisibility hints match a real
    launch, then ``triton.compile(ASTSource, target=GPUTarget("cuda", arch, 32))``: Triton ships
    ptxas/cuobjdump, so every stage down to SASS is produced without a GPU."""
    if _interpreter_on():
        return _compile_asm_subprocess(config, shape, masked=masked, out_dtype=out_dtype, arch=arch)
    return _compile_asm(config, shape, masked=masked, out_dtype=out_dtype, arch=arch)


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _compile_asm(
    config: KernelConfig, shape: tuple[int, int, int, int], *, masked: bool, out_dtype: str, arch: int
) -> AsmResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    module = _load_compilable(codegen.render(config))
    fn = getattr(module, codegen.KERNEL_NAME)
    target = GPUTarget("cuda", arch, 32)
    try:
        backend = make_backend(target)
    except RuntimeError as exc:
        raise CommandError(f"Triton {triton.__version__} cannot target sm_{arch}: {exc}") from None
    args, kwargs = kernel_arguments(config, shape, masked=masked, out_dtype=out_dtype)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as exc:  # CompilationError, PTXASError, MLIR pass failures: all user-facing
        raise CommandError(f"compiling {config.short()} for sm_{arch} failed:\n{exc}") from None
    stages = {stage: compiled.asm[stage] for stage in ("ttir", "ttgir", "llir", "ptx")}
    try:
        stages["sass"] = compiled.asm["sass"]
    except Exception as exc:  # cuobjdump missing or failing: keep the other stages usable
        stages["sass"] = f"// SASS unavailable (cuobjdump): {exc}\n"
    usage = _ptxas_usage(stages["ptx"], arch)
    return AsmResult(
        arch=arch,
        arch_name=sm_arch_from_capability(arch),
        stages=stages,
        registers=usage["registers"],
        spill_stores=usage["spill_stores"],
        spill_loads=usage["spill_loads"],
        stack=usage["stack"],
        shared=int(compiled.metadata.shared),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _compile_asm_subprocess(
    config: KernelConfig, shape: tuple[int, int, int, int], *, masked: bool, out_dtype: str, arch: int
) -> AsmResult:
    """Compile in a child process with ``TRITON_INTERPRET`` unset.

    Under the interpreter (the CPU test setup) ``import triton`` already turned Triton's own
    ``@jit`` helpers (``tl.max``, ``tl.sum``, …) into interpreter objects, which the compiler
    rejects; flipping the knob back in-process is not enough, a fresh interpreter is."""
    request = {"config": config.to_dict(), "shape": list(shape), "masked": masked, "out_dtype": out_dtype, "arch": arch}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", "from qflash_gen.cli import _asm_worker; _asm_worker()"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    try:
        reply = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise CommandError(f"the compile worker died (exit {proc.returncode}):\n{proc.stderr[-4000:]}") from None
    if "error" in reply:
        raise CommandError(reply["error"])
    return AsmResult(**reply["result"])


def _asm_worker() -> None:
    """Child side of :func:`_compile_asm_subprocess`: JSON request on stdin, JSON reply on stdout."""
    req = json.loads(sys.stdin.read())
    try:
        res = _compile_asm(
            KernelConfig.from_dict(req["config"]),
            tuple(req["shape"]),
            masked=req["masked"],
            out_dtype=req["out_dtype"],
            arch=req["arch"],
        )
        reply: dict[str, Any] = {"result": dataclasses.asdict(res)}
    except (CommandError, UsageError) as exc:
        reply = {"error": str(exc)}
    sys.stdout.write(json.dumps(reply))


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


def _guard(fn: Callable[[], int], prog: str) -> int:
    """Map our exceptions to exit codes and one-line messages: no traceback for user errors."""
    from qflash_gen import db

    try:
        return fn()
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (CommandError, db.DBError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `qflash-show vit_b | head`: the reader left, not an error
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's flush at exit
        except OSError:
            pass
        return 0


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 on --help
        return int(exc.code or 0)


def show_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qflash-show``; returns the exit status."""
    parser = _show_parser()
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    return _guard(lambda: _run_show(args, Printer(args.color)), parser.prog)


# -- qflash-db: reading every file, including broken ones ------------------------------------
@dataclasses.dataclass
class FileStatus:
    """One DB file as ``ls``/``check`` see it: parsed, or the error that stops it being read."""

    layer: str
    path: Path
    parsed: db_mod.DBFile | None
    error: str | None


def scan(database: db_mod.TuningDB, gpu: str | None = None) -> list[FileStatus]:
    """Every ``*.yaml`` in every layer (or only ``<gpu>.yaml``), read with :func:`db.load_file`.

    Unlike ``TuningDB.entries`` this does not stop at the first corrupt file: ``check`` must
    report all of them."""
    from qflash_gen import db
    from qflash_gen.gpu import is_valid_gpu_name

    out: list[FileStatus] = []
    for d in database.dirs:
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.yaml")):
            if gpu is not None and path.stem != gpu:
                continue
            layer = _layer_name(path)
            if not is_valid_gpu_name(path.stem):
                msg = f"{path}: file name {path.name!r} is not <gpu>.yaml with a short GPU name ([a-z0-9_])"
                out.append(FileStatus(layer, path, None, msg))
                continue
            try:
                out.append(FileStatus(layer, path, db.load_file(path), None))
            except db.DBError as exc:
                out.append(FileStatus(layer, path, None, str(exc)))
    return out


def _fmt_us(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _fmt_db(x: float | None) -> str:
    if x is None:
        return "-"
    return "exact" if math.isinf(x) else f"{x:.1f}"


def _best_baseline(entry: db_mod.Entry) -> tuple[str, float] | None:
    if not entry.baselines:
        return None
    name = min(entry.baselines, key=lambda k: entry.baselines[k])
    return name, float(entry.baselines[name])


def _workload_labels(names: str = "paper", batches: Iterable[int] = (1, 8, 64)) -> dict[tuple, list[str]]:
    """(N, D, masked, B*H bucket) → ["A3 b1", …]: which named workload/batch an entry serves."""
    from qflash_gen import workloads
    from qflash_gen.keys import bh_bucket

    out: dict[tuple, list[str]] = {}
    for w in workloads.resolve(names):
        for b in batches:
            bb, h, n, d = w.shape(b)
            out.setdefault((n, d, w.masked, bh_bucket(bb * h)), []).append(f"{w.name} b{b}")
    return out


def _labels_for(key: Any, labels: dict[tuple, list[str]]) -> str:
    return ", ".join(labels.get((key.n, key.d, key.masked, key.bh_bucket), []))


def _db_ls(args: argparse.Namespace, printer: Printer) -> int:
    from rich.table import Table

    database = open_db(args.db)
    files = scan(database, args.gpu)
    if not files:
        where = ", ".join(str(d) for d in database.dirs)
        note(f"no tuning DB files{' for ' + args.gpu if args.gpu else ''} in {where}")
        return 0
    t = Table(title="tuning DB files", title_justify="left")
    for col in ("gpu", "layer", "file", "cc", "device", "triton", "template", "usable", "stale", "updated"):
        t.add_column(col)
    for f in files:
        if f.parsed is None:
            t.add_row(f.path.stem, f.layer, str(f.path), "", "", "", "", "", "", f"CORRUPT: {f.error}")
            continue
        h = f.parsed.header
        t.add_row(
            h.gpu, f.layer, str(f.path), h.compute_capability or "-", h.device_name or "-", h.triton or "-",
            (h.template_hash or "-")[:12], str(len(f.parsed.entries)), str(len(f.parsed.stale)), h.updated or "-",
        )  # fmt: skip
    printer.table(t)
    labels = _workload_labels()
    for gpu in sorted({f.path.stem for f in files if f.parsed is not None}):
        located = _located(database, gpu)
        e = Table(title=f"{gpu}: entries in use (layers overlaid)", title_justify="left")
        for col in ("key", "workloads", "config", "latency µs", "± µs", "best SDPA µs", "speedup", "SQNR dB", "trials",
                    "from"):  # fmt: skip
            e.add_column(col)
        for key in sorted(located, key=lambda k: (k.n, k.d, k.masked, k.in_dtype, k.out_dtype, k.bh_bucket)):
            entry, origin = located[key]
            base = _best_baseline(entry)
            e.add_row(
                key.to_str(), _labels_for(key, labels), entry.config.short(), _fmt_us(entry.latency_us),
                _fmt_us(entry.latency_spread_us), f"{base[1]:.2f} ({base[0]})" if base else "-",
                f"{base[1] / entry.latency_us:.2f}x" if base else "-", _fmt_db(entry.sqnr_db), str(entry.trials),
                _layer_name(origin),
            )  # fmt: skip
        if located:
            printer.table(e)
        else:
            printer.line(f"{gpu}: no entries in use (every workload runs the safe default)")
        stale = [(f, s) for f in files if f.parsed is not None and f.path.stem == gpu for s in f.parsed.stale]
        for f, s in stale:
            printer.line(f"  stale (not used): {s.key} at {f.path}:{s.line}: {s.reason}")
    return 1 if any(f.error for f in files) else 0


def _located(database: db_mod.TuningDB, gpu: str) -> dict[Any, tuple[Any, Path]]:
    """``TuningDB.located`` over the readable files only (a corrupt layer is reported by ls/check)."""
    from qflash_gen import db

    out: dict[Any, tuple[Any, Path]] = {}
    for path in database.files(gpu):
        try:
            f = db.load_file(path)
        except db.DBError:
            continue
        for key, entry in f.entries.items():
            out[key] = (entry, path)
    return out


def _parse_key_arg(args: argparse.Namespace) -> Any:
    """``show KEY``: a key string (n197_d64_nomask_bh16_fp16-fp16) or a workload name + --batch."""
    from qflash_gen.keys import WorkloadKey, workload_key

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
    keys = _parse_key_arg(args)
    files = scan(database, args.gpu)
    docs: list[dict[str, Any]] = []
    for key in keys:
        ks = key.to_str()
        for gpu in sorted({f.path.stem for f in files}):
            located = _located(database, gpu)
            for f in (f for f in files if f.path.stem == gpu):
                if f.parsed is None:
                    docs.append({"gpu": gpu, "file": str(f.path), "status": f"CORRUPT: {f.error}"})
                    continue
                entry = f.parsed.entries.get(key)
                if entry is not None:
                    in_use = located.get(key, (None, None))[1] == f.path
                    doc = {
                        "gpu": gpu,
                        "file": str(f.path),
                        "layer": f.layer,
                        "status": "in use" if in_use else f"overridden by {located[key][1]}",
                        **entry.to_dict(),
                    }
                    base = _best_baseline(entry)
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
        files.append(_check_file(Path(extra)))
    if not files:
        note(f"no tuning DB files in {', '.join(str(d) for d in database.dirs)}: nothing to check")
        return 0
    corrupt = stale = 0
    for f in files:
        if f.parsed is None:
            corrupt += 1
            printer.line(f"CORRUPT {f.error}")
            continue
        bad_render = []
        for key, entry in f.parsed.entries.items():
            try:  # a config that validates but no longer renders would only fail at launch
                codegen.render(entry.config)
            except Exception as exc:  # noqa: BLE001 - report every failure kind, keep checking
                bad_render.append(f"{key.to_str()}: render failed: {exc}")
        n_ok = len(f.parsed.entries)
        printer.line(
            f"{'OK' if not bad_render else 'BROKEN'}      {f.path}: {n_ok} usable, {len(f.parsed.stale)} stale"
        )
        for s in f.parsed.stale:
            stale += 1
            printer.line(f"  stale   {f.path}:{s.line}: {s.key}: {s.reason}")
        for msg in bad_render:
            corrupt += 1
            printer.line(f"  BROKEN  {msg}")
    summary = f"{len(files)} file(s), {corrupt} corrupt, {stale} stale entr{'y' if stale == 1 else 'ies'}"
    note(summary)
    if corrupt:
        return 1
    return 1 if args.strict and stale else 0


def _check_file(path: Path) -> FileStatus:
    from qflash_gen import db

    try:
        return FileStatus("file", path, db.load_file(path), None)
    except db.DBError as exc:
        return FileStatus("file", path, None, str(exc))


# -- qflash-db report ------------------------------------------------------------------------
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

    @property
    def best_baseline(self) -> tuple[str, float] | None:
        if not self.baselines:
            return None
        name = min(self.baselines, key=lambda k: self.baselines[k])
        return name, self.baselines[name]

    @property
    def label(self) -> str:
        return self.workloads.split(",")[0] if self.workloads else self.key


def report_rows(database: db_mod.TuningDB, gpu: str, names: str = "paper") -> list[ReportRow]:
    """Entries in use on ``gpu``, labelled with the workloads/batches they serve, in workload order."""
    located = _located(database, gpu)
    labels = _workload_labels(names)
    order = {lab: i for i, labs in enumerate(labels.values()) for lab in labs}
    rows = []
    for key, (entry, _) in located.items():
        wl = _labels_for(key, labels)
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
            )
        )
    rows.sort(key=lambda r: (order.get(r.label, len(order)), r.key))
    return rows


def bench_baselines(path: Path) -> dict[str, dict[str, float]]:
    """SDPA times per DB key from a ``tools/bench.py`` CSV (rows ``mode=fp16``, ``impl=sdpa_*``:
    do_bench medians, the protocol of the DB's own latencies).  The bench runs unmasked attention,
    so only unmasked keys get baselines."""
    import csv

    import torch

    from qflash_gen.keys import workload_key

    if not path.is_file():
        raise UsageError(f"--bench {path}: no such file (a CSV written by tools/bench.py)")
    out: dict[str, dict[str, float]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.DictReader(fh), start=2):
            try:
                if row.get("mode") != "fp16" or not row.get("impl", "").startswith("sdpa_"):
                    continue
                shape = tuple(int(row[c]) for c in ("B", "H", "N", "D"))
                us = float(row["us"])
            except (KeyError, TypeError, ValueError) as exc:
                raise UsageError(f"--bench {path}:{i}: not a tools/bench.py row ({exc})") from None
            key = workload_key(shape, masked=False, in_dtype=torch.float16).to_str()
            slot = out.setdefault(key, {})
            slot[row["impl"]] = min(us, slot.get(row["impl"], us))
    return out


def with_bench_baselines(rows: list[ReportRow], path: Path) -> list[ReportRow]:
    """Rows with SDPA baselines from a bench CSV added (an entry's own recorded baselines win)."""
    bench = bench_baselines(path)
    return [dataclasses.replace(r, baselines={**bench.get(r.key, {}), **r.baselines}) for r in rows]


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
    # qflash-lease:* studies are the distributed tuner's claims (tune/lease.py), not tuning runs.
    names = [
        s.study_name
        for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        if not s.study_name.startswith("qflash-lease:")
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
            if t.state != TrialState.COMPLETE or not t.values:
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
            f"updated {h.updated or '?'}; {len(f.parsed.entries)} usable, {len(f.parsed.stale)} stale"
        )
    lines += ["", "## Latency and accuracy per entry", ""]
    if rows:
        lines.append("| workloads | key | config | latency µs | ± µs | best SDPA µs | speedup | SQNR dB | trials |")
        lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            best = r.best_baseline
            lines.append(
                f"| {r.workloads or '-'} | `{r.key}` | `{r.config}` | {r.latency_us:.2f} | {r.spread_us:.2f} | "
                + (f"{best[1]:.2f} ({best[0]}) | {best[1] / r.latency_us:.2f}x" if best else "- | -")
                + f" | {_fmt_db(r.sqnr_db)} | {r.trials} |"
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


def _db_report(args: argparse.Namespace, printer: Printer) -> int:
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


DB_EPILOG = """\
DB folders: --db DIR (repeatable, lowest priority first); default: the shipped tuning_db/ and the
user DB ($QFLASH_GEN_DB, else <user cache dir>/qflash-gen/tuning_db), user entries on top.
exit status: 0 done, 1 a corrupt file (or, with check --strict, a stale entry), 2 usage error.

examples:
  qflash-db ls
  qflash-db show n197_d64_nomask_bh16_fp16-fp16 --gpu h100
  qflash-db show vit_b --batch 8 --gpu h100
  qflash-db check
  qflash-db report --gpu h100 --out report.md
  qflash-db report --gpu h100 --out report.png --storage ~/.cache/qflash-gen/tune/studies.journal --study 'qflash/h100/A3/*'
"""


def _db_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", action="append", metavar="DIR", help="tuning DB folder(s), lowest priority first")
    common.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    p = argparse.ArgumentParser(
        prog="qflash-db",
        description="List, show, validate and report on qflash-gen's YAML tuning databases.",
        epilog=DB_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{ls,show,check,report}")
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
    rep = sub.add_parser("report", parents=[common], help="latency vs SDPA, SQNR and tuning history (PNG or MD)")
    rep.add_argument("--gpu", required=True, help="GPU whose entries are reported")
    rep.add_argument("--out", required=True, help="report.png (plot) or report.md (tables; plot next to it)")
    rep.add_argument("--workloads", default="paper", help="names that label entries (default paper = A1..A7)")
    rep.add_argument("--storage", help="Optuna storage of the tuning runs (journal file or URL)")
    rep.add_argument("--study", help="study name, or a glob such as 'qflash/h100/*'")
    rep.add_argument(
        "--bench", metavar="CSV", help="SDPA baselines from a tools/bench.py CSV (docs/benchmarks/<gpu>.csv)"
    )
    return p


def db_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qflash-db``; returns the exit status."""
    parser = _db_parser()
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    run = {"ls": _db_ls, "show": _db_show, "check": _db_check, "report": _db_report}[args.command]
    # Every command lists stale entries itself, with file:line; db's per-file WARNING would repeat them.
    db_logger = logging.getLogger("qflash_gen.db")
    level = db_logger.level
    db_logger.setLevel(logging.ERROR)
    try:
        return _guard(lambda: run(args, Printer(args.color)), f"{parser.prog} {args.command}")
    finally:
        db_logger.setLevel(level)


__all__ = [
    "ASM_STAGES",
    "AsmResult",
    "CommandError",
    "Target",
    "UsageError",
    "compile_asm",
    "db_main",
    "diff_targets",
    "parse_arch",
    "parse_config",
    "parse_shape",
    "show_main",
]
