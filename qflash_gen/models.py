"""Compatibility names: timm patching now lives in :mod:`qflash_gen.integrations` (``timm``
for patching and calibration, ``attention`` and ``base`` for the modules).  Nothing is defined
here."""

from qflash_gen.integrations.attention import QFlashAttention, QFlashWindowAttention
from qflash_gen.integrations.base import SCALE_MODES, QFlashModule
from qflash_gen.integrations.calibration import EQUALIZE_DEFAULT, SMOOTH_K_DEFAULT
from qflash_gen.integrations.timm import (
    PatchReport,
    calibrate,
    patch_model,
    patched_modules,
    set_scale_mode,
    unpatch_model,
)

__all__ = [
    "EQUALIZE_DEFAULT",
    "SCALE_MODES",
    "SMOOTH_K_DEFAULT",
    "PatchReport",
    "QFlashAttention",
    "QFlashModule",
    "QFlashWindowAttention",
    "calibrate",
    "patch_model",
    "patched_modules",
    "set_scale_mode",
    "unpatch_model",
]
