"""``torch.library`` custom ops: qflash-gen attention as one opaque node for ``torch.compile``.

Two ops, both inference-only (no autograd formula), both returning a new contiguous tensor of q's
shape and dtype (Inductor expects its custom ops' outputs contiguous; the eager path below lays
its output out (B, N, H, D) instead, ``api.output_like``, so that a model's next step
``out.transpose(1, 2).reshape(B, N, H * D)`` is a view, not a copy):

``torch.ops.qflash_gen.attention(q, k, v, attn_mask, float_bias, scale, config, backend)``
    ``qflash_gen.attention``: one scale per (batch, head) and tensor, computed on the device each
    call (k smoothed): the quantizer launch and the kernel launch.

``torch.ops.qflash_gen.attention_static(q, k, v, table, bias, scale, config, backend)``
    Attention with fixed (calibrated) scales: quantization and the kernel launch only, so the
    call is static, host-sync free and CUDA-graph capturable.  ``table``: float32 (P, 4), rows
    [sq, sk, sv, 0] (:func:`static_table` of the calibrated (3, P) scales), P = 1 (per tensor) or
    H (per head).  ``bias``: the float32 additive bias (``quant.additive_bias``; -inf = masked),
    its batch axis 1, B, or a divisor of B (row z % Z: Swin's windows), or None.

In eager mode the modules call :func:`attention_impl` / :func:`attention_static_impl` directly (the
dispatcher of a custom op costs host time on every call); under ``torch.compile`` they go through
the ops.  ``config`` is a ``KernelConfig`` as JSON (:func:`config_arg`) or ``""`` for the
runtime's choice (the tuning DB's pick on CUDA, the safe default elsewhere).  ``backend`` is
``"triton"`` or ``"reference"`` (the integer oracle: same bits).  The fake (meta) implementations
only allocate the output, so ``torch.compile`` traces through without a graph break and
``torch.library.opcheck`` passes.
"""

from __future__ import annotations

import functools
import json

import torch

from qflash_gen import api, checks, codegen, hotpath, launch, quant
from qflash_gen.config import KernelConfig, check_workload, default_config
from qflash_gen.kernel import config_for_call

__all__ = [
    "attention",
    "attention_impl",
    "attention_static",
    "attention_static_impl",
    "config_arg",
    "static_table",
]


def config_arg(config: KernelConfig | None) -> str:
    """The ``config`` string argument of the ops for a KernelConfig (or None: ``""``)."""
    if config is None:
        return ""
    if not isinstance(config, KernelConfig):
        raise ValueError(f"config must be a KernelConfig or None, got {type(config).__name__}")
    return json.dumps(config.to_dict(), sort_keys=True)


@functools.lru_cache(maxsize=256)
def _parse_config(text: str) -> KernelConfig | None:
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"config={text!r} is not a KernelConfig as JSON (see qflash_gen.ops.config_arg)") from exc
    return KernelConfig.from_dict(data)


@functools.lru_cache(maxsize=1024)
def _checked(config: KernelConfig, n: int, d: int) -> KernelConfig:
    check_workload(config, n, d)
    return config


def _resolve(config_text: str, q: torch.Tensor, masked: bool) -> KernelConfig:
    b, h, n, d = q.shape
    config = _parse_config(config_text)
    if config is not None:
        return _checked(config, n, d)
    if q.is_cuda:
        return config_for_call(q, masked=masked, in_dtype=q.dtype, out_dtype=q.dtype)
    return default_config(n, d)


# -- dynamic scales ---------------------------------------------------------------------------
def attention_impl(q, k, v, attn_mask=None, float_bias=None, scale=None, config="", backend="triton", out=None):
    """What ``torch.ops.qflash_gen.attention`` runs: ``qflash_gen.attention`` (into ``out`` if given,
    else a new (B, N, H, D)-laid-out tensor)."""
    cfg = _parse_config(config)
    return api.attention(q, k, v, attn_mask, scale, float_bias=float_bias, config=cfg, backend=backend, out=out)


