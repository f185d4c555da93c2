"""Kernel == integer oracle, element for element, for every variant of the template.

The matrix: exp variant x rescale x accumulator width x P width (7, 14 bits) x {online,
single-pass} x {unmasked, bias+mask}, each on odd shapes (N in 1, 17, 33, 40, 49, 197; D in 32,
64, 128; B*H > 1).  The inputs span the whole int8 range (-128 included) with planted extreme rows
(`helpers.plant_extremes`: a sharply peaked row, a saturating row of tied maxima, a flat row at
the accumulators' worst case, value channels of all -128 and all 127).  Runs through the
interpreter on CPU and compiled on a GPU (same test, `device` fixture).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import assert_bit_equal, int8_problem, run_both, swin_like_bias

from qflash_gen import KernelConfig, check_workload

pytestmark = pytest.mark.gpu

EXPS = [("shift", 0), ("idiv", 0), ("poly2", 0), ("lut", 5)]
RESCALES = [("shift", 8), ("idiv", 0), ("split", 0)]
ACCS = [32, 64]
P_BITS = [7, 14]
# (mode, [(N, D, block_m, block_n)]): online needs block_n < N; single-pass block_n >= N.
# The 16-row tail tile of a partial query block (both bodies): tests/test_heads_per_program.py.
SHAPES = {
    "online": [(49, 32, 32, 32), (197, 64, 128, 64), (40, 128, 32, 32)],
    "single": [(1, 64, 16, 32), (17, 32, 32, 32), (49, 64, 64, 64), (197, 32, 128, 256), (33, 128, 32, 64)],
}
MATRIX = [
    (exp, rs, acc, pb, mode, masked)
    for exp, rs, acc, pb, mode, masked in itertools.product(EXPS, RESCALES, ACCS, P_BITS, SHAPES, (False, True))
    # split == shift with 15 bits, so with int64 it adds nothing to shift8 x acc64: keep it to int32
    if not (rs[0] == "split" and acc == 64)
]


def _id(p):
    (exp, _), (rs, _), acc, pb, mode, masked = p
    return f"{exp}-{rs}-acc{acc}-p{pb}-{mode}-{'bias+mask' if masked else 'plain'}"


def _refused(rs: str, acc: int, p_bits: int, mode: str) -> bool:
    """Where int32 can overflow online (check_workload must refuse): |acc| * R (idiv), and
    |acc| * 2**8 (shift8) once p reaches 16383; split never (its products stay <= |acc|)."""
    return acc == 32 and mode == "online" and (rs == "idiv" or (rs == "shift" and p_bits == 14))


@pytest.mark.parametrize("case", MATRIX, ids=[_id(p) for p in MATRIX])
def test_kernel_equals_oracle(case, device):
    (exp, lut_bits), (rs, rs_bits), acc, p_bits, mode, masked = case
    refused = _refused(rs, acc, p_bits, mode)
    for i, (n, d, bm, bn) in enumerate(SHAPES[mode]):
        cfg = KernelConfig(
            block_m=bm, block_n=bn, exp_variant=exp, lut_bits=lut_bits, rescale=rs, rescale_bits=rs_bits,
            acc_bits=acc, p_bits=p_bits,
        )  # fmt: skip
        b, h = (1, 2) if i % 2 == 0 else (2, 1)
        q8, k8, v8 = int8_problem(b, h, n, d, seed=n * 7 + d + acc, device=device, extremes=True)
        scales = (0.03 + 0.01 * i, 0.025, 0.04)
        bias = mask = None
        if masked:
            bias, mask = swin_like_bias(b, h, n, seed=n, device=device)
        out_dtype = torch.float16 if (i + acc) % 2 else torch.int8
        if refused:
            with pytest.raises(ValueError, match="overflows int32"):
                check_workload(cfg, n, d)
            with pytest.raises(ValueError, match="overflows int32"):
                run_both(q8, k8, v8, scales, cfg, attn_mask=mask, float_bias=bias, out_dtype=out_dtype)
            continue
        got, want = run_both(q8, k8, v8, scales, cfg, attn_mask=mask, float_bias=bias, out_dtype=out_dtype)
        assert_bit_equal(got, want)


@pytest.mark.parametrize("out_dtype", [torch.int8, torch.float16, torch.bfloat16, torch.float32])
def test_output_dtypes(out_dtype, device):
    cfg = KernelConfig(block_m=32, block_n=32, exp_variant="poly2")
    q8, k8, v8 = int8_problem(1, 2, 40, 32, seed=3, device=device)
    got, want = run_both(q8, k8, v8, (0.05, 0.05, 0.02), cfg, out_dtype=out_dtype)
    assert_bit_equal(got, want)
