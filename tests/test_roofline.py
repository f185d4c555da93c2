"""qflash_gen.roofline: work counts by hand, the SASS classifier, and when fractions are None."""

from __future__ import annotations

import sys

import pytest

from qflash_gen import roofline
from qflash_gen.config import DEFAULT_CONFIG, KernelConfig

# Triton's SASS form (control codes, tab, instruction), one cuobjdump-style line, the nvdisasm
# warning, labels, and a subroutine after the last EXIT that must not be counted.
SNIPPET = """\
nvdisasm warning : Disassembling Std Elf to Old format or Old Elf to Std format not supported yet
Function:_qflash_fwd
--:-:0:-:8\tLDC R1, c[0x0][0x28];
--:-:-:-:1\tULDC.64 UR4, c[0x0][0x250];
02:-:-:Y:4\tIABS R6, R5;
--:-:-:-:2\t@!P1 IMAD.IADD R3, R3, 0x1, -R6;
--:-:-:-:1\t@P0 VIADD R0, R0, 0x1;
--:-:-:Y:3\tLOP3.LUT R2, R4, R5, RZ, 0x3c, !PT;
--:-:-:-:1\tIMAD.MOV.U32 R2, RZ, RZ, RZ;
--:-:-:-:1\tIMAD.WIDE.U32 R4, R3, 0x4, R4;
--:-:-:-:1\tSHF.R.S32.HI R7, RZ, 0x1f, R3;
--:-:-:Y:d\tISETP.GE.U32.AND P0, PT, R3, R6, PT;
        /*0040*/                   @!P0 IADD3 R0, R0, 0x1, RZ ;     /* 0x0000000100008810 */
--:-:-:-:1\tWARPGROUP.ARRIVE;
--:-:-:-:1\tIGMMA.64x32x32.S8.S8 R24, gdesc[UR4], RZ, !UPT;
--:-:-:-:1\tFFMA R3, R2, R4, R5;
--:-:-:-:1\tI2FP.F32.S32 R3, R2;
--:-:-:-:1\tMUFU.RCP R0, R0;
--:-:-:-:6\t@!P0 BRA LBB0;
LBB0:
--:-:-:-:1\tSTG.E.U16 desc[UR4][R2.64], R5;
--:-:-:-:5\t@P4 EXIT;
--:-:-:-:5\tEXIT;
--:-:-:Y:7\tFADD.FTZ R13, R17, R6;
--:-:-:-:5\tRET.REL.NODEC R12 0x0;
LBB11:
--:-:-:Y:0\tBRA LBB11;
--:-:-:Y:0\tNOP;
"""
SNIPPET_CLASSES = dict(alu=6, imad=3, float=3, memory=2, tensor=2, control=3, uniform=1, other=0)


def test_counts_by_hand():
    cfg = KernelConfig(block_m=64, block_n=64, p_bits=7)
    c = roofline.counts((2, 3, 100, 64), cfg)
    assert c.bytes == 3 * 38400 + 2 * 38400  # B·H·N·D = 2·3·100·64 = 38400
    assert c.mma_ops == 2 * (2 * 6 * 100 * 100 * 64)  # QKᵀ + PV
    assert c.scores == 60000
    assert c.padded_scores == 6 * 128 * 128
    assert c.programs == 12
    c14 = roofline.counts((2, 3, 100, 64), KernelConfig(block_m=32, block_n=256, p_bits=14))
    assert c14.mma_ops == 3 * (2 * 6 * 100 * 100 * 64)  # PV twice at 14-bit P
    assert c14.padded_scores == 6 * 128 * 256
    assert c14.programs == 6 * 4


def test_classifier_on_snippet():
    ops = roofline.sass_opcodes(SNIPPET)
    assert ops["IMAD.MOV.U32"] == 1 and ops["IMAD.IADD"] == 1 and ops["IADD3"] == 1
    assert ops["EXIT"] == 2 and ops["BRA"] == 1  # the self-loop after the last EXIT is not counted
    assert "FADD.FTZ" not in ops and "NOP" not in ops
    assert not any(op.startswith(("@", "nvdisasm", "Function", "LBB")) for op in ops)
    assert roofline.sass_classes(SNIPPET) == SNIPPET_CLASSES
    assert roofline.int_instructions(SNIPPET) == 9


@pytest.mark.parametrize(
    "op, cls",
    [
        ("IMAD.SHL.U32", "imad"),
        ("LEA.HI.X.SX32", "alu"),
        ("VIMNMX3", "alu"),
        ("MOV", "alu"),
        ("F2FP.F16.F32.PACK_AB", "float"),
        ("LDSM.16.M88.4", "memory"),
        ("HGMMA.64x64x16.F32", "tensor"),
        ("UIADD3", "uniform"),
        ("S2R", "other"),
    ],
)
def test_classify(op, cls):
    assert roofline.classify(op) == cls


