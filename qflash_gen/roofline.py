"""How close one measured qflash call comes to each hardware limit: HBM bandwidth, the dense int8
tensor rate and the integer-ALU rate (``tools/bench.py`` reports them for the int8-in kernel).

For a call on (B, H, N, D) with a config, :func:`counts` gives the work by hand:

* bytes: int8 q, k, v read once and the fp16 output written once, ``3·BHND + 2·BHND``;
* int8 MMA ops: ``2·BHN²D`` for QKᵀ plus the same for PV, twice for PV when ``p_bits == 14``
  (P goes through two int8 MMAs): useful ops, not the padded tiles;
* scores ``B·H·N²`` and padded scores ``B·H·⌈N/BLOCK_M⌉·BLOCK_M·⌈N/BLOCK_N⌉·BLOCK_N``.

The integer work comes from the kernel's SASS (:func:`sass_classes`): per-thread instructions by
opcode, classed as integer ALU pipe, integer multiply-add (``IMAD*``, on the FMA pipe), float,
memory, tensor, control, uniform (once per warp, on the uniform datapath) or other.  The static
count is what each program executes only for one key tile (``BLOCK_N >= N``: no key loop), one
head per program (``heads_per_program`` 1 at this B·H) and no tail tile (``N`` a multiple of
``BLOCK_M``, or a tail as large as a block): the kernel then has one row-block body.  Otherwise
the ALU fraction and the count per score are None.

The ALU floor model: the ALU pipe and the FMA pipe (where IMAD runs) each have 64 INT32 lanes per
SM (16 per sub-partition) and issue independently, one lane-cycle per thread-instruction, at the
max SM clock; the floor is the busier of the two.  It is a lower-bound model (no latency, no
occupancy), not a profiler measurement.  An earlier model put IMAD and ALU-pipe instructions on
the same 64 lanes; Nsight Compute on an H100 measured ViT-B at 39 % (ALU) and 41 % (FMA-heavy) pipe
activity where that model said 86 % (docs/perf-notes.md, fourth session).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import subprocess

from qflash_gen.config import KernelConfig
from qflash_gen.gpu import peaks

# The per-GPU peaks (Peaks, peaks()) live in the one table of GPU facts, qflash_gen.gpu.KNOWN_GPUS.


DEFAULT_CLOCK_MHZ = 1980.0  # H100/H200 SXM max SM clock


def max_sm_clock_mhz(device: int = 0) -> tuple[float, str]:
    """``(MHz, source)``: the max SM clock from NVML, else ``nvidia-smi``, else 1980 MHz."""
    pci = None
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(device)
            pci = f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
    except Exception:  # noqa: BLE001 - no torch, no CUDA, or props without PCI fields
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByPciBusId(pci) if pci else pynvml.nvmlDeviceGetHandleByIndex(device)
            return float(pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)), "NVML max SM clock"
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - pynvml missing, no driver, NVMLError_*
        pass
    try:
        cmd = ["nvidia-smi", f"--id={pci or device}", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout
        return float(out.split()[0]), "nvidia-smi clocks.max.sm"
    except Exception:  # noqa: BLE001 - no nvidia-smi, or output not a number
        return DEFAULT_CLOCK_MHZ, "default (no NVML or nvidia-smi)"


# -- work of one call ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Counts:
    bytes: int  # int8 q, k, v in + fp16 out
    mma_ops: int  # useful int8 MMA ops (multiply and add counted apart)
    scores: int  # B·H·N²
    padded_scores: int  # over whole BLOCK_M x BLOCK_N tiles
    programs: int  # B·H·ceil(N / BLOCK_M)


def counts(shape: tuple[int, int, int, int], config: KernelConfig) -> Counts:
    b, h, n, d = shape
    bh = b * h
    pv_mmas = 2 if config.p_bits == 14 else 1
    m_tiles, n_tiles = -(-n // config.block_m), -(-n // config.block_n)
    return Counts(
        bytes=3 * bh * n * d + 2 * bh * n * d,
        mma_ops=(1 + pv_mmas) * 2 * bh * n * n * d,
        scores=bh * n * n,
        padded_scores=bh * m_tiles * config.block_m * n_tiles * config.block_n,
        programs=bh * m_tiles,
    )


# -- SASS ------------------------------------------------------------------------------------------
# One instruction line, in either form Triton/cuobjdump print:
#   "--:-:1:Y:4\t@!P0 IMAD.MOV.U32 R2, RZ, RZ, RZ;"  or  "/*0040*/  @P0 BRA `(.L_x_1) ;"
_INSTR = re.compile(
    r"^\s*(?:[\w-]{2}:[\w-]:[\w-]:[\w-]:[\w-]+\s+)?"  # control codes (scoreboards, yield, stall)
    r"(?:/\*[0-9a-fA-F]+\*/\s*)?"  # address
    r"(?:@!?U?P[T0-9]+\s+)?"  # guard predicate
    r"([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)(?=[\s;]|$)"  # opcode with its modifiers
)

ALU_OPS = frozenset(
    "IADD3 IADD IADD32I LOP3 LOP LOP32I SHF SHL SHR PRMT SEL ISETP IMNMX VIMNMX VIMNMX3 VIADD VIADDMNMX "
    "IABS LEA SGXT BMSK POPC FLO BREV I2IP MOV MOV32I".split()
)
FLOAT_OPS = frozenset(
    "FFMA FFMA32I FMUL FMUL32I FADD FADD32I FMNMX FSEL FSET FSETP FCHK FRND FSWZADD F2F F2FP I2F I2FP F2I "
    "MUFU HADD2 HMUL2 HFMA2 HMNMX2 HSETP2 DADD DMUL DFMA DSETP".split()
)
MEMORY_OPS = frozenset(
    "LD ST LDG STG LDS STS LDSM STSM LDC LDL STL ATOM ATOMG ATOMS RED LDGSTS LDGDEPBAR SHFL "
    "UBLKCP UTMALDG UTMASTG UTMAPF SYNCS".split()
)
TENSOR_OPS = frozenset("IGMMA HGMMA QGMMA BGMMA IMMA HMMA DMMA WARPGROUP".split())
CONTROL_OPS = frozenset(
    "BRA BRX JMP EXIT RET CALL BSSY BSYNC BAR MEMBAR FENCE DEPBAR WARPSYNC YIELD BPT ERRBAR KILL".split()
)
CLASSES = ("alu", "imad", "float", "memory", "tensor", "control", "uniform", "other")


def classify(opcode: str) -> str:
    """The class of one opcode (modifiers allowed): one of :data:`CLASSES`."""
    base = opcode.split(".", 1)[0]
    if base.startswith("IMAD"):  # IMAD, IMAD.MOV, IMAD.SHL, IMAD.WIDE, IMAD.HI, IMAD.IADD ...
        return "imad"
    for cls, ops in (
        ("alu", ALU_OPS),
        ("float", FLOAT_OPS),
        ("memory", MEMORY_OPS),
        ("tensor", TENSOR_OPS),
        ("control", CONTROL_OPS),
    ):
        if base in ops:
            return cls
    if base.startswith("U") or base in ("S2UR", "R2UR", "VOTEU"):
        return "uniform"  # ULDC, UIADD3, USHF, UMOV ...: once per warp
    return "other"  # S2R, CS2R, PLOP3, VOTE, P2R, ...


def sass_opcodes(sass: str) -> collections.Counter[str]:
    """Per-thread instructions of the kernel's main body by opcode (with modifiers).

    The main body ends at the last ``EXIT``: what follows is called subroutines (the slow path of
    float division) and padding.  ``NOP`` is not counted; non-instruction lines (labels, headers,
    the nvdisasm warning) are skipped."""
    ops: list[str] = []
    last_exit = 0
    for line in sass.splitlines():
        m = _INSTR.match(line)
        if m is None or "warning" in line:
            continue
        op = m.group(1)
        if op.split(".", 1)[0] == "NOP":
            continue
        ops.append(op)
        if op.split(".", 1)[0] == "EXIT":
            last_exit = len(ops)
    return collections.Counter(ops[: last_exit or len(ops)])


def sass_classes(sass: str) -> dict[str, int]:
    """Per-thread instruction counts by class (every class of :data:`CLASSES` present)."""
    out = dict.fromkeys(CLASSES, 0)
    for op, k in sass_opcodes(sass).items():
        out[classify(op)] += k
    return out


def int_instructions(sass: str) -> int:
    """Integer instructions per thread: ALU pipe plus IMAD."""
    c = sass_classes(sass)
    return c["alu"] + c["imad"]


def busiest_int_pipe(sass: str) -> int:
    """Per-thread instructions on the busier integer pipe: max(ALU pipe, IMAD on the FMA pipe)."""
    c = sass_classes(sass)
    return max(c["alu"], c["imad"])


def one_body(shape: tuple[int, int, int, int], config: KernelConfig) -> bool:
    """True where each program runs the kernel's whole static body once (see the module doc)."""
    b, h, n, _ = shape
    return config.block_n >= n and config.heads_for(b * h) == 1 and config.tail_rows(n) == config.block_m


