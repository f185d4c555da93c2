"""Drop qflash-gen attention into timm vision transformers: ViT/DeiT and Swin.

    report = qflash_gen.models.patch_model(model)                  # dynamic scales
    report = qflash_gen.models.patch_model(model, calibrate=batches)  # + static scales
    print(report)                                                  # what was replaced / left alone

Replaced (exact classes; a subclass with its own ``forward`` is left alone):

* ``timm.layers.Attention`` (ViT, DeiT, ...; also the older ``timm.models.vision_transformer
  .Attention``) by :class:`QFlashAttention`;
* ``timm.models.swin_transformer.WindowAttention`` (Swin v1) by :class:`QFlashWindowAttention`.
  Its relative-position bias goes to the kernel as ``float_bias`` and the shifted-window mask
  (timm: (num_windows, N, N), 0 or -100, added to the logits) as an additive ``attn_mask``.
  timm orders the B_ = B * num_windows windows batch-major (window index fastest), so the
  patched module views q, k, v as (B, num_windows * heads, N, D): the mask and bias then form one
  small (1, num_windows * heads, N, N) tensor that broadcasts over the batch.

The replacement modules take over the original's submodules (``qkv``, ``proj``, norms, the
relative-position table), so parameter names and ``state_dict`` keys are unchanged and weights
can be loaded before or after patching.  They are inference modules: in training mode with
attention dropout they raise.  Every other module whose class name says attention is left
alone, logged on ``qflash_gen.models`` and warned about once, and listed in the report.

Scales.  *Dynamic* (default): per-tensor scales computed on the device per call
(``torch.ops.qflash_gen.attention``).  *Static*: :func:`calibrate` runs a few batches through the
float model, records max|q|, max|k|, max|v| per head and stores the scales (per tensor, or per
head with ``per_head=True``), the kernel's integer constants and, for Swin, the integer bias as
buffers on each patched module (``qflash_scales``, ``qflash_ints``, ``qflash_floats``,
``qflash_bias``).  A static call is quantize + launch (``torch.ops.qflash_gen.attention_static``):
no host sync, CUDA-graph capturable.  The kernel has per-tensor constants only, so per-head scales
run one launch per head.  These buffers keep float32 under ``model.half()`` and are saved in the
``state_dict``; calibrate again after changing weights or the input size.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qflash_gen import ops, quant, runtime
from qflash_gen.config import KernelConfig

logger = logging.getLogger("qflash_gen.models")

SCALE_MODES = ("dynamic", "static")
_STATIC_BUFFERS = ("qflash_scales", "qflash_ints", "qflash_floats", "qflash_bias")
_INT8_MAX = 127.0


# -- which timm classes we replace ---------------------------------------------------------------
def _timm_vit_attention_classes() -> tuple[type, ...]:
    classes: list[type] = []
    try:
        from timm.layers import Attention

        classes.append(Attention)
    except ImportError:  # timm < 0.9 or not installed
        pass
    try:  # timm 0.9.x kept its own copy in vision_transformer
        from timm.models import vision_transformer as vt

        cls = getattr(vt, "Attention", None)
        if cls is not None and cls not in classes:
            classes.append(cls)
    except ImportError:
        pass
    return tuple(classes)


def _timm_swin_attention_classes() -> tuple[type, ...]:
    try:
        from timm.models.swin_transformer import WindowAttention
    except ImportError:
        return ()
    return (WindowAttention,)


# -- the patched modules -------------------------------------------------------------------------
class _QFlashBase(nn.Module):
    """Shared state: kernel choice, scale mode, calibration observer, static buffers."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, config: KernelConfig | None, backend: str):
        super().__init__()
        runtime._check_backend(backend)
        if head_dim not in runtime.SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim={head_dim} is not supported; supported: {runtime.SUPPORTED_HEAD_DIMS}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = backend
        self.config = config
        self._config_arg = ops.config_arg(config)
        self.scale_mode = "dynamic"
        self._observer: torch.Tensor | None = None  # (3, H) running max|q|, max|k|, max|v| while calibrating
        self._observing = False
        self._bias_windows: int | None = None  # number of windows the static bias was built for

    # state_dict: the static buffers exist only once calibrated; accept them when loading.
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        found = {name: state_dict[prefix + name] for name in _STATIC_BUFFERS if prefix + name in state_dict}
        if found:
            device = self._param_device()
            for name, t in found.items():
                self._buffers[name] = t.detach().clone().to(device)
            self._bias_windows = int(state_dict.get(prefix + "qflash_bias_windows", torch.tensor(-1)).item())
            if self._bias_windows < 0:
                self._bias_windows = None
            self.scale_mode = "static"
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        if prefix + "qflash_bias_windows" in unexpected_keys:
            unexpected_keys.remove(prefix + "qflash_bias_windows")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._bias_windows is not None and "qflash_bias" in self._buffers:
            destination[prefix + "qflash_bias_windows"] = torch.tensor(self._bias_windows)

    def _apply(self, fn, recurse=True):
        # Keep the static buffers' dtypes (model.half() must not round the scales); follow the device.
        saved = {name: self._buffers.pop(name) for name in _STATIC_BUFFERS if name in self._buffers}
        super()._apply(fn, recurse)
        device = self._param_device()
        for name, t in saved.items():
            self._buffers[name] = t.to(device)
        return self

    def _param_device(self) -> torch.device:
        return self.qkv.weight.device

    def extra_repr(self) -> str:
        cfg = "db/default" if self.config is None else self.config.short()
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, scales={self.scale_mode}"
            f"{'/per-head' if self.per_head else ''}, config={cfg}, backend={self.backend!r}"
        )

    @property
    def per_head(self) -> bool:
        s = self._buffers.get("qflash_scales")
        return s is not None and s.shape[1] > 1

    # -- calibration ---------------------------------------------------------------------------
    def _observe(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        amax = torch.stack([_finite_abs(t).amax(dim=(0, 2, 3)).to(torch.float32) for t in (q, k, v)])
        self._observer = amax if self._observer is None else torch.maximum(self._observer, amax)

    def _finish_calibration(self, per_head: bool) -> None:
        if self._observer is None:
            raise RuntimeError(
                f"{type(self).__name__} saw no calibration batch: the calibration data never reached it "
                "(check the model input or the calibrate callable)"
            )
        amax = self._observer if per_head else self._observer.amax(dim=1, keepdim=True)
        scales = torch.where(amax > 0, amax / _INT8_MAX, torch.ones_like(amax))
        self.set_static_scales(scales)
        self._observer = None

    def set_static_scales(self, scales: torch.Tensor) -> None:
        """Use fixed scales: a (3, P) float tensor, rows sq, sk, sv, P = 1 or ``num_heads``."""
        if not isinstance(scales, torch.Tensor) or scales.dim() != 2 or scales.shape[0] != 3:
            raise ValueError("scales must be a (3, P) tensor: rows sq, sk, sv; P = 1 (per tensor) or num_heads")
        if scales.shape[1] not in (1, self.num_heads):
            raise ValueError(f"scales has P={scales.shape[1]} columns; use 1 or num_heads={self.num_heads}")
        scales = scales.detach().to(self._param_device(), torch.float32)
        ints, floats = ops.static_params(scales, self.head_dim, self.scale)
        self._buffers["qflash_scales"] = scales
        self._buffers["qflash_ints"] = ints
        self._buffers["qflash_floats"] = floats
        self._buffers.pop("qflash_bias", None)
        self._bias_windows = None
        self._build_static_bias()
        self.scale_mode = "static"

    def _build_static_bias(self) -> None:
        """Swin: precompute the integer bias for the scales just set (ViT: nothing)."""

    def set_scale_mode(self, mode: str) -> None:
        if mode not in SCALE_MODES:
            raise ValueError(f"scale mode {mode!r} is unknown; choose one of {SCALE_MODES}")
        if mode == "static" and "qflash_scales" not in self._buffers:
            raise ValueError(f"{type(self).__name__} has no static scales: run qflash_gen.models.calibrate first")
        self.scale_mode = mode

    def _check_inference(self, drop_p: float) -> None:
        if self.training and drop_p > 0:
            raise RuntimeError(
                "qflash-gen attention is inference-only and has no attention dropout: call model.eval() "
                "(or build the model with attn_drop=0)"
            )

    # -- the attention core --------------------------------------------------------------------
    def _int_bias(
        self, attn_mask: torch.Tensor | None, float_bias: torch.Tensor | None, heads: int
    ) -> torch.Tensor | None:
        """Integer bias for the static constants (one bias_to_int per scale column, on the device).

        ``heads``: the head axis of the kernel call (H, or num_windows * H for Swin)."""
        if attn_mask is None and float_bias is None:
            return None
        ints, floats = self.qflash_ints, self.qflash_floats
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

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        float_bias: torch.Tensor | None = None,
        static_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention core on (B, H, N, D) q, k, v as this module runs it (custom op, current
        scale mode); ``static_bias``: a precomputed int32 bias for static scales."""
        if self.scale_mode == "static":
            bias = static_bias if static_bias is not None else self._int_bias(attn_mask, float_bias, q.shape[1])
            return torch.ops.qflash_gen.attention_static(
                q, k, v, self.qflash_scales, self.qflash_ints, self.qflash_floats, bias, self._config_arg, self.backend
            )
        return torch.ops.qflash_gen.attention(
            q, k, v, attn_mask, float_bias, float(self.scale), self._config_arg, self.backend
        )


def _finite_abs(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t.abs(), torch.zeros((), dtype=t.dtype, device=t.device))


class QFlashAttention(_QFlashBase):
    """timm ``Attention`` (ViT/DeiT) with the attention core run by qflash-gen."""

    def __init__(self, orig: nn.Module, *, config: KernelConfig | None = None, backend: str = "triton"):
        num_heads = orig.num_heads
        head_dim = getattr(orig, "head_dim", None) or orig.qkv.weight.shape[0] // (3 * num_heads)
        super().__init__(num_heads, head_dim, float(orig.scale), config, backend)
        self.attn_dim = getattr(orig, "attn_dim", num_heads * head_dim)
        self.qkv = orig.qkv
        self.q_norm = getattr(orig, "q_norm", nn.Identity())
        self.k_norm = getattr(orig, "k_norm", nn.Identity())
        self.attn_drop = orig.attn_drop
        self.norm = getattr(orig, "norm", nn.Identity())
        self.gate = getattr(orig, "gate", None)
        self.proj = orig.proj
        self.proj_drop = orig.proj_drop
        self.fused_attn = getattr(orig, "fused_attn", True)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, H, N, D) for tokens ``x`` (B, N, C), as the original module computes them."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if is_causal:
            raise ValueError("is_causal=True is not supported by qflash-gen attention (vision models are not causal)")
        self._check_inference(self.attn_drop.p)
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv_heads(x)
        if self._observing:
            self._observe(q, k, v)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        else:
            o = self.attend(q, k, v, attn_mask=attn_mask)
        o = o.transpose(1, 2).reshape(b, n, self.attn_dim)
        o = self.norm(o)
        if gate is not None:
            o = o * gate
        return self.proj_drop(self.proj(o))


class QFlashWindowAttention(_QFlashBase):
    """timm Swin ``WindowAttention`` with the attention core run by qflash-gen.

    ``forward(x, mask)``: x (B_, N, C) with B_ = B * num_windows windows (window index fastest,
    timm's ``window_partition`` order); mask None or (num_windows, N, N), added to the logits."""

    def __init__(self, orig: nn.Module, *, config: KernelConfig | None = None, backend: str = "triton"):
        num_heads = orig.num_heads
        head_dim = orig.qkv.weight.shape[0] // (3 * num_heads)
        super().__init__(num_heads, head_dim, float(orig.scale), config, backend)
        self.dim = orig.dim
        self.window_size = orig.window_size
        self.window_area = orig.window_area
        self.relative_position_bias_table = orig.relative_position_bias_table
        self.register_buffer("relative_position_index", orig.relative_position_index, persistent=False)
        self.qkv = orig.qkv
        self.attn_drop = orig.attn_drop
        self.proj = orig.proj
        self.proj_drop = orig.proj_drop
        self._calib_mask: torch.Tensor | None = None  # the mask seen while calibrating (a reference)

    def rel_pos_bias(self) -> torch.Tensor:
        """The relative-position bias (1, H, N, N), as timm's ``_get_rel_pos_bias``."""
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def _window_bias(self, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(float_bias, attn_mask) in the (B, num_windows * H) layout: (1, nW*H, N, N) each."""
        rel = self.rel_pos_bias()
        if mask is None:
            return rel, None
        nw, n = mask.shape[0], mask.shape[-1]
        h = self.num_heads
        float_bias = rel.expand(nw, h, n, n).reshape(1, nw * h, n, n)
        attn_mask = mask[:, None].expand(nw, h, n, n).reshape(1, nw * h, n, n)
        return float_bias, attn_mask

    def _build_static_bias(self) -> None:
        # The mask seen while calibrating (timm: the block's fixed shift mask, or None).
        mask = self._calib_mask
        with torch.no_grad():
            float_bias, attn_mask = self._window_bias(mask)
            heads = self.num_heads * (1 if mask is None else mask.shape[0])
            self._buffers["qflash_bias"] = self._int_bias(attn_mask, float_bias, heads).contiguous()
        self._bias_windows = 0 if mask is None else mask.shape[0]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inference(self.attn_drop.p)
        b_, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(b_, n, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B_, H, N, D)
        nw = 1 if mask is None else mask.shape[0]
        if mask is not None and (mask.dim() != 3 or mask.shape[1:] != (n, n) or b_ % nw):
            raise ValueError(
                f"mask must be (num_windows, {n}, {n}) with num_windows dividing {b_}, got {tuple(mask.shape)}"
            )
        if self._observing:
            self._observe(q, k, v)
            self._calib_mask = None if mask is None else mask.detach()
            float_bias, attn_mask = self._window_bias(mask)
            bias = float_bias if attn_mask is None else float_bias + attn_mask
            q4, k4, v4 = (t.reshape(b_ // nw, nw * h, n, d) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=bias.to(q.dtype), scale=self.scale)
        else:
            # (B_, H, N, D) -> (B, nW*H, N, D): windows of one image side by side, so the mask and
            # the bias broadcast over the batch from one (1, nW*H, N, N) tensor.
            q4, k4, v4 = (t.reshape(b_ // nw, nw * h, n, d) for t in (q, k, v))
            static_bias = None
            if self.scale_mode == "static" and self._bias_windows == (0 if mask is None else nw):
                static_bias = getattr(self, "qflash_bias", None)
                if static_bias is not None and static_bias.shape[-1] != n:
                    static_bias = None  # built for another window size: rebuild per call below
            if static_bias is not None:
                o = self.attend(q4, k4, v4, static_bias=static_bias)
            else:
                float_bias, attn_mask = self._window_bias(mask)
                o = self.attend(q4, k4, v4, attn_mask=attn_mask, float_bias=float_bias)
        o = o.reshape(b_, h, n, d).transpose(1, 2).reshape(b_, n, -1)
        return self.proj_drop(self.proj(o))


# -- patching ------------------------------------------------------------------------------------
@dataclasses.dataclass
class PatchReport:
    """What :func:`patch_model` did.

    replaced: qualified module name -> the original module (no longer in the model).
    skipped: qualified module name -> why it was left alone (unknown or unsupported attention).
    """

    replaced: dict[str, nn.Module] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"qflash-gen patched {len(self.replaced)} attention module(s), left {len(self.skipped)} alone"]
        kinds: dict[str, int] = {}
        for mod in self.replaced.values():
            kinds[type(mod).__name__] = kinds.get(type(mod).__name__, 0) + 1
        lines += [f"  replaced {count} x {name}" for name, count in sorted(kinds.items())]
        lines += [f"  left alone {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _looks_like_attention(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "attention" in name or "attn" in name or isinstance(module, nn.MultiheadAttention)


def _why_not(module: nn.Module, supported: tuple[type, ...]) -> str | None:
    """None if ``module`` can be replaced, else the reason."""
    cls = type(module)
    if cls not in supported:
        base = next((s for s in supported if isinstance(module, s)), None)
        if base is not None and cls.forward is not base.forward:
            return f"{cls.__module__}.{cls.__qualname__} subclasses {base.__name__} with its own forward"
        if base is None:
            return f"{cls.__module__}.{cls.__qualname__} is not an attention module qflash-gen knows"
    heads = getattr(module, "num_heads", None)
    qkv = getattr(module, "qkv", None)
    if not isinstance(heads, int) or not isinstance(qkv, nn.Linear):
        return f"{cls.__qualname__} has no fused qkv Linear / num_heads"
    head_dim = getattr(module, "head_dim", None) or qkv.weight.shape[0] // (3 * heads)
    if head_dim not in runtime.SUPPORTED_HEAD_DIMS:
        return f"head_dim={head_dim} is not supported (supported: {runtime.SUPPORTED_HEAD_DIMS})"
    return None


def patch_model(
    model: nn.Module,
    *,
    calibrate: Iterable[Any] | Callable[[nn.Module], Any] | None = None,
    config: KernelConfig | None = None,
    backend: str = "triton",
    per_head: bool = False,
) -> PatchReport:
    """Replace the attention of a timm ViT/DeiT/Swin in place by qflash-gen attention.

    ``config``: the KernelConfig for every patched module, or None (the tuning DB's pick per call
    shape on CUDA, the safe default elsewhere).  ``backend``: ``"triton"`` (the kernel; on CPU
    only with ``TRITON_INTERPRET=1``) or ``"reference"`` (the integer oracle, same bits).
    ``calibrate``: None keeps dynamic per-tensor scales; otherwise sample batches (an iterable of
    model inputs) or a callable that runs the model, passed to :func:`calibrate` with
    ``per_head``.  Returns a :class:`PatchReport`; unknown attention modules are left alone,
    logged and warned about."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is not None and not isinstance(config, KernelConfig):
        raise ValueError(f"config must be a KernelConfig or None, got {type(config).__name__}")
    runtime._check_backend(backend)
    vit_classes = _timm_vit_attention_classes()
    swin_classes = _timm_swin_attention_classes()
    if not vit_classes and not swin_classes:
        raise ImportError("patch_model needs timm (pip install timm): no timm attention class could be imported")
    report = PatchReport()
    targets: list[tuple[str, nn.Module, type]] = []
    for name, module in model.named_modules():
        if isinstance(module, _QFlashBase) or any(name.startswith(t[0] + ".") for t in targets if t[0]):
            continue
        if isinstance(module, vit_classes) and (why := _why_not(module, vit_classes)) is None:
            targets.append((name, module, QFlashAttention))
        elif isinstance(module, swin_classes) and (why := _why_not(module, swin_classes)) is None:
            targets.append((name, module, QFlashWindowAttention))
        elif isinstance(module, vit_classes + swin_classes):
            report.skipped[name] = why
        elif _looks_like_attention(module) and not _inside_any(name, report.skipped):
            cls = type(module)
            report.skipped[name] = f"{cls.__module__}.{cls.__qualname__} is not an attention module qflash-gen knows"
    if any(name == "" for name, _, _ in targets):
        raise ValueError(
            "patch_model patches attention modules inside a model; pass the model, not one attention module"
        )
    for name, module, cls in targets:
        new = cls(module, config=config, backend=backend)
        new.train(module.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        report.replaced[name] = module
    if report.skipped:
        msg = "; ".join(f"{n}: {w}" for n, w in report.skipped.items())
        logger.warning("qflash-gen left %d attention module(s) alone: %s", len(report.skipped), msg)
        warnings.warn(f"qflash-gen left {len(report.skipped)} attention module(s) alone: {msg}", stacklevel=2)
    logger.info("%s", report)
    if calibrate is not None:
        _calibrate(model, calibrate, per_head=per_head)
    return report


def _inside_any(name: str, others: dict[str, str]) -> bool:
    return any(name.startswith(o + ".") for o in others if o)


def patched_modules(model: nn.Module) -> dict[str, _QFlashBase]:
    """The qflash-gen attention modules of a patched model, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _QFlashBase)}


def calibrate(
    model: nn.Module,
    batches: Iterable[Any] | Callable[[nn.Module], Any],
    *,
    per_head: bool = False,
) -> dict[str, torch.Tensor]:
    """Static scales for every patched module from sample batches run through the float model.

    ``batches``: an iterable of model inputs (each passed as ``model(batch)``; a tuple/list as
    ``model(*batch)``) or a callable ``fn(model)`` that runs them.  While calibrating, the patched
    modules run float SDPA and record max|q|, max|k|, max|v| (per head); afterwards each stores
    scales = max / 127 (per tensor, or per head with ``per_head=True``) and its kernel constants
    as buffers and switches to static scales.  Returns the scales by module name."""
    return _calibrate(model, batches, per_head=per_head)


@torch.no_grad()
def _calibrate(model: nn.Module, batches: Any, *, per_head: bool) -> dict[str, torch.Tensor]:
    mods = patched_modules(model)
    if not mods:
        raise ValueError("calibrate: the model has no qflash-gen attention module; run patch_model first")
    was_training = model.training
    model.eval()
    for m in mods.values():
        m._observer, m._observing = None, True
        if isinstance(m, QFlashWindowAttention):
            m._calib_mask = None
    try:
        if callable(batches):
            batches(model)
        else:
            count = 0
            for batch in batches:
                model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
                count += 1
            if count == 0:
                raise ValueError("calibrate: no batch given")
    finally:
        for m in mods.values():
            m._observing = False
        model.train(was_training)
    for m in mods.values():
        m._finish_calibration(per_head)
    return {name: m.qflash_scales for name, m in mods.items()}


def set_scale_mode(model: nn.Module, mode: str) -> None:
    """Switch every patched module to ``"dynamic"`` or (calibrated) ``"static"`` scales."""
    mods = patched_modules(model)
    if not mods:
        raise ValueError("set_scale_mode: the model has no qflash-gen attention module; run patch_model first")
    for m in mods.values():
        m.set_scale_mode(mode)


def unpatch_model(model: nn.Module, report: PatchReport) -> None:
    """Put the original modules of ``report`` back (they share the parameters with the patched ones)."""
    for name, orig in report.replaced.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, orig)
