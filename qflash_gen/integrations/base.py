"""The module every patched attention is: :class:`QFlashModule` (kernel choice, scale mode,
static-scale buffers, the exact transforms) and the two timm replacements built on it live in
:mod:`.attention`; patching in :mod:`.timm`.

Scales.  *Dynamic* (default): one scale per (batch, head) and tensor, computed on the device per
call, k smoothed by its per-channel mean (``torch.ops.qflash_gen.attention``: two launches, the
quantizer and the kernel).  *Static*: calibration stores the scales (per tensor, or per head) as
the buffer ``qflash_scales`` (3, P), kept float32 under ``model.half()`` and saved in the
``state_dict``; the op reads them as a (P, 4) table (``qflash_table``, rebuilt from them).  A
static call is quantize + launch (``torch.ops.qflash_gen.attention_static``): no host sync,
CUDA-graph capturable.  In eager mode the ops' Python implementations are called directly (a
custom op's dispatch costs host time each call); under ``torch.compile`` the ops are.

Exact transforms (calibration only), which leave float attention unchanged but make the int8
rounding of q, k, v cheaper:

* *k smoothing*: k <- k - mean(k).  ``q . mean(k)`` is the same for every key of a softmax row,
  so softmax (with any additive bias or mask) is unchanged;
* *channel equalization*: per head and channel d, q_d <- q_d * s_d, k_d <- k_d / s_d with
  s_d = sqrt(max|k_d| / max|q_d|) (q . k unchanged), and v_d <- v_d / t_d with
  t_d = max|v_d| / mean_d max|v_d|, undone on the output channel.

Both are folded into the module's own copies of the weights (non-persistent buffers
``qflash_qkv_weight``, ``qflash_qkv_bias``, ``qflash_proj_weight``), so they cost no op per call;
the timm parameters are not touched.  Where a norm sits between qkv and the attention
(``qk_norm``) or between the attention and proj (``scale_norm``), the affected part runs as an
elementwise op per call instead.  The transform vectors are persistent float32 buffers
(``qflash_kmean``, ``qflash_qk_eq``, ``qflash_v_eq``, each (H, D)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qflash_gen import checks, quant
from qflash_gen.config import KernelConfig
from qflash_gen.integrations import calibration, ops
from qflash_gen.integrations.ops import config_arg, static_table

SCALE_MODES = ("dynamic", "static")
SCALE_BUFFERS = ("qflash_scales",)
# State-dict keys of earlier releases (integer constants and an integer bias, now derived in the
# kernel): ignored when loading; the scales they came with are enough.
LEGACY_KEYS = ("qflash_ints", "qflash_floats", "qflash_bias", "qflash_bias_windows")
# The exact transforms (float32, (H, D), persistent): k shift, q/k channel scale s, v channel scale t.
TRANSFORM_BUFFERS = ("qflash_kmean", "qflash_qk_eq", "qflash_v_eq")
STATIC_BUFFERS = SCALE_BUFFERS + TRANSFORM_BUFFERS  # saved, kept float32 under model.half()
# The transforms folded into copies of the weights (model dtype, not saved: rebuilt from the above).
FOLDED_BUFFERS = ("qflash_qkv_weight", "qflash_qkv_bias", "qflash_proj_weight")


class QFlashModule(nn.Module):
    """Shared state: kernel choice, scale mode, calibration observer, static buffers, transforms."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, config: KernelConfig | None, backend: str):
        super().__init__()
        checks.check_backend(backend)
        checks.check_head_dim(head_dim, "head_dim")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = backend
        self.config = config
        self.config_arg = config_arg(config)  # the ops' config argument
        self.scale_mode = "dynamic"
        self._observer: dict[str, torch.Tensor] | None = None  # per (head, channel) statistics while calibrating
        self._observing = False
        # The folded weights are derived from the parameters of the children (qkv, proj): rebuild
        # them once a state_dict has been loaded into those too.
        self.register_load_state_dict_post_hook(_refresh_after_load)

    # state_dict: the static buffers exist only once calibrated; accept them when loading.
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        found = {name: state_dict[prefix + name] for name in STATIC_BUFFERS if prefix + name in state_dict}
        if found:
            device = self._param_device()
            for name in TRANSFORM_BUFFERS:  # the transforms go with the scales they were calibrated with
                self._buffers.pop(name, None)
            for name, t in found.items():
                self._buffers[name] = t.detach().clone().to(device)
            if "qflash_scales" in found:
                self._set_table()
                self.scale_mode = "static"
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        for name in LEGACY_KEYS:
            if prefix + name in unexpected_keys:
                unexpected_keys.remove(prefix + name)

    def _apply(self, fn, recurse=True):
        # Keep the static buffers' dtypes (model.half() must not round the scales); follow the device.
        saved = {name: self._buffers.pop(name) for name in STATIC_BUFFERS if name in self._buffers}
        super()._apply(fn, recurse)
        device = self._param_device()
        for name, t in saved.items():
            self._buffers[name] = t.to(device)
        if "qflash_scales" in saved:
            self._set_table()
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
        for name, t in zip(TRANSFORM_BUFFERS, (kmean, qk_eq, v_eq), strict=True):
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
        for name in FOLDED_BUFFERS:
            self._buffers.pop(name, None)
            self._non_persistent_buffers_set.discard(name)
        kmean, s, t = (self._buffers.get(name) for name in TRANSFORM_BUFFERS)
        if kmean is None and s is None and t is None:
            return
        w, b = self.qkv.weight, self.qkv.bias
        if w.device.type == "meta":
            return
        proj_weight = self.proj.weight if self._can_fold_out() else None  # None: undone per call
        folded = calibration.fold_weights(w, b, proj_weight, kmean, s, t, fold_qk=self._can_fold_qk())
        for name, tensor in folded.items():
            self.register_buffer(name, tensor, persistent=False)

    def _per_head(self, vec: torch.Tensor, heads: int, like: torch.Tensor) -> torch.Tensor:
        """A (H, D) vector as (1, heads, 1, D) for a head axis of ``heads`` (a multiple of H, head j
        using row j % H: the Swin (B, nW * H) layout)."""
        return vec.to(like.dtype).repeat(heads // self.num_heads, 1).view(1, heads, 1, self.head_dim)

    def to_kernel(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The transformed q, k, v the kernel sees, from the original (B, H', N, D) ones."""
        kmean, s, t = (self._buffers.get(name) for name in TRANSFORM_BUFFERS)
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

    def kernel_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    def start_calibration(self) -> None:
        """Record statistics of the float q, k, v from now on (forward runs float SDPA meanwhile)."""
        self._observer, self._observing = None, True

    def stop_calibration(self) -> None:
        self._observing = False

    def _observe(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self._observer = calibration.observe(self._observer, q, k, v)

    def finish_calibration(
        self,
        per_head: bool,
        smooth_k: bool = calibration.SMOOTH_K_DEFAULT,
        equalize: bool = calibration.EQUALIZE_DEFAULT,
    ) -> None:
        """Set the transforms and static scales from the statistics recorded since
        :meth:`start_calibration` (RuntimeError when no batch reached this module)."""
        st = self._observer
        if st is None:
            raise RuntimeError(
                f"{type(self).__name__} saw no calibration batch: the calibration data never reached it "
                "(check the model input or the calibrate callable)"
            )
        kmean, qk_eq, v_eq, scales = calibration.derive(st, per_head=per_head, smooth_k=smooth_k, equalize=equalize)
        self.set_transforms(kmean, qk_eq, v_eq)
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
        for name, x in zip(("sq", "sk", "sv"), scales, strict=True):
            if not bool((torch.isfinite(x) & (x > 0)).all()):
                raise ValueError(f"static scales {name} must be finite and > 0, got {x.tolist()}")
        self._buffers["qflash_scales"] = scales
        self._set_table()
        self.scale_mode = "static"

    def _set_table(self) -> None:
        """The op's (P, 4) scale table from ``qflash_scales`` (not saved: derived)."""
        self.register_buffer("qflash_table", static_table(self._buffers["qflash_scales"]), persistent=False)

    def set_scale_mode(self, mode: str) -> None:
        if mode not in SCALE_MODES:
            raise ValueError(f"scale mode {mode!r} is unknown; choose one of {SCALE_MODES}")
        if mode == "static" and "qflash_scales" not in self._buffers:
            raise ValueError(f"{type(self).__name__} has no static scales: run qflash_gen.calibrate first")
        self.scale_mode = mode

    def _check_inference(self, drop_p: float) -> None:
        if self.training and drop_p > 0:
            raise RuntimeError(
                "qflash-gen attention is inference-only and has no attention dropout: call model.eval() "
                "(or build the model with attn_drop=0)"
            )

    # -- the attention core --------------------------------------------------------------------
    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The attention op on q, k, v as the kernel sees them (already transformed), in the
        current scale mode.  ``bias``: a float additive bias (``quant.additive_bias``; -inf =
        masked), its batch axis 1, B, or a divisor of B (row z % Z), or None.  The result is laid
        out (B, N, H, D) in memory (``api.output_like``)."""
        compiling = torch.compiler.is_compiling()
        if self.scale_mode == "static":
            args = (q, k, v, self.qflash_table, bias, float(self.scale), self.config_arg, self.backend)
            return torch.ops.qflash_gen.attention_static(*args) if compiling else ops.attention_static_impl(*args)
        args = (q, k, v, None, bias, float(self.scale), self.config_arg, self.backend)
        return torch.ops.qflash_gen.attention(*args) if compiling else ops.attention_impl(*args)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        float_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention core on the original (B, H, N, D) q, k, v as this module runs it (its
        transforms, the op in the current scale mode, the output back in v's units): an
        approximation of ``softmax(scale * q k^T + bias) v``."""
        q, k, v = self.to_kernel(q, k, v)
        return self.from_kernel(self.core(q, k, v, quant.additive_bias(attn_mask, float_bias)))


def _refresh_after_load(module: QFlashModule, _incompatible_keys) -> None:
    module._refresh_folded()
