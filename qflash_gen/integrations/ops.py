"""``torch.library`` custom ops: qflash-gen attention as one opaque node for ``torch.compile``.

Two ops, both inference-only (no autograd formula), both returning a new contiguous tensor of
q's shape and dtype:

``torch.ops.qflash_gen.attention(q, k, v, attn_mask, float_bias, scale, config, backend)``
    ``qflash_gen.attention`` (dynamic per-tensor scales, computed on the device each call).

``torch.ops.qflash_gen.attention_static(q, k, v, scales, ints, floats, bias, config, backend)``
    Attention with fixed (calibrated) scales: nothing but quantization and the kernel launch
    run per call, so the call is static, host-sync free and CUDA-graph capturable.
    ``scales``: float32 (3, P), rows sq, sk, sv, one column per scale group; P = 1 is per
    tensor, P > 1 is per head: head j of the H heads uses column ``j % P`` (P divides H).
    ``ints``/``floats``: the kernel constants of each column, (P, 4) int32 and (P, 4) float32,
    from :func:`static_params` (they carry the softmax scale).  ``bias``: optional int32 bias in
    score units (``quant.bias_to_int`` with that column's constants), broadcastable to
    (B, H, N, N).  The kernel has per-tensor constants only, so P > 1 runs one launch per
    column (on a strided view of q, k, v and the output): correct, but P times the launches.

``config`` is a ``KernelConfig`` as JSON (:func:`config_arg`) or ``""`` for the runtime's choice
(the tuning DB's pick on CUDA, the safe default elsewhere).  ``backend`` is ``"triton"`` or
``"reference"`` (the integer oracle: same bits).  The fake (meta) implementations only allocate
the output, so ``torch.compile`` traces through without a graph break and
``torch.library.opcheck`` passes.
"""

from __future__ import annotations

import functools
import json

import torch

from qflash_gen import api, checks, codegen, launch, quant
from qflash_gen.config import KernelConfig, check_workload, default_config
from qflash_gen.kernel import config_for_call

__all__ = ["attention", "attention_static", "config_arg", "static_bias", "static_params"]


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
    out = api.attention(
        q, k, v, attn_mask, scale, float_bias=float_bias, config=_parse_config(config), backend=backend
    )
    return out if out.is_contiguous() else out.contiguous()


@attention.register_fake
def _attention_fake(q, k, v, attn_mask=None, float_bias=None, scale=None, config="", backend="triton"):
    return q.new_empty(q.shape)


