"""The kernel's argument list, described once (docs/design.md, "Kernel arguments").

``PARAMS`` lists every parameter of the rendered ``_qflash_fwd`` in order: its name, its kind
(a pointer, a run-time int, or a ``tl.constexpr`` fixed per compile), the group it belongs to in
the rendered file, and where its value comes from, written as a Python expression over the
call facts (:data:`CALL_FACTS`).  From that one list come:

* the parameter list of ``_qflash_fwd`` in the rendered source (:func:`render_params`);
* :func:`pack`, generated from the list (as Triton generates its binder): the positional argument
  tuple of one launch, used by every launcher (``launch.launch_module``, the direct launch of a
  cached CompiledKernel in ``launch.launch_fast`` and its warm-up, ``qflash-show --asm`` and
  ``tools/overhead.py``);
* :func:`launch_options`: ``num_warps``, ``num_stages`` and the register cap.

Adding an argument is one entry here (plus, if its value needs a fact the launchers do not pass
yet, that fact in :data:`CALL_FACTS`).  Tile sizes are not arguments: the rendered file defines
``BLOCK_M`` and ``BLOCK_N`` itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from qflash_gen.config import KernelConfig

POINTER, INT, CONSTEXPR = "pointer", "int", "constexpr"
KINDS = (POINTER, INT, CONSTEXPR)

# What a launcher knows about one call; the ``value`` of every parameter is an expression over these.
CALL_FACTS: tuple[str, ...] = (
    "q", "k", "v", "out",  # tensors (or stand-ins with .dtype and .data_ptr(), for --asm)
    "bias",  # the float32 additive bias, or any pointer when there is none (HAS_BIAS False: never read)
    "params",  # quant.KernelParams: .scales (the table), its group strides, .c_bits
    "scale_strides",  # params.strides(): element strides of the scale groups over batch and head
    "bias_zmod",  # batch z reads bias row z % bias_zmod (1 without a bias)
    "lut",  # the exp table (exp_variant "lut"), else any int32 pointer (never read)
    "q_strides", "k_strides", "v_strides", "out_strides", "bias_strides",  # 4-tuples (B, H, N, D axes)
    "h", "n", "d",  # heads, tokens, head dim
    "has_bias", "out_float", "v_keys", "tail_m", "hpp",  # per-launch constants (see their params)
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of ``_qflash_fwd``."""

    name: str
    kind: str  # POINTER, INT or CONSTEXPR
    value: str  # Python expression over CALL_FACTS
    group: str  # comment line opening its group in the rendered parameter list

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Param {self.name}: kind {self.kind!r} is not one of {KINDS}")


# the axes each stride steps along: batch z, head h, query row m, key n, head-dim channel k
_AXES = {"q": "zhmk", "k": "zhnk", "v": "zhnk", "o": "zhmk", "b": "zhmn"}


def _strides(prefix: str, fact: str, group: str) -> tuple[Param, ...]:
    return tuple(
        Param(f"stride_{prefix}{axis}", INT, f"{fact}[{i}]", group if i == 0 else "")
        for i, axis in enumerate(_AXES[prefix])
    )


_TENSORS = "int8 (or float: IN_FLOAT) inputs and the output (int8, or a float dtype: OUT_FLOAT)"
_AUX = "float32 additive bias (read only if HAS_BIAS), float32 scale rows [sq, sk, sv, 0], int32 LUT"
_STRIDES = "element strides of q, k, v, out and the bias, axes (B, H, N, D) and (B, H, N, N)"
_SHAPE = "shape facts and launch choices (one compile each)"

PARAMS: tuple[Param, ...] = (
    Param("Q", POINTER, "q", _TENSORS),
    Param("K", POINTER, "k", ""),
    Param("V", POINTER, "v", ""),
    Param("Out", POINTER, "out", ""),
    Param("Bias", POINTER, "bias", _AUX),
    Param("Scales", POINTER, "params.scales", ""),
    Param("LUT", POINTER, "lut", ""),
    *_strides("q", "q_strides", _STRIDES),
    *_strides("k", "k_strides", ""),
    *_strides("v", "v_strides", ""),
    *_strides("o", "out_strides", ""),
    *_strides("b", "bias_strides", ""),
    Param("BIAS_ZMOD", INT, "bias_zmod", "the bias row of batch z: z % BIAS_ZMOD (Swin: z's window)"),
    Param("stride_sz", INT, "scale_strides[0]", "element strides of the scale groups over batch and head (0: shared)"),
    Param("stride_sh", INT, "scale_strides[1]", ""),
    Param("C_LOG2E", INT, "params.c_bits", "float64 bits of the softmax scale times log2(e)"),
    Param("H", INT, "h", "heads (the grid's second axis walks B * H / HPP groups of heads)"),
    Param("N_CTX", CONSTEXPR, "n", _SHAPE),
    Param("HEAD_DIM", CONSTEXPR, "d", ""),
    Param("HAS_BIAS", CONSTEXPR, "has_bias", ""),
    Param("OUT_FLOAT", CONSTEXPR, "out_float", ""),
    Param("V_KEYS", CONSTEXPR, "v_keys", ""),  # N, or N padded to 16 for key-major V (launch.v_keys)
    Param("TAIL_M", CONSTEXPR, "tail_m", ""),  # rows of the last query block's tile (KernelConfig.tail_rows)
    Param("HPP", CONSTEXPR, "hpp", ""),  # heads per program (KernelConfig.heads_for)
)


def names() -> tuple[str, ...]:
    return tuple(p.name for p in PARAMS)


def constexpr_names() -> tuple[str, ...]:
    return tuple(p.name for p in PARAMS if p.kind == CONSTEXPR)


def render_params(params: tuple[Param, ...] = PARAMS, indent: str = "    ") -> str:
    """The parameter list of ``_qflash_fwd`` as it appears in the rendered file."""
    lines: list[str] = []
    for p in params:
        if p.group:
            lines.append(f"{indent}# {p.group}")
        lines.append(f"{indent}{p.name}: tl.constexpr," if p.kind == CONSTEXPR else f"{indent}{p.name},")
    return "\n".join(lines)


def build_pack(params: tuple[Param, ...] = PARAMS) -> tuple[str, Callable[..., tuple]]:
    """``(source, function)`` of the packer for ``params``: a function of CALL_FACTS returning
    the launch's positional arguments (generated code, as Triton generates its binder)."""
    body = ",\n        ".join(p.value for p in params)
    source = f"def pack({', '.join(CALL_FACTS)}):\n    return (\n        {body},\n    )\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, "<qflash_gen.codegen.signature.pack>", "exec"), namespace)  # noqa: S102 - code from PARAMS
    return source, namespace["pack"]


PACK_SOURCE, pack = build_pack()
pack.__doc__ = """The positional arguments of one launch of ``_qflash_fwd``, in PARAMS order, from the
call facts (CALL_FACTS order; generated from PARAMS, see PACK_SOURCE)."""


def launch_options(config: KernelConfig) -> dict[str, int]:
    """Triton launch options of ``config``: ``num_warps``, ``num_stages`` and, when set, the
    register cap ``maxnreg``."""
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.max_regs:
        options["maxnreg"] = config.max_regs
    return options
