"""Compatibility names for code written against the module this used to be: the public call path
now lives in :mod:`qflash_gen.api`, the input checks in :mod:`qflash_gen.checks` and the launch
paths in :mod:`qflash_gen.launch`.  Nothing is defined here."""

from qflash_gen.api import attention, attention_int8, resolve_config
from qflash_gen.checks import BACKENDS, FLOAT_DTYPES, OUT_DTYPES, SUPPORTED_HEAD_DIMS, interpreter_active
from qflash_gen.config import default_config
from qflash_gen.launch import launch, launch_fast, launch_module, launch_static, v_keys

__all__ = [
    "BACKENDS",
    "FLOAT_DTYPES",
    "OUT_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "attention",
    "attention_int8",
    "default_config",
    "interpreter_active",
    "launch",
    "launch_fast",
    "launch_module",
    "launch_static",
    "resolve_config",
    "v_keys",
]
