"""The suite's power, guarded: small bugs planted in copies of the kernel, the oracle and the
quantizers must each be caught (the mutant is "killed"): a copy's output must differ from the
unmutated other side's.

Each mutant is one text substitution, asserted to apply exactly as often as stated: a later edit
that removes its pattern fails here loudly instead of passing vacuously.  It is applied to a copy:

* ``kernel``: the rendered kernel source of the mutant's config, written to the kernel cache (the
  session's temp folder, tests/conftest.py) under another module name and launched as the
  package launches it; compared with the unmutated oracle;
* ``reference`` / ``quant``: ``qflash_gen/reference.py`` or ``qflash_gen/quant.py`` written to
  ``tmp_path`` and imported as a fresh module (the oracle built on a mutated ``quant`` reads its
  scale constants and bias conversion); compared with the unmutated kernel;
* ``quant_kernels``: the fused quantizer written to ``tmp_path`` and imported (Triton JITs from
  the file); compared with the torch quantization ``quant.quantize_dynamic``, and the torch
  quantization of a mutated ``quant`` with the unmutated fused quantizer.

One small, deterministic case per mutant (int8 inputs over the whole range with extreme rows,
per-(batch, head) scales, a float bias per window with masked keys, a fully masked row, NaN and
huge values, float inputs beyond the static scales' range, float inputs with a shared k
component, of subnormal size or with NaN / Inf).  Before a mutant is judged, the unmutated pair
must agree on its case: a kill is the mutation's doing.  Run on one small case each, the list
takes seconds; a mutant that survives means a test lost its power (or a new equivalent rewrite).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_bit_equal, int8_problem, kernel_device

from qflash_gen import codegen, launch, quant, quant_kernels, reference
from qflash_gen.config import DEFAULT_CONFIG, KernelConfig
from qflash_gen.quant_kernels import Chunked

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
N, D = 40, 32  # N = 40: a partial last key tile (8 keys + 24 padding) and a 16-row tail tile

# configs (block_m 32: query blocks of 32 + a tail of 16 rows; block_n 32 online, 64 single pass)
ONLINE7 = KernelConfig(block_m=32, block_n=32)  # shift exp, shift8 rescale, 7-bit P, int32
SPLIT14 = DEFAULT_CONFIG.replace(block_m=32, block_n=32)  # shift exp, split rescale, 14-bit P
POLY2 = SPLIT14.replace(exp_variant="poly2")
POLY2_7 = ONLINE7.replace(exp_variant="poly2")
LUT = SPLIT14.replace(exp_variant="lut", lut_bits=5)
IDIV = KernelConfig(block_m=32, block_n=32, exp_variant="idiv", rescale="idiv", rescale_bits=0, acc_bits=64)
SINGLE14 = DEFAULT_CONFIG.replace(block_m=32, block_n=64)  # one pass, two int8 halves of P (umulhi)
INLOAD = DEFAULT_CONFIG  # float inputs, N <= block_m: quantized in the kernel's loads


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    target: str  # "kernel" (rendered source) | "reference" | "quant" | "quant_kernels"
    old: str
    new: str
    cfg: KernelConfig | None = None  # kernel / oracle mutants: the config run
    case: str = "plain"  # see _case
    out_dtype: torch.dtype = torch.int8
    count: int = 1  # occurrences of `old` in the source


def K(name, old, new, cfg, case="plain", out_dtype=torch.int8, count=1):
    return Mutant(name, "kernel", old, new, cfg, case, out_dtype, count)


MUTANTS = [
    # -- the rendered kernel (templates/*.jinja) ---------------------------------------------------
    K("poly2 Horner shift", "g = 32768 - ((f * t) >> 13)", "g = 32768 - ((f * t) >> 14)", POLY2),
    K(
        "padding keys not dead",
        "s = s + tl.where(col_ok, 0, DEAD)[None, :]",
        "s = s + tl.where(col_ok, 0, 0)[None, :]",
        SPLIT14,
    ),
    K(
        "split rescale low half unrounded",
        "(((mag & 32767) * a + 16384) >> 15)",
        "(((mag & 32767) * a + 0) >> 15)",
        SPLIT14,
        "plain",
        torch.float32,
    ),
    K("int8 output rounding", "o8 = (mag + (den >> 1)) // den", "o8 = (mag + (den >> 2)) // den", ONLINE7),
    K("int8 clamp at -127", "tl.maximum(o8, -128)", "tl.maximum(o8, -127)", SINGLE14),
    K("shift exp offset 14R", "Y_OFF = 15 * R", "Y_OFF = 14 * R", SINGLE14),
    K("shift exp HP rounded down", "HP = (16383 * 16384 + R - 1) // R", "HP = (16383 * 16384) // R", SINGLE14),
    K("umulhi p >> 8", "tl.full((), 1 << 25, tl.uint32)", "tl.full((), 1 << 24, tl.uint32)", SINGLE14, count=2),
    K("tail tile on the wrong block", "if pid_m == N_CTX // BLOCK_M:", "if pid_m == N_CTX // BLOCK_M - 1:", ONLINE7),
    K("bias -inf not masked", 'return tl.where(b == float("-inf"), -1073741824, bi)', "return bi", SPLIT14, "bias"),
    K(
        "scale groups: batch stride dropped",
        "Scales, off_z * stride_sz + off_h * stride_sh, C_LOG2E",
        "Scales, off_h * stride_sh, C_LOG2E",
        ONLINE7,
    ),
    K(
        "float bias truncated",
        "bi = ((x + 6755399441055744.0) - 6755399441055744.0).to(tl.int32)",
        "bi = x.to(tl.int32)",
        SPLIT14,
        "bias",
    ),
    K(
        "window bias row z // Z",
        "Bias + (off_z % BIAS_ZMOD) * stride_bz",
        "Bias + (off_z // BIAS_ZMOD) * stride_bz",
        SPLIT14,
        "bias",
    ),
    K(
        "R = floor(1/S)",
        "tl.floor(tl.where(S > 0.0, 1.0 / S, 65535.0) + 0.5)",
        "tl.floor(tl.where(S > 0.0, 1.0 / S, 65535.0))",
        ONLINE7,
    ),
    K("exp quotient >> 27", "q = (y * MQ) >> 26", "q = (y * MQ) >> 27", POLY2),
    K("lut index one bit short", "tl.load(LUT + (f >> 9))", "tl.load(LUT + (f >> 10))", LUT),
    K("idiv rescale unrounded", "mag = (tl.abs(x) * a + (rr >> 1)) // rr", "mag = (tl.abs(x) * a) // rr", IDIV),
    K("shift rescale alpha truncated", "a = ((alpha + 64) >> 7)", "a = ((alpha + 0) >> 7)", ONLINE7),
    K("l not rescaled", "l_i = _rescale(l_i, alpha, R) + ", "l_i = l_i + ", SPLIT14),
    K("requant floor", "return (e * 127 + 16384) >> 15", "return (e * 127 + 0) >> 15", POLY2_7),
    K(
        "float inputs clamp at -128",
        "y = tl.minimum(tl.maximum(y, -127.0), 127.0)",
        "y = tl.minimum(tl.maximum(y, -128.0), 127.0)",
        INLOAD,
        "float",
    ),
    K(
        "bf16 output truncated",
        "bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16",
        "bits = bits >> 16",
        SPLIT14,
        "plain",
        torch.bfloat16,
    ),
    K(
        "float output scale sq",
        "return R, MQ, MQ32, HF, HP, Y_OFF, SQI, SKI, SVI, RL, sv",
        "return R, MQ, MQ32, HF, HP, Y_OFF, SQI, SKI, SVI, RL, sq",
        SPLIT14,
        "plain",
        torch.float16,
    ),
    K(
        "masked keys score NEG, not DEAD",
        "s = tl.where(b > MASKED, s + b, DEAD)",
        "s = tl.where(b > MASKED, s + b, NEG)",
        SPLIT14,
        "bias",
    ),
    K("bias NaN not zeroed", "x = tl.where(x == x, x, 0.0)", "x = x", SPLIT14, "bias"),
    K("bias clamp dropped", "x = tl.minimum(tl.maximum(x, -268435456.0), 268435456.0)", "x = x", SPLIT14, "bias"),
    K("masked rows divide by l = 0", "has_l = l_i > 0", "has_l = l_i >= 0", SPLIT14, "bias", torch.float16),
    K(
        "float output reciprocal then multiply",
        "inv_l = tl.math.div_rn(tl.full([BM], 1.0, tl.float32) * OUT_MUL, tl.where(has_l, l_i, 1).to(tl.float32))",
        "inv_l = tl.math.div_rn(tl.full([BM], 1.0, tl.float32), tl.where(has_l, l_i, 1).to(tl.float32)) * OUT_MUL",
        SPLIT14,
        "plain",
        torch.float32,
    ),
    K("float inputs NaN kept", "y = tl.where(y == y, y, 0.0)", "y = y", INLOAD, "float"),
    K(
        "float inputs truncated",
        "r = (y + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000",
        "r = y.to(tl.int32)",
        INLOAD,
        "float",
    ),
    K(
        "online P.V high half weight 2**6",
        "pv = tl.dot((p >> 7).to(tl.int8), v, out_dtype=tl.int32) * 128",
        "pv = tl.dot((p >> 7).to(tl.int8), v, out_dtype=tl.int32) * 64",
        SPLIT14,
    ),
    # -- the oracle (qflash_gen/reference.py, qflash_gen/quant.py) ---------------------------------
    Mutant(
        "oracle requant rounding constant",
        "reference",
        "return (e * config.p_max + 16384) >> 15",
        "return (e * config.p_max + 8192) >> 15",
        POLY2_7,
    ),
    Mutant("oracle int8 clamp at -127", "reference", ".clamp(-128, 127)", ".clamp(-127, 127)", SINGLE14),
    Mutant(
        "oracle split rescale low half unrounded",
        "reference",
        "(((mag & 32767) * alpha + 16384) >> 15)",
        "(((mag & 32767) * alpha + 0) >> 15)",
        SPLIT14,
        "plain",
        torch.float32,
    ),
    Mutant(
        "oracle shift exp offset 14R",
        "reference",
        "y = torch.minimum(y + 15 * r_, 31 * r_ - 1)",
        "y = torch.minimum(y + 14 * r_, 31 * r_ - 1)",
        SINGLE14,
    ),
    Mutant(
        "oracle int8 output rounding",
        "reference",
        "o = (mag + (den >> 1)) // den",
        "o = (mag + (den >> 2)) // den",
        ONLINE7,
    ),
    Mutant("oracle poly2 Horner shift", "reference", "g = Q15 - ((f * t) >> 13)", "g = Q15 - ((f * t) >> 14)", POLY2),
    Mutant(
        "oracle float bias truncated",
        "quant",
        "out = torch.round(x).clamp(",
        "out = torch.trunc(x).clamp(",
        SPLIT14,
        "bias",
    ),
    Mutant("oracle R = floor(1/S)", "quant", "torch.floor(inv + 0.5)", "torch.floor(inv)", ONLINE7),
    Mutant(
        "oracle bias -inf not masked",
        "quant",
        "return torch.where(neg_inf, torch.full_like(out, MASKED_BIAS), out)",
        "return out",
        SPLIT14,
        "bias",
    ),
    Mutant(
        "oracle lut table truncated",
        "reference",
        "vals = [round(Q15 * 2.0 ** (-i / n)) for i in range(2 * n)]",
        "vals = [int(Q15 * 2.0 ** (-i / n)) for i in range(2 * n)]",
        LUT,
    ),
    Mutant(
        "oracle float output reciprocal then multiply",
        "reference",
        "inv_l = out_mul / torch.where(has_l, l_, 1).to(torch.float32)",
        "inv_l = out_mul * (1.0 / torch.where(has_l, l_, 1).to(torch.float32))",
        SPLIT14,
        "plain",
        torch.float32,
    ),
    # -- the fused quantizer (qflash_gen/quant_kernels.py) and its torch oracle (quant.py) ---------
    Mutant(
        "quantizer smoothing mean over N + 1",
        "quant_kernels",
        "N.to(tl.float32))",
        "(N + 1).to(tl.float32))",
        case="shared_k",
        count=2,  # the one-tile and the chunked kernel
    ),
    Mutant(
        "quantizer MIN_SCALE floor dropped",
        "quant_kernels",
        "tl.maximum(tl.div_rn(amax, 127.0), 7.888609052210118e-31)",
        "tl.maximum(tl.div_rn(amax, 127.0), 0.0)",
        case="subnormal",
        count=2,
    ),
    Mutant(
        "quantizer truncates",
        "quant_kernels",
        "return (y + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000",
        "return y.to(tl.int32)",
        case="shared_k",
    ),
    Mutant(
        "quantizer scale counts Inf and NaN",
        "quant_kernels",
        "tl.where(ok & (a <= 3.4028234663852886e38), a, 0.0)",
        "tl.where(ok, a, 0.0)",
        case="specials",
    ),
    Mutant(
        "one-tile quantizer scale counts Inf and NaN",
        "quant_kernels",
        'tl.where(ok & (a < float("inf")), a, 0.0)',
        "tl.where(ok, a, 0.0)",
        case="specials",
    ),
    Mutant(
        "one-tile quantizer smoothing drops the mean",
        "quant_kernels",
        "xf = xf - mean[:, None, :]",
        "xf = xf - 0.0 * mean[:, None, :]",
        case="shared_k",
    ),
    Mutant(
        "prefetch quantizes a program's first tile again",
        "quant_kernels",
        "x, s = x_next, s_next",
        "x, s = x, s_next",
        case="shared_k",
    ),
    Mutant(
        "prefetch loads the next block, not the next of the program",
        "quant_kernels",
        "_tile_offsets(i + P, H, N, G, BLOCK_N, D, GB)",
        "_tile_offsets(i + 1, H, N, G, BLOCK_N, D, GB)",
        case="specials",
    ),
    Mutant(
        "pipelined walk strides P + 1",
        "quant_kernels",
        "tl.range(p, tl.cdiv(G, GB), P, num_stages=STAGES)",
        "tl.range(p, tl.cdiv(G, GB), P + 1, num_stages=STAGES)",
        case="specials",
    ),
    Mutant(
        "chunked quantizer's 1-D grid reads program 3g + t as group t",
        "quant_kernels",
        "g = tl.program_id(0) // 3  # batch * H + head",
        "g = tl.program_id(0) % 3  # batch * H + head",
        case="shared_k",
    ),
    Mutant(
        "torch quantizer scale counts Inf and NaN",
        "quant",
        "finite = torch.where(torch.isfinite(x), x.abs(), torch.zeros((), dtype=x.dtype, device=x.device))",
        "finite = x.abs()",
        case="specials",
    ),
    Mutant(
        "torch quantizer smoothing mean over N + 1",
        "quant",
        "/ torch.full((), float(n), device=k.device)",
        "/ torch.full((), float(n + 1), device=k.device)",
        case="shared_k",
    ),
    Mutant(
        "torch quantizer MIN_SCALE 2**-126", "quant", "MIN_SCALE = 2.0**-100", "MIN_SCALE = 2.0**-126", case="subnormal"
    ),
]

SOURCES = {
    "reference": ROOT / "qflash_gen" / "reference.py",
    "quant": ROOT / "qflash_gen" / "quant.py",
    "quant_kernels": ROOT / "qflash_gen" / "quant_kernels.py",
}
QUANTIZER_CASES = ("shared_k", "subnormal", "specials")


# -- the cases -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    q: torch.Tensor  # int8, or float (the "float" and quantizer cases)
    k: torch.Tensor
    v: torch.Tensor
    scales: tuple  # (sq, sk, sv): float32 tensors, one per (batch, head) or per head
    bias: torch.Tensor | None  # float32 additive bias (-inf = masked)


@functools.cache
def _case(name: str) -> Case:
    dev = kernel_device()
    g = torch.Generator().manual_seed(21)

    def pairs(b, h, lo, hi):
        return tuple((lo + (hi - lo) * torch.rand((b, h), generator=g)).to(dev) for _ in range(3))

    if name == "plain":  # full int8 range, extreme rows, one scale group per (batch, head)
        return Case(*int8_problem(2, 2, N, D, seed=5, device=dev, extremes=True), pairs(2, 2, 0.01, 0.05), None)
    if name == "bias":  # Swin-like: bias rows per window (Z = 2 of B = 4), masked keys, a masked row
        q, k, v = int8_problem(4, 2, N, D, seed=6, device=dev, extremes=True)
        bias = torch.randn((2, 2, N, N), generator=g) * 2.0
        bias[torch.rand((2, 1, N, N), generator=g).expand(2, 2, N, N) < 0.3] = float("-inf")
        bias[1, :, 5, :] = float("-inf")
        # NaN -> 0 and the clamps at +-2**28, on the flat row 2 (every key weighs there) and row 3
        bias[0, 0, 2, 9], bias[0, 1, 2, 2], bias[1, 1, 3, 4] = float("nan"), -1e12, 1e12
        return Case(q, k, v, pairs(4, 2, 0.01, 0.05), bias.to(dev))
    if name == "float":  # float inputs beyond 127 * s, NaN and Inf, static per-head scales
        q, k, v = (torch.randn((2, 2, N, D), generator=g) * 3.0 for _ in range(3))
        q[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -1e6])
        k[1, 1, 3, :2] = torch.tensor([-1e6, 1e6])
        scales = tuple((0.02 + 0.01 * torch.rand((2,), generator=g)).to(dev) for _ in range(3))
        return Case(q.to(dev), k.to(dev), v.to(dev), scales, None)
    shape = (2, 3, 37, D)
    q, k, v = (torch.rand(shape, generator=g) * 8 - 4 for _ in range(3))
    if name == "shared_k":
        k = k + torch.randn(D, generator=g) * 40
    elif name == "specials":  # NaN -> 0, +-Inf -> +-127 of a scale from the finite values
        q.view(-1)[[0, 5, 999]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        k.view(-1)[77] = float("inf")
        v.view(-1)[7] = float("nan")
    else:  # subnormal: max/127 would be a subnormal scale, its reciprocal inf
        assert name == "subnormal"
        q, k, v = (t * 1e-39 for t in (q, k, v))
    return Case(q.to(dev), k.to(dev), v.to(dev), (), None)


# -- running the two sides -------------------------------------------------------------------------
def _sentinel(case: Case, out_dtype: torch.dtype) -> torch.Tensor:
    """An output buffer the kernel must overwrite everywhere (a row left unwritten shows)."""
    fill = 85 if out_dtype == torch.int8 else float("nan")
    return torch.full(case.q.shape, fill, dtype=out_dtype, device=case.q.device)


def _run_kernel(module, cfg: KernelConfig, case: Case, out_dtype: torch.dtype) -> torch.Tensor:
    params = quant.make_params(*case.scales, head_dim=D)
    out = _sentinel(case, out_dtype)
    if case.q.dtype == torch.int8:
        return launch.launch_module(module, cfg, case.q, case.k, case.v, params, case.bias, out, out_dtype)
    assert case.q.shape[2] <= cfg.block_m  # quantized in the kernel's loads
    return launch.launch_static(module, cfg, case.q, case.k, case.v, params, case.bias, out, out_dtype)


def _run_oracle(ref, qnt, cfg: KernelConfig, case: Case, out_dtype: torch.dtype) -> torch.Tensor:
    params = qnt.make_params(*case.scales, head_dim=D)
    q8, k8, v8 = case.q, case.k, case.v
    if q8.dtype != torch.int8:
        q8, k8, v8 = (qnt.quantize_groups(t, params.table[..., i]) for i, t in enumerate((q8, k8, v8)))
    return ref.reference_int8(q8, k8, v8, params, cfg, bias=case.bias, out_dtype=out_dtype)


# quantize_heads' kernels on the (2, 3, 37, D) quantizer cases: the one-tile kernel, its prefetching
# variant with register double buffering (6 blocks over 4 programs a tensor: two walk 2 blocks) and
# with Triton's pipeliner (3 blocks over 2 programs), the chunked kernel at its default options and
# on the 1-D grid with 16-row chunks (a 5-row tail) and pipelined loops
FUSED_TILES = (None, (64, 1, 4, True, 0, 4), (64, 2, 4, True, 0, 2, 3), False, Chunked(16, 8, True, 3))


def _quantized(qnt, case: Case) -> list[torch.Tensor]:
    """int8 q, k, v and the scale table of one dynamic quantization (k smoothed) by a quantizer
    module: the fused one (``quantize_heads``, each of FUSED_TILES' kernels) or the torch one
    (``quantize_dynamic``, listed as often to match)."""
    if hasattr(qnt, "quantize_heads"):
        # a Chunked as the module's own class (a mutated copy defines another)
        tiles = [qnt.Chunked(**dataclasses.asdict(t)) if isinstance(t, Chunked) else t for t in FUSED_TILES]
        runs = [qnt.quantize_heads(case.q, case.k, case.v, tile=tile) for tile in tiles]
    else:
        runs = [qnt.quantize_dynamic(case.q, case.k, case.v, D)] * len(FUSED_TILES)
    return [
        t for q8, k8, v8, p in runs for t in (q8, k8, v8.contiguous(), p.scales.reshape(q8.shape[0], q8.shape[1], 4))
    ]


_kernel_outputs: dict = {}


def _kernel_output(cfg: KernelConfig, case_name: str, out_dtype: torch.dtype) -> torch.Tensor:
    """The unmutated kernel's output on a case, checked against the unmutated oracle (once)."""
    key = (cfg, case_name, out_dtype)
    if key not in _kernel_outputs:
        case = _case(case_name)
        got = _run_kernel(codegen.load(cfg), cfg, case, out_dtype)
        assert_bit_equal(got, _run_oracle(reference, quant, cfg, case, out_dtype))
        _kernel_outputs[key] = got
    return _kernel_outputs[key]


def _mutated(mutant: Mutant, source: str) -> str:
    found = source.count(mutant.old)
    assert found == mutant.count, f"{mutant.name}: pattern {mutant.old!r} found {found} times, expected {mutant.count}"
    assert mutant.new != mutant.old
    return source.replace(mutant.old, mutant.new)


def _import_copy(path: Path, name: str, monkeypatch, *, quant_module=None):
    """Import ``path`` as module ``name`` (importing a mutated ``quant_module`` in place of
    qflash_gen.quant where given)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    with monkeypatch.context() as m:
        if quant_module is not None:
            m.setitem(sys.modules, "qflash_gen.quant", quant_module)
        spec.loader.exec_module(module)
    return module


def _differs(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    try:
        for a, b in zip(got, want, strict=True):
            assert_bit_equal(a, b)
    except AssertionError:
        return True
    return False


# numpy's warnings where a mutant divides by zero or overflows (in the interpreter)
@pytest.mark.filterwarnings(
    "ignore:overflow encountered:RuntimeWarning",
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:divide by zero encountered:RuntimeWarning",
)
@pytest.mark.parametrize("mutant", MUTANTS, ids=[re.sub(r"[^\w.+-]+", "_", m.name).strip("_") for m in MUTANTS])
def test_mutant_is_killed(mutant, tmp_path, monkeypatch):
    if mutant.target == "kernel":
        want = _kernel_output(mutant.cfg, mutant.case, mutant.out_dtype)  # == the oracle
        source = _mutated(mutant, codegen.render(mutant.cfg))
        module = codegen.import_source(source, prefix="_mut")
        got = _run_kernel(module, mutant.cfg, _case(mutant.case), mutant.out_dtype)
        assert _differs([got], [want]), f"mutant survived: {mutant.name}"
        return
    path = tmp_path / f"mut_{mutant.target}.py"
    path.write_text(_mutated(mutant, SOURCES[mutant.target].read_text(encoding="utf-8")), encoding="utf-8")
    module = _import_copy(path, f"qflash_gen_mutant_{mutant.target}", monkeypatch)
    case = _case(mutant.case)
    if mutant.case in QUANTIZER_CASES:
        fused = _quantized(quant_kernels, case)
        assert not _differs(fused, _quantized(quant, case)), "the unmutated quantizers disagree"
        assert mutant.target in ("quant_kernels", "quant")
        assert _differs(_quantized(module, case), fused), f"mutant survived: {mutant.name}"
        return
    want = _kernel_output(mutant.cfg, mutant.case, mutant.out_dtype)  # == the oracle
    if mutant.target == "quant":  # the oracle, built on the mutated quant
        ref = _import_copy(SOURCES["reference"], "qflash_gen_mutant_reference", monkeypatch, quant_module=module)
        got = _run_oracle(ref, module, mutant.cfg, case, mutant.out_dtype)
    else:
        got = _run_oracle(module, quant, mutant.cfg, case, mutant.out_dtype)
    assert _differs([got], [want]), f"mutant survived: {mutant.name}"


def test_the_mutants_are_distinct_and_cover_every_target():
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
    assert len({(m.target, m.old, m.new) for m in MUTANTS}) == len(MUTANTS)
    assert {m.target for m in MUTANTS} == {"kernel", "reference", "quant", "quant_kernels"}
    assert sum(m.target == "kernel" for m in MUTANTS) >= 20
