"""The timm attention modules qflash-gen replaces, re-built on :class:`.base.QFlashModule`.

* :class:`QFlashAttention` for ``timm.layers.Attention`` (ViT, DeiT, ...);
* :class:`QFlashWindowAttention` for Swin v1's ``WindowAttention``: its relative-position bias
  and the shifted-window mask (timm: (num_windows, N, N), 0 or -100, added to the logits) go to
  the kernel as one float additive bias (num_windows, H, N, N), built once and cached until the
  bias table or the mask changes.  timm orders the B_ = B * num_windows windows batch-major
  (window index fastest), so window z of the (B_, H, N, D) q, k, v reads bias row z % num_windows:
  no copy of q, k, v, and the scale groups stay per (window, head).

They take over the original's submodules (``qkv``, ``proj``, norms, the relative-position table),
so parameter names and ``state_dict`` keys are unchanged.  They are inference modules: in
training mode with attention dropout they raise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qflash_gen import quant
from qflash_gen.config import KernelConfig
from qflash_gen.integrations.base import QFlashModule


class QFlashAttention(QFlashModule):
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
        q, k, v = self.kernel_qkv(x)
        o = self.core(q, k, v, quant.additive_bias(attn_mask))  # laid out (B, N, H, D)
        o = self._unscale_out(o.transpose(1, 2).reshape(b, n, self.attn_dim))
        o = self.norm(o)
        if gate is not None:
            o = o * gate
        return self.proj_drop(self._proj_out(o))


class QFlashWindowAttention(QFlashModule):
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
        self._bias_cache: tuple | None = None  # (key, the float bias of window_bias)

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

    def window_bias(self, mask: torch.Tensor | None) -> torch.Tensor:
        """The float32 additive bias of the kernel call: the relative-position bias plus the shift
        mask, (num_windows, H, N, N) ((1, H, N, N) without a mask).  Cached: rebuilt when the bias
        table, the mask or their versions change (so inference pays nothing per call)."""
        table = self.relative_position_bias_table
        key = (table.data_ptr(), table._version, table.dtype, None if mask is None else (mask.data_ptr(), mask._version))
        cached = self._bias_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            bias = self.rel_pos_bias().to(torch.float32)
            if mask is not None:
                bias = bias + mask.to(torch.float32)[:, None]
            bias = bias.contiguous()
        self._bias_cache = (key, bias)
        return bias

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inference(self.attn_drop.p)
        b_, n, _ = x.shape
        nw = 1 if mask is None else mask.shape[0]
        if mask is not None and (mask.dim() != 3 or mask.shape[1:] != (n, n) or b_ % nw):
            raise ValueError(
                f"mask must be (num_windows, {n}, {n}) with num_windows dividing {b_}, got {tuple(mask.shape)}"
            )
        if self._observing:
            q, k, v = self.qkv_heads(x)  # (B_, H, N, D)
            self._observe(q, k, v)
            bias = self.window_bias(mask).to(q.dtype)  # (Z, H, N, N): window z % Z
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=quant.batch_bias(bias, b_), scale=self.scale)
            return self.proj_drop(self.proj(o.transpose(1, 2).reshape(b_, n, -1)))
        q, k, v = self.kernel_qkv(x)  # (B_, H, N, D) views of the projection, transformed
        o = self.core(q, k, v, self.window_bias(mask))  # laid out (B_, N, H, D)
        o = self._unscale_out(o.transpose(1, 2).reshape(b_, n, -1))
        return self.proj_drop(self._proj_out(o))
