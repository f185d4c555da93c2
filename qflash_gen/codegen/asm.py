"""Compile a rendered kernel down to TTIR, TTGIR, LLIR, PTX and SASS (``qflash-show --asm``).

The kernel is compiled with the arguments a real launch passes (:func:`kernel_arguments`, from
:mod:`.signature` like every launcher), through Triton's own binder, so the signature, the
constants and the divisibility hints match; ``triton.compile`` with a ``GPUTarget`` then runs
the whole pipeline, and the ptxas and cuobjdump that Triton ships produce the SASS and the
register and spill counts: no GPU is needed.

Under ``TRITON_INTERPRET`` (the CPU test setup) Triton's own ``@jit`` helpers are interpreter
objects the compiler rejects, so :func:`compile_asm` then compiles in a child process started
without the variable (``python -m qflash_gen.codegen.asm``, JSON over stdin/stdout).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from qflash_gen.codegen import signature
from qflash_gen.codegen.artifacts import import_source
from qflash_gen.codegen.render import KERNEL_NAME, render
from qflash_gen.config import KernelConfig
from qflash_gen.keys import torch_dtype

ASM_STAGES: tuple[str, ...] = ("ttir", "ttgir", "llir", "ptx", "sass")


class CompileError(RuntimeError):
    """The kernel could not be compiled for the asked target (the message says why)."""


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


class PointerStandIn:
    """Stands in for a CUDA tensor argument: Triton only asks for its dtype and alignment."""

    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 0  # CUDA allocations are 256-byte aligned; 0 specializes the same way ("D")


def kernel_arguments(
    config: KernelConfig, shape: tuple[int, int, int, int], *, masked: bool, out_dtype: str
) -> tuple[list[Any], dict[str, Any]]:
    """The positional arguments and launch options a launch passes, for contiguous inputs.

    Triton specializes on argument values (ints equal to 1 become constants, multiples of 16 get
    a divisibility hint), so the strides are the real ones of contiguous (B, H, N, D) tensors and
    of a (1, H, N, N) bias expanded over B, as Swin's relative-position bias is."""
    import torch

    b, h, n, d = shape
    qkv = (h * n * d, n * d, d, 1)
    f32 = PointerStandIn(torch.float32)
    args = signature.pack(
        PointerStandIn(torch.int8), PointerStandIn(torch.int8), PointerStandIn(torch.int8),
        PointerStandIn(torch_dtype(out_dtype)), f32, _ParamsStandIn(f32, _C_BITS), (0, 0), 1,
        PointerStandIn(torch.int32) if config.exp_variant == "lut" else f32,
        qkv, qkv, qkv, qkv, (0, n * n, n, 1) if masked else (0, 0, 0, 0),
        h, n, d, masked, out_dtype != "int8", n, config.tail_rows(n), config.heads_for(b * h),
    )  # fmt: skip
    return list(args), signature.launch_options(config)


_C_BITS = 0x3FC71547652B82FE  # float64 bits of log2(e) / 8 (the softmax scale at D = 64): any value specializes alike


@dataclasses.dataclass(frozen=True)
class _ParamsStandIn:
    scales: PointerStandIn
    c_bits: int


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
    """Compile the rendered kernel exactly as the runtime's launch would, for ``sm_<arch>``
    (CompileError with the compiler's message when it fails)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return _compile_in_child(config, shape, masked=masked, out_dtype=out_dtype, arch=arch)
    return _compile(config, shape, masked=masked, out_dtype=out_dtype, arch=arch)


def _compile(
    config: KernelConfig, shape: tuple[int, int, int, int], *, masked: bool, out_dtype: str, arch: int
) -> AsmResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    # its own module name: independent of whatever the launch path imported in this process
    fn = getattr(import_source(render(config), prefix="_asm"), KERNEL_NAME)
    target = GPUTarget("cuda", arch, 32)
    try:
        backend = make_backend(target)
    except RuntimeError as exc:
        raise CompileError(f"Triton {triton.__version__} cannot target sm_{arch}: {exc}") from None
    args, kwargs = kernel_arguments(config, shape, masked=masked, out_dtype=out_dtype)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, sig, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    try:
        compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as exc:  # CompilationError, PTXASError, MLIR pass failures: all user-facing
        raise CompileError(f"compiling {config.short()} for sm_{arch} failed:\n{exc}") from None
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


def _compile_in_child(
    config: KernelConfig, shape: tuple[int, int, int, int], *, masked: bool, out_dtype: str, arch: int
) -> AsmResult:
    request = {"config": config.to_dict(), "shape": list(shape), "masked": masked, "out_dtype": out_dtype, "arch": arch}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "qflash_gen.codegen.asm"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    try:
        reply = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise CompileError(f"the compile child died (exit {proc.returncode}):\n{proc.stderr[-4000:]}") from None
    if "error" in reply:
        raise CompileError(reply["error"])
    return AsmResult(**reply["result"])


def child_main() -> None:
    """The child of :func:`compile_asm` under the interpreter: a JSON request on stdin, a JSON
    reply on stdout."""
    req = json.loads(sys.stdin.read())
    try:
        res = _compile(
            KernelConfig.from_dict(req["config"]),
            tuple(req["shape"]),
            masked=req["masked"],
            out_dtype=req["out_dtype"],
            arch=req["arch"],
        )
        reply: dict[str, Any] = {"result": dataclasses.asdict(res)}
    except CompileError as exc:
        reply = {"error": str(exc)}
    sys.stdout.write(json.dumps(reply))


if __name__ == "__main__":
    child_main()