# -- fractions -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Fractions:
    """Fraction of each limit one call reaches (None: unknown GPU, or not modelled)."""

    hbm: float | None
    mma: float | None
    alu: float | None
    int_instr_per_score: float | None  # integer thread-instructions per (unpadded) score


def fractions(
    shape: tuple[int, int, int, int],
    config: KernelConfig,
    us: float,
    gpu: str,
    *,
    clock_mhz: float = DEFAULT_CLOCK_MHZ,
    sass: str | None = None,
) -> Fractions:
    """Fractions of ``gpu``'s peaks reached by one call of ``us`` microseconds.

    ``alu`` and ``int_instr_per_score`` need the SASS of this config and shape and a kernel with
    one body per program (:func:`one_body`); ``int_instr_per_score`` does not need a known GPU."""
    c = counts(shape, config)
    per_score = alu_ops = None
    if sass is not None and one_body(shape, config):
        threads = 32 * config.num_warps * c.programs
        alu_ops = busiest_int_pipe(sass) * threads
        per_score = int_instructions(sass) * threads / c.scores if c.scores else None
    pk = peaks(gpu)
    if pk is None or not us > 0 or not math.isfinite(us):
        return Fractions(None, None, None, per_score)
    s = us * 1e-6
    alu = None
    if alu_ops is not None:
        alu = alu_ops / (s * pk.sms * pk.int32_lanes_per_sm * clock_mhz * 1e6)
    return Fractions(c.bytes / s / pk.hbm_bytes_per_s, c.mma_ops / s / pk.int8_ops_per_s, alu, per_score)