def test_fractions_by_hand():
    shape, us, clock = (2, 3, 49, 32), 10.0, 1500.0
    f = roofline.fractions(shape, DEFAULT_CONFIG, us, "h100", clock_mhz=clock, sass=SNIPPET)
    c = roofline.counts(shape, DEFAULT_CONFIG)
    threads = 32 * DEFAULT_CONFIG.num_warps * 6  # 6 programs: one per head at N=49 <= BLOCK_M
    int_ops = 9 * threads
    assert f.hbm == pytest.approx(c.bytes / 10e-6 / 3.35e12)
    assert f.mma == pytest.approx(c.mma_ops / 10e-6 / 1979e12)
    # the busier integer pipe: 6 ALU-pipe instructions against 3 IMAD, 64 lanes each per SM
    assert f.alu == pytest.approx(6 * threads / (10e-6 * 132 * 64 * 1500e6))
    assert f.int_instr_per_score == pytest.approx(int_ops / (6 * 49 * 49))
    h200 = roofline.fractions(shape, DEFAULT_CONFIG, us, "h200", clock_mhz=clock, sass=SNIPPET)
    assert h200.hbm == pytest.approx(f.hbm * 3.35 / 4.8)


def test_fractions_none_for_unknown_gpu_and_key_loop():
    shape = (1, 12, 197, 64)
    unknown = roofline.fractions(shape, DEFAULT_CONFIG, 50.0, "a100", sass=SNIPPET)
    assert (unknown.hbm, unknown.mma, unknown.alu) == (None, None, None)
    assert unknown.int_instr_per_score is None  # block_n=64 < N=197: a key loop
    looped = roofline.fractions(shape, DEFAULT_CONFIG, 50.0, "h100", sass=SNIPPET)
    assert looped.hbm is not None and looped.mma is not None
    assert looped.alu is None and looped.int_instr_per_score is None
    # one key tile, but a 16-row tail tile (N=197, BLOCK_M=64) or 2 heads per program: the SASS
    # holds two row-block bodies or a loop, so its static count is not a program's work
    vit = DEFAULT_CONFIG.replace(block_n=256)
    assert vit.tail_rows(197) == 16 and not roofline.one_body(shape, vit)
    tail = roofline.fractions(shape, vit, 50.0, "h100", sass=SNIPPET)
    assert tail.alu is None and tail.int_instr_per_score is None and tail.hbm is not None
    grouped = DEFAULT_CONFIG.replace(heads_per_program=2)
    assert roofline.one_body((2, 3, 49, 32), DEFAULT_CONFIG) and not roofline.one_body((2, 3, 49, 32), grouped)
    assert roofline.one_body((1, 3, 49, 32), grouped)  # B*H = 3: one head per program after all
    no_sass = roofline.fractions((1, 3, 49, 32), DEFAULT_CONFIG, 5.0, "h100")
    assert no_sass.alu is None and no_sass.hbm is not None
    assert roofline.fractions((1, 3, 49, 32), DEFAULT_CONFIG, 0.0, "h100").hbm is None


def test_clock_default_without_nvml_or_nvidia_smi(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError

    def no_smi(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(roofline.subprocess, "run", no_smi)
    mhz, source = roofline.max_sm_clock_mhz()
    assert mhz == roofline.DEFAULT_CLOCK_MHZ and source.startswith("default")


def test_classifier_on_real_sm90_sass():
    from qflash_gen.codegen import asm

    shape = (1, 3, 49, 32)
    try:
        asm = asm.compile_asm(DEFAULT_CONFIG, shape, masked=False, out_dtype="fp16", arch=90)
    except asm.CompileError as exc:
        pytest.skip(f"Triton cannot compile for sm_90 here: {exc}")
    sass = asm.stages["sass"]
    if "SASS unavailable" in sass:
        pytest.skip(sass.strip())
    ops = roofline.sass_opcodes(sass)
    assert any(op.startswith("IGMMA") for op in ops)
    classes = roofline.sass_classes(sass)
    assert classes["alu"] > 0 and classes["imad"] > 0 and classes["tensor"] > 0
    assert classes["alu"] + classes["imad"] > classes["float"]  # the integer softmax dominates
    # Swin-T stage 1 at b=64: 4096 windows x 3 heads, one program per head (N=49 <= BLOCK_M).
    f = roofline.fractions((64 * 64, 3, 49, 32), DEFAULT_CONFIG, 40.0, "h100", sass=sass)
    assert 5 < f.int_instr_per_score < 200
    assert 0 < f.alu < 10
