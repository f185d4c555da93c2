"""Drop qflash-gen attention into timm vision transformers: ViT/DeiT and Swin.

    report = qflash_gen.patch_model(model)                    # dynamic scales
    report = qflash_gen.patch_model(model, calibrate=batches) # + static scales and transforms
    print(report)                                             # what was replaced / left alone

Replaced (exact classes; a subclass with its own ``forward`` is left alone): ``timm.layers
.Attention`` (also the older ``timm.models.vision_transformer.Attention``) by
:class:`~qflash_gen.integrations.attention.QFlashAttention`, and Swin v1's ``WindowAttention`` by
:class:`~qflash_gen.integrations.attention.QFlashWindowAttention`.  Every other module whose class
name says attention is left alone, logged on ``qflash_gen.models`` and warned about once, and
listed in the report.  Scale modes and the exact transforms: :mod:`qflash_gen.integrations.base`.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from qflash_gen import checks
from qflash_gen.config import KernelConfig
from qflash_gen.integrations.attention import QFlashAttention, QFlashWindowAttention
from qflash_gen.integrations.base import QFlashModule
from qflash_gen.integrations.calibration import EQUALIZE_DEFAULT, SMOOTH_K_DEFAULT

logger = logging.getLogger("qflash_gen.models")


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
    if head_dim not in checks.SUPPORTED_HEAD_DIMS:
        return f"head_dim={head_dim} is not supported (supported: {checks.SUPPORTED_HEAD_DIMS})"
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
    ``calibrate``: None keeps dynamic scales (one per (batch, head), k smoothed); otherwise sample batches (an iterable of
    model inputs) or a callable that runs the model, passed to :func:`calibrate` with
    ``per_head``, ``smooth_k`` and ``equalize``.  Returns a :class:`PatchReport`; unknown attention modules are left alone,
    logged and warned about."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is not None and not isinstance(config, KernelConfig):
        raise ValueError(f"config must be a KernelConfig or None, got {type(config).__name__}")
    checks.check_backend(backend)
    vit_classes = _timm_vit_attention_classes()
    swin_classes = _timm_swin_attention_classes()
    if not vit_classes and not swin_classes:
        raise ImportError("patch_model needs timm (pip install timm): no timm attention class could be imported")
    report = PatchReport()
    targets: list[tuple[str, nn.Module, type]] = []
    for name, module in model.named_modules():
        if isinstance(module, QFlashModule) or any(name.startswith(t[0] + ".") for t in targets if t[0]):
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


def patched_modules(model: nn.Module) -> dict[str, QFlashModule]:
    """The qflash-gen attention modules of a patched model, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QFlashModule)}


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
        m.start_calibration()
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
            m.stop_calibration()
        model.train(was_training)
    for m in mods.values():
        m.finish_calibration(per_head, smooth_k=smooth_k, equalize=equalize)
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
