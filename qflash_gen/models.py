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

Exact transforms (calibration only).  :func:`calibrate` also records, per (head, channel), the mean
of k over the calibration tokens and the ranges of q, k and v, and can apply two transforms that
leave float attention unchanged but make the int8 rounding of q, k, v cheaper:

* *k smoothing* (``smooth_k=True``, the default): k <- k - mean(k).  ``q . mean(k)`` is the same
  for every key of a softmax row, so softmax (with any additive bias or mask) is unchanged, while
  a component shared by all tokens no longer inflates k's int8 scale.
* *channel equalization* (``equalize=True``, the default): per head and channel d,
  q_d <- q_d * s_d, k_d <- k_d / s_d with s_d = sqrt(max|k_d| / max|q_d|) (q . k unchanged), and
  v_d <- v_d / t_d with t_d = max|v_d| / mean_d max|v_d|, undone on the output channel
  (the attention output's channel h * D + d is multiplied by t_d).

Both are folded into the patched module's own copies of the weights (non-persistent buffers
``qflash_qkv_weight``, ``qflash_qkv_bias``, ``qflash_proj_weight``: the qkv rows scaled and the k
bias shifted, the proj columns scaled), so they cost no op per call; the original timm parameters
are not touched.  Where a norm sits between qkv and the attention (``qk_norm``) or between the
attention and proj (``scale_norm``), the affected part runs as an elementwise op per call instead.
The transform vectors are persistent float32 buffers (``qflash_kmean``, ``qflash_qk_eq``,
``qflash_v_eq``, each (H, D)) saved with the static scales.
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
_SCALE_BUFFERS = ("qflash_scales", "qflash_ints", "qflash_floats", "qflash_bias")
# The exact transforms (float32, (H, D), persistent): k shift, q/k channel scale s, v channel scale t.
_TRANSFORM_BUFFERS = ("qflash_kmean", "qflash_qk_eq", "qflash_v_eq")
_STATIC_BUFFERS = _SCALE_BUFFERS + _TRANSFORM_BUFFERS  # saved, kept float32 under model.half()
# The transforms folded into copies of the weights (model dtype, not saved: rebuilt from the above).
_FOLDED_BUFFERS = ("qflash_qkv_weight", "qflash_qkv_bias", "qflash_proj_weight")
_EQ_LIMIT = 256.0  # s and t are clamped to [1/256, 256] (a near-empty channel must not blow up fp16)
SMOOTH_K_DEFAULT = True
EQUALIZE_DEFAULT = True
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
    """Shared state: kernel choice, scale mode, calibration observer, static buffers, transforms."""

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
        self._observer: dict[str, torch.Tensor] | None = None  # per (head, channel) statistics while calibrating
        self._observing = False
        self._bias_windows: int | None = None  # number of windows the static bias was built for
        # The folded weights are derived from the parameters of the children (qkv, proj): rebuild
        # them once a state_dict has been loaded into those too.
        self.register_load_state_dict_post_hook(_refresh_after_load)

    # state_dict: the static buffers exist only once calibrated; accept them when loading.
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        found = {name: state_dict[prefix + name] for name in _STATIC_BUFFERS if prefix + name in state_dict}
        if found:
            device = self._param_device()
            for name in _TRANSFORM_BUFFERS:  # the transforms go with the scales they were calibrated with
                self._buffers.pop(name, None)
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
        self._refresh_folded()  # from the weights in their new dtype / device
        return self

    def _param_device(self) -> torch.device:
        return self.qkv.weight.device

    def extra_repr(self) -> str:
        cfg = "db/default" if self.config is None else self.config.short()
        done = [name for name, flag in (("smooth-k", self.smooth_k), ("equalize", self.equalized)) if flag]
        where = "folded" if self._fully_folded() else "partly per call"
        transforms = f", transforms={'+'.join(done)} ({where})" if done else ""
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, scales={self.scale_mode}"
            f"{'/per-head' if self.per_head else ''}{transforms}, config={cfg}, backend={self.backend!r}"
        )

    @property
    def per_head(self) -> bool:
        s = self._buffers.get("qflash_scales")
        return s is not None and s.shape[1] > 1

    @property
    def smooth_k(self) -> bool:
        """Whether calibration's mean of k is subtracted from k (exact for softmax)."""
        return "qflash_kmean" in self._buffers

    @property
    def equalized(self) -> bool:
        """Whether q/k and v channels are equalized (exact; undone on the output channels)."""
        return "qflash_qk_eq" in self._buffers or "qflash_v_eq" in self._buffers

    # -- exact transforms: k smoothing and channel equalization ---------------------------------
    def _can_fold_qk(self) -> bool:
        """q/k transforms fold into the qkv rows unless a norm (qk_norm) sits in between."""
        return isinstance(getattr(self, "q_norm", nn.Identity()), nn.Identity) and isinstance(
            getattr(self, "k_norm", nn.Identity()), nn.Identity
        )

    def _can_fold_out(self) -> bool:
        """v's channel scale t folds into proj's columns unless a norm (scale_norm) sits in between."""
        return isinstance(getattr(self, "norm", nn.Identity()), nn.Identity) and isinstance(self.proj, nn.Linear)

    def _fully_folded(self) -> bool:
        return (self._can_fold_qk() or not ({"qflash_kmean", "qflash_qk_eq"} & set(self._buffers))) and (
            self._can_fold_out() or "qflash_v_eq" not in self._buffers
        )

    def set_transforms(
        self,
        kmean: torch.Tensor | None = None,
        qk_eq: torch.Tensor | None = None,
        v_eq: torch.Tensor | None = None,
    ) -> None:
        """Set (or, with None, clear) the exact transforms, each a (num_heads, head_dim) tensor:
        k <- (k - kmean) / qk_eq, q <- q * qk_eq, v <- v / v_eq, and the attention output's
        channels multiplied by v_eq.  Static scales (if any) then apply to the transformed q, k, v:
        :func:`calibrate` sets both together."""
        shape = (self.num_heads, self.head_dim)
        for name, t in zip(_TRANSFORM_BUFFERS, (kmean, qk_eq, v_eq), strict=True):
            self._buffers.pop(name, None)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a {shape} tensor (num_heads, head_dim), got {got}")
            t = t.detach().to(self._param_device(), torch.float32)
            if name != "qflash_kmean" and not bool((t > 0).all() & torch.isfinite(t).all()):
                raise ValueError(f"{name} must be finite and > 0")
            self._buffers[name] = t
        self._refresh_folded()

    @torch.no_grad()
    def _refresh_folded(self) -> None:
        """Fold the transforms into copies of the qkv weight/bias and the proj weight."""
        for name in _FOLDED_BUFFERS:
            self._buffers.pop(name, None)
            self._non_persistent_buffers_set.discard(name)
        kmean, s, t = (self._buffers.get(name) for name in _TRANSFORM_BUFFERS)
        if kmean is None and s is None and t is None:
            return
        w, b = self.qkv.weight, self.qkv.bias
        if w.device.type == "meta":
            return
        c = self.num_heads * self.head_dim
        work = torch.promote_types(w.dtype, torch.float32)  # fold in float32 (float64 for a float64 model)
        row_scale = torch.ones(3 * c, dtype=work, device=w.device)
        shift = torch.zeros(3 * c, dtype=work, device=w.device)
        if self._can_fold_qk():
            if s is not None:
                row_scale[:c] = s.flatten()
                row_scale[c : 2 * c] = 1.0 / s.flatten().to(work)
            if kmean is not None:
                shift[c : 2 * c] = kmean.flatten()
        if t is not None:
            row_scale[2 * c :] = 1.0 / t.flatten().to(work)
        if bool((row_scale != 1).any()):
            self.register_buffer("qflash_qkv_weight", (w.to(work) * row_scale[:, None]).to(w.dtype), persistent=False)
        if bool((shift != 0).any()) or (b is not None and "qflash_qkv_weight" in self._buffers):
            bw = b.to(work) if b is not None else torch.zeros_like(shift)
            self.register_buffer("qflash_qkv_bias", ((bw - shift) * row_scale).to(w.dtype), persistent=False)
        if t is not None and self._can_fold_out():
            pw = self.proj.weight
            self.register_buffer(
                "qflash_proj_weight", (pw.to(work) * t.flatten()[None, :]).to(pw.dtype), persistent=False
            )

    def _per_head(self, vec: torch.Tensor, heads: int, like: torch.Tensor) -> torch.Tensor:
        """A (H, D) vector as (1, heads, 1, D) for a head axis of ``heads`` (a multiple of H, head j
        using row j % H: the Swin (B, nW * H) layout)."""
        return vec.to(like.dtype).repeat(heads // self.num_heads, 1).view(1, heads, 1, self.head_dim)

    def to_kernel(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The transformed q, k, v the kernel sees, from the original (B, H', N, D) ones."""
        kmean, s, t = (self._buffers.get(name) for name in _TRANSFORM_BUFFERS)
        heads = q.shape[1]
        if kmean is not None:
            k = k - self._per_head(kmean, heads, k)
        if s is not None:
            q = q * self._per_head(s, heads, q)
            k = k / self._per_head(s, heads, k)
        if t is not None:
            v = v / self._per_head(t, heads, v)
        return q, k, v

    def from_kernel(self, o: torch.Tensor) -> torch.Tensor:
        """The kernel's (B, H', N, D) output back in the original v's units (undo v's channel scale)."""
        t = self._buffers.get("qflash_v_eq")
        return o if t is None else o * self._per_head(t, o.shape[1], o)

    def _kernel_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, H, N, D) as the kernel sees them: transforms folded into the qkv weights where
        possible, the rest applied here."""
        b, n, _ = x.shape
        w = self._buffers.get("qflash_qkv_weight")
        bias = self._buffers.get("qflash_qkv_bias")
        if w is None and bias is None:
            lin = self.qkv(x)
        else:
            lin = F.linear(x, self.qkv.weight if w is None else w, self.qkv.bias if bias is None else bias)
        q, k, v = lin.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if not self._can_fold_qk():
            q, k = self.q_norm(q), self.k_norm(k)
            kmean, s = self._buffers.get("qflash_kmean"), self._buffers.get("qflash_qk_eq")
            if kmean is not None:
                k = k - self._per_head(kmean, k.shape[1], k)
            if s is not None:
                q = q * self._per_head(s, q.shape[1], q)
                k = k / self._per_head(s, k.shape[1], k)
        return q, k, v

    def _proj_out(self, o: torch.Tensor) -> torch.Tensor:
        """proj on the (B, N, C) attention output of the kernel (v's channel scale folded or undone)."""
        w = self._buffers.get("qflash_proj_weight")
        return self.proj(o) if w is None else F.linear(o, w, self.proj.bias)

    def _unscale_out(self, o: torch.Tensor) -> torch.Tensor:
        """(B, N, C) kernel output: undo v's channel scale here when it is not folded into proj."""
        t = self._buffers.get("qflash_v_eq")
        if t is None or self._can_fold_out():
            return o
        return o * t.flatten().to(o.dtype)

    # -- calibration ---------------------------------------------------------------------------
    @torch.no_grad()
    def _observe(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Per (head, channel): max|q|, max|v|, max k, min k, sum of k and the count of finite k."""
        dims = (0, 2)
        kf = k.float()
        finite = torch.isfinite(kf)
        stats = {
            "q": _finite_abs(q).float().amax(dim=dims),
            "v": _finite_abs(v).float().amax(dim=dims),
            "kmax": torch.where(finite, kf, -torch.inf).amax(dim=dims),
            "kmin": torch.where(finite, kf, torch.inf).amin(dim=dims),
            "ksum": torch.where(finite, kf, 0.0).double().sum(dim=dims),
            "kcount": finite.sum(dim=dims).double(),
        }
        old = self._observer
        if old is not None:
            stats["q"] = torch.maximum(old["q"], stats["q"])
            stats["v"] = torch.maximum(old["v"], stats["v"])
            stats["kmax"] = torch.maximum(old["kmax"], stats["kmax"])
            stats["kmin"] = torch.minimum(old["kmin"], stats["kmin"])
            stats["ksum"] = old["ksum"] + stats["ksum"]
            stats["kcount"] = old["kcount"] + stats["kcount"]
        self._observer = stats

    def _finish_calibration(
        self, per_head: bool, smooth_k: bool = SMOOTH_K_DEFAULT, equalize: bool = EQUALIZE_DEFAULT
    ) -> None:
        st = self._observer
        if st is None:
            raise RuntimeError(
                f"{type(self).__name__} saw no calibration batch: the calibration data never reached it "
                "(check the model input or the calibrate callable)"
            )
        seen = st["kcount"] > 0
        kmean = torch.where(seen, st["ksum"] / st["kcount"].clamp_min(1), 0.0).float()
        if not smooth_k:
            kmean = torch.zeros_like(kmean)
        amax_q = st["q"]
        amax_k = torch.where(seen, torch.maximum(st["kmax"] - kmean, kmean - st["kmin"]), 0.0).clamp_min(0)
        amax_v = st["v"]
        qk_eq = v_eq = None
        if equalize:
            lo, hi = 1.0 / _EQ_LIMIT, _EQ_LIMIT
            ok = (amax_q > 0) & (amax_k > 0)
            qk_eq = torch.where(ok, torch.sqrt(amax_k / torch.where(ok, amax_q, 1.0)), 1.0).clamp(lo, hi)
            mean_v = amax_v.mean(dim=1, keepdim=True)
            ok = (amax_v > 0) & (mean_v > 0)
            v_eq = torch.where(ok, amax_v / torch.where(ok, mean_v, 1.0), 1.0).clamp(lo, hi)
            amax_q, amax_k, amax_v = amax_q * qk_eq, amax_k / qk_eq, amax_v / v_eq
        amax = torch.stack([amax_q.amax(dim=1), amax_k.amax(dim=1), amax_v.amax(dim=1)])  # (3, H)
        if not per_head:
            amax = amax.amax(dim=1, keepdim=True)
        scales = torch.where(amax > 0, amax / _INT8_MAX, torch.ones_like(amax))
        self.set_transforms(kmean if smooth_k else None, qk_eq, v_eq)
        self.set_static_scales(scales)
        self._observer = None

    def set_static_scales(self, scales: torch.Tensor) -> None:
        """Use fixed scales: a (3, P) float tensor, rows sq, sk, sv, P = 1 or ``num_heads``.

        The scales apply to q, k, v as the kernel sees them (after the module's transforms, if any)."""
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

    def _core(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        float_bias: torch.Tensor | None = None,
        static_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The custom op on q, k, v as the kernel sees them (already transformed)."""
        if self.scale_mode == "static":
            bias = static_bias if static_bias is not None else self._int_bias(attn_mask, float_bias, q.shape[1])
            return torch.ops.qflash_gen.attention_static(
                q, k, v, self.qflash_scales, self.qflash_ints, self.qflash_floats, bias, self._config_arg, self.backend
            )
        return torch.ops.qflash_gen.attention(
            q, k, v, attn_mask, float_bias, float(self.scale), self._config_arg, self.backend
        )

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        float_bias: torch.Tensor | None = None,
        static_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention core on the original (B, H, N, D) q, k, v as this module runs it (its
        transforms, the custom op in the current scale mode, the output back in v's units):
        an approximation of ``softmax(scale * q k^T + bias) v``.  ``static_bias``: a precomputed
        int32 bias for static scales."""
        q, k, v = self.to_kernel(q, k, v)
        return self.from_kernel(self._core(q, k, v, attn_mask, float_bias, static_bias))


def _refresh_after_load(module: _QFlashBase, _incompatible_keys) -> None:
    module._refresh_folded()


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
        """q, k, v (B, H, N, D) for tokens ``x`` (B, N, C), as the original module computes them
        (before this module's transforms: see :meth:`to_kernel`)."""
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
        if self._observing:
            q, k, v = self.qkv_heads(x)
            self._observe(q, k, v)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
            o = o.transpose(1, 2).reshape(b, n, self.attn_dim)
            o = self.norm(o)
            if gate is not None:
                o = o * gate
            return self.proj_drop(self.proj(o))
        q, k, v = self._kernel_qkv(x)
        o = self._core(q, k, v, attn_mask=attn_mask)
        o = self._unscale_out(o.transpose(1, 2).reshape(b, n, self.attn_dim))
        o = self.norm(o)
        if gate is not None:
            o = o * gate
        return self.proj_drop(self._proj_out(o))


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

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B_, H, N, D) for windows ``x`` (B_, N, C), as the original module computes them
        (before this module's transforms: see :meth:`to_kernel`)."""
        b_, n, _ = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

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
        nw = 1 if mask is None else mask.shape[0]
        if mask is not None and (mask.dim() != 3 or mask.shape[1:] != (n, n) or b_ % nw):
            raise ValueError(
                f"mask must be (num_windows, {n}, {n}) with num_windows dividing {b_}, got {tuple(mask.shape)}"
            )
        if self._observing:
            q, k, v = self.qkv_heads(x)  # (B_, H, N, D)
            self._observe(q, k, v)
            self._calib_mask = None if mask is None else mask.detach()
            float_bias, attn_mask = self._window_bias(mask)
            bias = float_bias if attn_mask is None else float_bias + attn_mask
            q4, k4, v4 = (t.reshape(b_ // nw, nw * h, n, d) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=bias.to(q.dtype), scale=self.scale)
            o = o.reshape(b_, h, n, d).transpose(1, 2).reshape(b_, n, -1)
            return self.proj_drop(self.proj(o))
        q, k, v = self._kernel_qkv(x)  # (B_, H, N, D), transformed
        # (B_, H, N, D) -> (B, nW*H, N, D): windows of one image side by side, so the mask and
        # the bias broadcast over the batch from one (1, nW*H, N, N) tensor.
        q4, k4, v4 = (t.reshape(b_ // nw, nw * h, n, d) for t in (q, k, v))
        static_bias = None
        if self.scale_mode == "static" and self._bias_windows == (0 if mask is None else nw):
            static_bias = getattr(self, "qflash_bias", None)
            if static_bias is not None and static_bias.shape[-1] != n:
                static_bias = None  # built for another window size: rebuild per call below
        if static_bias is not None:
            o = self._core(q4, k4, v4, static_bias=static_bias)
        else:
            float_bias, attn_mask = self._window_bias(mask)
            o = self._core(q4, k4, v4, attn_mask=attn_mask, float_bias=float_bias)
        o = self._unscale_out(o.reshape(b_, h, n, d).transpose(1, 2).reshape(b_, n, -1))
        return self.proj_drop(self._proj_out(o))


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
    smooth_k: bool = SMOOTH_K_DEFAULT,
    equalize: bool = EQUALIZE_DEFAULT,
) -> PatchReport:
    """Replace the attention of a timm ViT/DeiT/Swin in place by qflash-gen attention.

    ``config``: the KernelConfig for every patched module, or None (the tuning DB's pick per call
    shape on CUDA, the safe default elsewhere).  ``backend``: ``"triton"`` (the kernel; on CPU
    only with ``TRITON_INTERPRET=1``) or ``"reference"`` (the integer oracle, same bits).
    ``calibrate``: None keeps dynamic per-tensor scales; otherwise sample batches (an iterable of
    model inputs) or a callable that runs the model, passed to :func:`calibrate` with
    ``per_head``, ``smooth_k`` and ``equalize``.  Returns a :class:`PatchReport`; unknown attention modules are left alone,
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
        _calibrate(model, calibrate, per_head=per_head, smooth_k=smooth_k, equalize=equalize)
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
    smooth_k: bool = SMOOTH_K_DEFAULT,
    equalize: bool = EQUALIZE_DEFAULT,
) -> dict[str, torch.Tensor]:
    """Static scales (and exact transforms) for every patched module from sample batches run
    through the float model.

    ``batches``: an iterable of model inputs (each passed as ``model(batch)``; a tuple/list as
    ``model(*batch)``) or a callable ``fn(model)`` that runs them.  While calibrating, the patched
    modules run float SDPA on the original q, k, v and record per (head, channel) max|q|, max|v|,
    the range and the mean of k.  Afterwards each module sets its transforms:

    * ``smooth_k`` (default True): subtract the mean of k per (head, channel), exact for softmax;
    * ``equalize`` (default True): scale q/k channels by s_d = sqrt(max|k_d| / max|q_d|) (k after
      smoothing) and v channels by 1 / t_d, t_d = max|v_d| / mean_d max|v_d|, undone on the output;

    folded into the module's copies of the qkv / proj weights (the timm parameters are not
    changed), then stores scales = max / 127 of the transformed q, k, v (per tensor, or per head
    with ``per_head=True``) and its kernel constants as buffers and switches to static scales.
    Returns the scales by module name."""
    return _calibrate(model, batches, per_head=per_head, smooth_k=smooth_k, equalize=equalize)


@torch.no_grad()
def _calibrate(
    model: nn.Module,
    batches: Any,
    *,
    per_head: bool,
    smooth_k: bool = SMOOTH_K_DEFAULT,
    equalize: bool = EQUALIZE_DEFAULT,
) -> dict[str, torch.Tensor]:
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
        m._finish_calibration(per_head, smooth_k=smooth_k, equalize=equalize)
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
