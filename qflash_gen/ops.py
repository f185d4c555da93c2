"""Compatibility names: the ``torch.library`` custom ops live in :mod:`qflash_gen.integrations.ops`
(importing either registers ``torch.ops.qflash_gen.*``).  Nothing is defined here."""

from qflash_gen.integrations.ops import attention, attention_static, config_arg, static_table

__all__ = ["attention", "attention_static", "config_arg", "static_table"]
