"""`KernelConfig`: the one object that the template renders, the tuner suggests and the DB stores.

A config describes *how* the kernel computes, never *what* it is applied to: shape facts (N, D,
masked or not, output dtype) stay launch-time `tl.constexpr` values.  Whether a config is safe
for a given workload (no integer overflow) is answered by :func:`check_workload`.

Its fields come in two kinds (docs/design.md, "Kernel config"):

* **render fields** (:data:`RENDER_FIELDS`) change the rendered source: tile sizes, the exp and
  rescale variants, widths, and the warps and stages the file records for its launch;
* **launch fields** (:data:`LAUNCH_FIELDS`: ``max_regs``, ``heads_per_program``) are options of
  one launch of that source.  Configs that differ only there share one rendered module
  (:attr:`KernelConfig.render_key`).

:func:`parse_config` reads the ``field=value,...`` form every command line takes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any, Literal

# Launch options: not part of the rendered source (see the module doc).
LAUNCH_FIELDS: tuple[str, ...] = ("max_regs", "heads_per_program")

ExpVariant = Literal["shift", "idiv", "poly2", "lut"]
Rescale = Literal["shift", "idiv", "split"]

EXP_VARIANTS: tuple[str, ...] = ("shift", "idiv", "poly2", "lut")
RESCALES: tuple[str, ...] = ("shift", "idiv", "split")
ACC_BITS: tuple[int, ...] = (32, 64)
BLOCK_M_VALUES: tuple[int, ...] = (16, 32, 64, 128)
BLOCK_N_VALUES: tuple[int, ...] = (32, 64, 128, 256)
NUM_WARPS_VALUES: tuple[int, ...] = (1, 2, 4, 8)
NUM_STAGES_VALUES: tuple[int, ...] = (1, 2, 3, 4)
RESCALE_BITS_RANGE: tuple[int, int] = (1, 15)  # alpha is produced in Q15, so 15 is exact
LUT_BITS_RANGE: tuple[int, int] = (2, 8)
# Width of the softmax numerator fed to P @ V: 7 = one int8 (0..127, the paper's), 14 = two int8
# halves (hi * 128 + lo, 0..16383) and one more int8 MMA.
P_BITS_VALUES: tuple[int, ...] = (7, 14)

# Largest R = round(1/S) the kernel accepts; quant.py saturates to it (see quant.R_MAX).
R_MAX = 65535
# Magnitude bounds used by the overflow check: |v| <= 128, |q|, |k| <= 128, and every softmax
# numerator p <= config.p_max (127 or 16383).
P_MAX = 127  # p_max of the paper's 7-bit P (p_bits=7)
MAX_REGS_RANGE = (24, 255)  # Triton's maxnreg: multiples of 8 (ptxas rounds to its allocation unit)
HEADS_PER_PROGRAM_VALUES = (1, 2, 4, 8)
V_ABS_MAX = 128
Q_ABS_MAX = 128


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Every tunable of the integer attention kernel.

    Attributes:
        block_m: query rows per program.
        block_n: keys per inner-loop tile.  ``block_n >= N`` makes the launch single-pass
            (no online rescaling); that choice is a ``tl.constexpr`` at launch, not a config field.
        num_warps, num_stages: passed to Triton.
        exp_variant: integer ``2**(-y/R)``: ``shift`` (multiply-shift quotient), ``idiv``
            (integer-divide quotient and fraction), ``poly2`` (2nd-order polynomial on the
            fraction), ``lut`` (``2**lut_bits``-entry table on the fraction).
        acc_bits: width of the running sum ``l``, the accumulator ``acc`` and rescale products.
        rescale: how ``acc`` and ``l`` are multiplied by ``alpha = 2**((m_old - m_new)/R)``:
            ``shift`` (alpha rounded to Q``rescale_bits``, multiply, shift), ``idiv``
            (alpha at scale R, multiply, integer-divide by R) or ``split`` (the exact Q15
            product of ``shift`` with 15 bits, computed on the high and low 15-bit halves of
            ``|x|`` so no intermediate exceeds ``|x|``: int32 holds it for any int32 ``acc``).
        rescale_bits: fraction bits of alpha for ``rescale="shift"`` (1..15); must be 0 with
            ``rescale="idiv"`` or ``"split"``, which do not use it.
        lut_bits: table index bits for ``exp_variant="lut"``; must be 0 for other variants.
        p_bits: width of the softmax numerator ``p`` fed to ``P @ V``: 7 (``p`` in 0..127, one
            int8 MMA: the paper's kernel) or 14 (``p`` in 0..16383 split into two int8 halves,
            two MMAs: small probabilities of peaked rows survive; see docs/fidelity.md).
            The field defaults to 7 so that configs recorded before it existed read unchanged;
            ``DEFAULT_CONFIG`` uses 14.
        max_regs: registers per thread the compiler may use (Triton's ``maxnreg``), 0 = its own
            choice.  Fewer registers fit more programs on an SM (65536 registers: at 4 warps,
            168 allows 3 programs, 128 allows 4), at the price of spills where the kernel needs
            more.  Left out of ``to_dict`` (and so of ``hash``) when 0: configs recorded before the
            field existed keep their hash.
        heads_per_program: (batch, head) pairs one program runs for its query block, one after
            the other (1, 2, 4 or 8).  With ``num_stages >= 2`` Triton pipelines that loop, so the
            next head's loads overlap this head's MMAs and softmax; the grid shrinks by the same
            factor.  A launch uses the largest power of two up to it that divides B * H.  Left
            out of ``to_dict`` when 1 (as ``max_regs`` when 0).
    """

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    exp_variant: ExpVariant = "shift"
    acc_bits: int = 32
    rescale: Rescale = "shift"
    rescale_bits: int = 8
    lut_bits: int = 0
    p_bits: int = 7
    max_regs: int = 0
    heads_per_program: int = 1

    def __post_init__(self) -> None:
        def bad(field: str, value: Any, allowed: str) -> ValueError:
            return ValueError(f"KernelConfig.{field}={value!r} is not supported: expected {allowed}")

        for name in dataclasses.fields(self):
            value = getattr(self, name.name)
            if name.type in ("int",) and (not isinstance(value, int) or isinstance(value, bool)):
                raise bad(name.name, value, "an int")
        if self.block_m not in BLOCK_M_VALUES:
            raise bad("block_m", self.block_m, f"one of {BLOCK_M_VALUES}")
        if self.block_n not in BLOCK_N_VALUES:
            raise bad("block_n", self.block_n, f"one of {BLOCK_N_VALUES} (int8 P@V needs K >= 32)")
        if self.num_warps not in NUM_WARPS_VALUES:
            raise bad("num_warps", self.num_warps, f"one of {NUM_WARPS_VALUES}")
        if self.num_stages not in NUM_STAGES_VALUES:
            raise bad("num_stages", self.num_stages, f"one of {NUM_STAGES_VALUES}")
        if self.exp_variant not in EXP_VARIANTS:
            raise bad("exp_variant", self.exp_variant, f"one of {EXP_VARIANTS}")
        if self.acc_bits not in ACC_BITS:
            raise bad("acc_bits", self.acc_bits, f"one of {ACC_BITS}")
        if self.rescale not in RESCALES:
            raise bad("rescale", self.rescale, f"one of {RESCALES}")
        lo, hi = RESCALE_BITS_RANGE
        if self.rescale == "shift" and not lo <= self.rescale_bits <= hi:
            raise bad("rescale_bits", self.rescale_bits, f"{lo}..{hi} with rescale='shift'")
        if self.rescale != "shift" and self.rescale_bits != 0:
            raise bad("rescale_bits", self.rescale_bits, f"0 with rescale={self.rescale!r} (it is unused)")
        lo, hi = LUT_BITS_RANGE
        if self.exp_variant == "lut" and not lo <= self.lut_bits <= hi:
            raise bad("lut_bits", self.lut_bits, f"{lo}..{hi} with exp_variant='lut'")
        if self.exp_variant != "lut" and self.lut_bits != 0:
            raise bad("lut_bits", self.lut_bits, "0 unless exp_variant='lut'")
        if self.p_bits not in P_BITS_VALUES:
            raise bad("p_bits", self.p_bits, f"one of {P_BITS_VALUES}")
        if self.max_regs != 0 and not (
            MAX_REGS_RANGE[0] <= self.max_regs <= MAX_REGS_RANGE[1] and self.max_regs % 8 == 0
        ):
            raise bad("max_regs", self.max_regs, f"0 or a multiple of 8 in {MAX_REGS_RANGE[0]}..{MAX_REGS_RANGE[1]}")
        if self.heads_per_program not in HEADS_PER_PROGRAM_VALUES:
            raise bad("heads_per_program", self.heads_per_program, f"one of {HEADS_PER_PROGRAM_VALUES}")

    @property
    def p_max(self) -> int:
        """Largest softmax numerator p: 127 (p_bits=7) or 16383 (p_bits=14)."""
        return (1 << self.p_bits) - 1

    # -- render fields and launch fields -------------------------------------------------------
    def render_part(self) -> KernelConfig:
        """This config with its launch fields at their defaults: what the rendered source is a
        function of (its ``to_dict`` lists the render fields only)."""
        if self.max_regs == 0 and self.heads_per_program == 1:
            return self
        return self.replace(max_regs=0, heads_per_program=1)

    @functools.cached_property
    def render_key(self) -> str:
        """Hash of the render fields (``render_part().hash``): the key of the rendered-module
        cache, shared by configs that differ only in launch fields."""
        return self.render_part().hash

    # -- plain-mapping round trip (what YAML and Optuna see) -------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["max_regs"] == 0:
            del d["max_regs"]
        if d["heads_per_program"] == 1:
            del d["heads_per_program"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KernelConfig:
        if not isinstance(data, dict):
            raise ValueError(f"KernelConfig.from_dict expects a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown KernelConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> KernelConfig:
        return dataclasses.replace(self, **changes)

    @functools.cached_property
    def hash(self) -> str:
        """Stable across processes and Python versions (sha256 of sorted JSON); computed once
        per object (it sits on the launch path through codegen.load's cache)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def short(self) -> str:
        """One-line human summary, e.g. for tables and logs."""
        extra = f"/lut{self.lut_bits}" if self.exp_variant == "lut" else ""
        rs = f"shift{self.rescale_bits}" if self.rescale == "shift" else self.rescale
        return (
            f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}"
            f" exp={self.exp_variant}{extra} acc{self.acc_bits} rescale={rs} p{self.p_bits}"
            + (f" r{self.max_regs}" if self.max_regs else "")
            + (f" h{self.heads_per_program}" if self.heads_per_program > 1 else "")
        )

    def tail_rows(self, n_ctx: int) -> int:
        """Rows of the tile that runs the last, partial query block at ``n_ctx`` queries (the
        template's TAIL_M): the smallest of 16, 32, 64, 128 that holds its rows, or ``block_m``
        when no block is partial or no smaller tile would do."""
        rem = n_ctx % self.block_m
        if rem == 0:
            return self.block_m
        return min(self.block_m, next(t for t in (16, 32, 64, 128) if rem <= t))

    def heads_for(self, bh: int) -> int:
        """Heads per program for a launch over ``bh`` = B * H pairs: the largest power of two
        up to ``heads_per_program`` that divides ``bh`` (the kernel has no guard for a partial
        group)."""
        g = self.heads_per_program
        while bh % g:
            g //= 2
        return g


RENDER_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(KernelConfig) if f.name not in LAUNCH_FIELDS)

# The untuned default: 14-bit P (7 bits lose up to 8 dB on the peaked attention of trained ViTs,
# docs/fidelity.md) with the overflow-free exact rescale, so int32 holds N up to 1023.
DEFAULT_CONFIG = KernelConfig(p_bits=14, rescale="split", rescale_bits=0)


def default_config(n_ctx: int, head_dim: int) -> KernelConfig:
    """The safe default for a shape: DEFAULT_CONFIG, widened to int64 where int32 could overflow."""
    if fits(DEFAULT_CONFIG, n_ctx, head_dim):
        return DEFAULT_CONFIG
    return DEFAULT_CONFIG.replace(acc_bits=64)


def single_pass(config: KernelConfig, n_ctx: int) -> bool:
    """True when one key tile covers the whole row: the kernel runs with no online rescale."""
    return config.block_n >= n_ctx


def accumulator_bounds(config: KernelConfig, n_ctx: int, head_dim: int) -> dict[str, int]:
    """Largest magnitudes reached inside the kernel for a workload (adversarial int8 inputs).

    ``acc`` holds sums of ``p * v`` over all keys (rescaling only shrinks older terms), ``l``
    sums of ``p``; the rescale product is ``|acc| * alpha`` before the shift or division (for
    ``split``, the larger of its two partial products); ``acc_round`` is ``|acc| + l / 2``, the
    rounding numerator of the int8 output.
    """
    p_max = config.p_max
    acc = n_ctx * p_max * V_ABS_MAX
    l_max = n_ctx * p_max
    if single_pass(config, n_ctx):
        product = 0  # no rescale code runs
    elif config.rescale == "shift":
        product = acc * (1 << config.rescale_bits) + (1 << (config.rescale_bits - 1))
    elif config.rescale == "split":
        product = max((acc >> 15) << 15, (1 << 15) * ((1 << 15) - 1) + (1 << 14))
    else:
        product = acc * R_MAX + R_MAX // 2
    return {
        "score": head_dim * Q_ABS_MAX * Q_ABS_MAX,
        "acc": acc,
        "l": l_max,
        "rescale_product": product,
        "acc_round": acc + l_max // 2,
    }


def check_workload(config: KernelConfig, n_ctx: int, head_dim: int) -> None:
    """Raise ValueError if ``config`` can overflow its accumulators on this (N, D)."""
    limit = (1 << (config.acc_bits - 1)) - 1
    bounds = accumulator_bounds(config, n_ctx, head_dim)
    if bounds["score"] > (1 << 31) - 1:
        raise ValueError(f"head_dim={head_dim} overflows the int32 score Q@K^T")
    for name in ("acc", "l", "rescale_product", "acc_round"):
        if bounds[name] > limit:
            raise ValueError(
                f"{config.short()} overflows int{config.acc_bits} at N={n_ctx}: "
                f"|{name}| can reach {bounds[name]} > {limit}; use acc_bits=64"
                + (" or rescale='split'" if name == "rescale_product" else "")
            )


def fits(config: KernelConfig, n_ctx: int, head_dim: int) -> bool:
    try:
        check_workload(config, n_ctx, head_dim)
    except ValueError:
        return False
    return True


# -- "field=value,..." (qflash-show --config, qflash-tune --try, tools) --------------------------------
def _field_types() -> dict[str, type]:
    # this module uses `from __future__ import annotations`, so field types are strings
    return {f.name: int if f.type in ("int", int) else str for f in dataclasses.fields(KernelConfig)}


def parse_config(text: str, base: KernelConfig = DEFAULT_CONFIG) -> KernelConfig:
    """``block_m=64,block_n=256,exp_variant=poly2`` -> KernelConfig (unnamed fields from ``base``).

    Values of int fields are parsed as ints so the user types what the YAML stores.  Switching
    ``rescale`` to ``idiv`` or ``split``, or ``exp_variant`` away from ``lut``, resets the field
    that becomes meaningless (``rescale_bits`` / ``lut_bits``) unless it is given too; switching
    to ``rescale=shift`` starts at ``rescale_bits=8`` (the paper's Q8 alpha) and to
    ``exp_variant=lut`` at ``lut_bits=5`` (the starting point of docs/design.md, "Integer exp2").
    Errors are ValueErrors naming the field and what it accepts."""
    types = _field_types()
    changes: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise ValueError(f"--config item {item!r} is not NAME=VALUE (fields: {', '.join(types)})")
        if name not in types:
            raise ValueError(f"unknown KernelConfig field {name!r}; known: {', '.join(types)}")
        if types[name] is int:
            try:
                changes[name] = int(value, 0)
            except ValueError:
                raise ValueError(f"KernelConfig.{name}={value!r} is not supported: expected an int") from None
        else:
            changes[name] = value
    if changes.get("rescale") in ("idiv", "split") and "rescale_bits" not in changes:
        changes["rescale_bits"] = 0
    if changes.get("rescale") == "shift" and "rescale_bits" not in changes and base.rescale_bits == 0:
        changes["rescale_bits"] = 8
    if "exp_variant" in changes and "lut_bits" not in changes:
        if changes["exp_variant"] == "lut" and base.lut_bits == 0:
            changes["lut_bits"] = 5
        elif changes["exp_variant"] != "lut":
            changes["lut_bits"] = 0
    return KernelConfig.from_dict({**base.to_dict(), **changes})