@torch.library.custom_op("qflash_gen::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    float_bias: torch.Tensor | None = None,
    scale: float | None = None,
    config: str = "",
    backend: str = "triton",
) -> torch.Tensor:
    """``qflash_gen.attention(q, k, v, attn_mask, scale, float_bias=..., config=..., backend=...)``."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return attention_impl(q, k, v, attn_mask, float_bias, scale, config, backend, out=out)


@attention.register_fake
def _attention_fake(q, k, v, attn_mask=None, float_bias=None, scale=None, config="", backend="triton"):
    return q.new_empty(q.shape)


# -- static (calibrated) scales ---------------------------------------------------------------
def static_table(scales: torch.Tensor) -> torch.Tensor:
    """The ``table`` argument of ``attention_static`` for calibrated ``scales`` (3, P) (rows sq, sk,
    sv): float32 (P, 4) rows [sq, sk, sv, 0].  Device ops; run once when the scales are set."""
    if not isinstance(scales, torch.Tensor) or scales.dim() != 2 or scales.shape[0] != 3 or scales.shape[1] < 1:
        got = tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise ValueError(f"scales must be a (3, P) tensor (rows sq, sk, sv), got {got}")
    s = scales.detach().to(torch.float32)
    return torch.cat([s.t(), torch.zeros_like(s[:1]).t()], dim=1).contiguous()


def _check_static(q, k, v, table, bias) -> None:
    checks.check_qkv(q, k, v, checks.FLOAT_DTYPES, "attention_static")
    h = q.shape[1]
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != 4 or table.dtype != torch.float32:
        got = (table.dtype, tuple(table.shape)) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"table must be float32 (P, 4) from static_table, got {got}")
    if table.shape[0] not in (1, h):
        raise ValueError(f"table has P={table.shape[0]} rows; use 1 (per tensor) or H={h} (per head)")
    if table.device != q.device:
        raise ValueError(f"table is on {table.device} but q is on {q.device}")
    if bias is not None:
        if not bias.is_floating_point():
            raise ValueError(f"bias must be a float additive bias (quant.additive_bias), got {bias.dtype}")
        checks.check_mask(bias, "bias", q.shape, q.device)


def attention_static_impl(q, k, v, table, bias=None, scale=None, config="", backend="triton", out=None):
    """What ``torch.ops.qflash_gen.attention_static`` runs (into ``out`` if given, else a new
    (B, N, H, D)-laid-out tensor)."""
    sig = None
    if out is None and backend == "triton":
        try:
            sig = hotpath.signature(q, k, v, bias, scale, ("static", table), config)
            plan = None if sig is None else hotpath.lookup(sig)
        except (AttributeError, TypeError):  # not tensors, or an unhashable argument: the checks say why
            sig = plan = None
        if plan is not None:
            with api.on_device(q.device):
                return plan(q, k, v, bias, table)
    checks.check_backend(backend)
    _check_static(q, k, v, table, bias)
    if out is None:
        out = api.output_like(q, q.dtype)
    if out.numel() == 0:
        return out
    b, h, n, d = q.shape
    params = quant.KernelParams(scales=table.reshape(1, table.shape[0], 4), c_log2e=quant.softmax_constant(d, scale))
    cfg = _resolve(config, q, masked=bias is not None)
    if backend == "reference":
        q8, k8, v8 = (quant.quantize_groups(t, params.table[..., i]) for i, t in enumerate((q, k, v)))
        return api.run(cfg, q8, k8, v8, params, bias, q.dtype, backend, out=out)
    checks.check_kernel_device(q.device)
    with api.on_device(q.device):
        result = launch.launch_static(codegen.load(cfg), cfg, q, k, v, params, bias, out, q.dtype, fast=q.is_cuda)
        if sig is not None:
            hotpath.record(sig, cfg, q, k, v, bias, q.dtype, scale=scale, params=params)
        return result


@torch.library.custom_op("qflash_gen::attention_static", mutates_args=())
def attention_static(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    config: str = "",
    backend: str = "triton",
) -> torch.Tensor:
    """Attention with calibrated scales (see the module docstring for the argument layout)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return attention_static_impl(q, k, v, table, bias, scale, config, backend, out=out)


@attention_static.register_fake
def _attention_static_fake(q, k, v, table, bias=None, scale=None, config="", backend="triton"):
    return q.new_empty(q.shape)
