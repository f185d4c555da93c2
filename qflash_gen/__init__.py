"""qflash-gen: templated, tuned, bit-exact integer FlashAttention for vision transformers.

Public surface::

    qflash_gen.attention(q, k, v, attn_mask=None, scale=None, *, config=None, backend="triton")
    qflash_gen.attention_int8(q8, k8, v8, (sq, sk, sv), ..., out_dtype=torch.int8)
    qflash_gen.get_kernel(shape, masked=..., gpu=...)  # DB lookup -> Kernel (.config .source .why)
    qflash_gen.KernelConfig, qflash_gen.DEFAULT_CONFIG, qflash_gen.check_workload
    qflash_gen.render(config)   # the Triton source for a config
    qflash_gen.patch_model(model), qflash_gen.calibrate(model, batches)   # timm models

The layers and the two main flows: docs/architecture.md; the design: docs/design.md.
"""

from qflash_gen.api import attention, attention_int8
from qflash_gen.codegen import render
from qflash_gen.config import DEFAULT_CONFIG, KernelConfig, check_workload
from qflash_gen.integrations import ops  # noqa: F401  (registers the torch.library ops)
from qflash_gen.integrations.timm import calibrate, patch_model
from qflash_gen.kernel import Kernel, get_kernel
from qflash_gen.version import __version__

__all__ = [
    "DEFAULT_CONFIG",
    "Kernel",
    "KernelConfig",
    "__version__",
    "attention",
    "attention_int8",
    "calibrate",
    "check_workload",
    "get_kernel",
    "patch_model",
    "render",
]