# -- static (calibrated) scales ---------------------------------------------------------------
def static_params(scales: torch.Tensor, head_dim: int, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel constants ``(ints (P, 4) int32, floats (P, 4) float32)`` for ``scales`` (3, P).

    Device ops only (no host sync); run once when the scales are set, not per call."""
    if not isinstance(scales, torch.Tensor) or scales.dim() != 2 or scales.shape[0] != 3 or scales.shape[1] < 1:
        got = tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise ValueError(f"scales must be a (3, P) tensor (rows sq, sk, sv), got {got}")
    params = [
        quant.make_params(scales[0, p], scales[1, p], scales[2, p], head_dim=head_dim, scale=scale)
        for p in range(scales.shape[1])
    ]
    return torch.stack([p.ints for p in params]), torch.stack([p.floats for p in params])


def static_bias(
    ints: torch.Tensor,
    floats: torch.Tensor,
    attn_mask: torch.Tensor | None,
    float_bias: torch.Tensor | None,
    heads: int,
) -> torch.Tensor | None:
    """The int32 ``bias`` argument of ``attention_static`` for the constants of each scale column
    (``static_params``): one ``quant.bias_to_int`` per column, on the device.  ``heads``: the
    head axis of the call (H, or num_windows * H for Swin)."""
    if attn_mask is None and float_bias is None:
        return None
    n_cols = ints.shape[0]
    parts = [
        quant.bias_to_int(attn_mask, quant.KernelParams(ints[p], floats[p]), float_bias=float_bias)
        for p in range(n_cols)
    ]
    if n_cols == 1:
        return parts[0]
    # Per head: column p serves the heads j with j % P == p (the op's layout); each column's
    # bias is built with its own R, so take its heads and put the columns back together.
    full = torch.broadcast_shapes(*(p.shape for p in parts))
    full = (1,) * (4 - len(full)) + tuple(full)
    full = (full[0], heads, full[2], full[3])
    split = (heads // n_cols, n_cols)
    cols = [p.expand(full).unflatten(1, split)[:, :, i] for i, p in enumerate(parts)]
    return torch.stack(cols, dim=2).reshape(full)


def _check_static(q, k, v, scales, ints, floats, bias) -> int:
    checks.check_qkv(q, k, v, checks.FLOAT_DTYPES, "attention_static")
    h = q.shape[1]
    if scales.dim() != 2 or scales.shape[0] != 3:
        raise ValueError(f"scales must be (3, P) (rows sq, sk, sv), got {tuple(scales.shape)}")
    p = scales.shape[1]
    if p < 1 or h % p:
        raise ValueError(f"scales has P={p} columns; P must divide the number of heads H={h}")
    if tuple(ints.shape) != (p, 4) or ints.dtype != torch.int32:
        raise ValueError(f"ints must be int32 ({p}, 4) from static_params, got {ints.dtype} {tuple(ints.shape)}")
    if tuple(floats.shape) != (p, 4) or floats.dtype != torch.float32:
        raise ValueError(
            f"floats must be float32 ({p}, 4) from static_params, got {floats.dtype} {tuple(floats.shape)}"
        )
    for name, t in (("scales", scales), ("ints", ints), ("floats", floats)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if bias is not None:
        if bias.dtype != torch.int32:
            raise ValueError(f"bias must be int32 score units (quant.bias_to_int), got {bias.dtype}")
        b, _, n, _ = q.shape
        try:
            ok = bias.dim() <= 4 and torch.broadcast_shapes(bias.shape, (b, h, n, n)) == (b, h, n, n)
        except RuntimeError:
            ok = False
        if not ok or bias.device != q.device:
            raise ValueError(
                f"bias {tuple(bias.shape)} on {bias.device} must broadcast to {(b, h, n, n)} on {q.device}"
            )
    return p


def _launch_one(config, q8, k8, v8, params, bias, out, backend):
    api.run(config, q8, k8, v8, params, bias, out.dtype, backend, out=out)


@torch.library.custom_op("qflash_gen::attention_static", mutates_args=())
def attention_static(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scales: torch.Tensor,
    ints: torch.Tensor,
    floats: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: str = "",
    backend: str = "triton",
) -> torch.Tensor:
    """Attention with calibrated scales (see the module docstring for the argument layout)."""
    checks.check_backend(backend)
    n_groups = _check_static(q, k, v, scales, ints, floats, bias)
    b, h, n, d = q.shape
    out = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    cfg = _resolve(config, q, masked=bias is not None)
    if n_groups == 1 and backend == "triton" and (q.is_cuda or checks.interpreter_active()):
        # Quantization at the static scales (floats[0][1:4] == 1 / scales[:, 0]) fused into the
        # kernel's loads: launch.launch_static, the bits of the torch path below.
        with api.on_device(q.device):
            launch.launch_static(
                codegen.load(cfg), cfg, q, k, v, quant.KernelParams(ints[0], floats[0]), bias, out, out.dtype
            )
        return out
    if n_groups == 1:
        q8, k8, v8 = (quant.quantize(t, scales[i, 0]) for i, t in enumerate((q, k, v)))
        _launch_one(cfg, q8, k8, v8, quant.KernelParams(ints[0], floats[0]), bias, out, backend)
        return out
    # Per-head scales: heads j = g * P + p share column p; one launch per column on strided views.
    split = (h // n_groups, n_groups)
    q5, k5, v5, o5 = (t.unflatten(1, split) for t in (q, k, v, out))
    b5 = None
    if bias is not None:
        bias4 = bias[(None,) * (4 - bias.dim())]
        b5 = bias4.expand(bias4.shape[0], h, n, n).unflatten(1, split)
    for p in range(n_groups):
        q8, k8, v8 = (quant.quantize(t[:, :, p], scales[i, p]) for i, t in enumerate((q5, k5, v5)))
        bias_p = None if b5 is None else b5[:, :, p]
        _launch_one(cfg, q8, k8, v8, quant.KernelParams(ints[p], floats[p]), bias_p, o5[:, :, p], backend)
    return out


@attention_static.register_fake
def _attention_static_fake(q, k, v, scales, ints, floats, bias=None, config="", backend="triton"):
    return q.new_empty(q.shape)
