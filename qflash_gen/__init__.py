"""qflash-gen: templated, tuned, bit-exact integer FlashAttention for vision transformers.

Public surface::

    qflash_gen.attention(q, k, v, attn_mask=None, scale=None, *, config=None, backend="triton")
    qflash_gen.attention_int8(q8, k8, v8, (sq, sk, sv), ..., out_dtype=torch.int8)
    qflash_gen.get_kernel(shape, masked=..., gpu=...)  # DB lookup -> Kernel (.config .source .why)
    qflash_gen.KernelConfig, qflash_gen.DEFAULT_CONFIG
    qflash_gen.render(config)   # the Triton source for a config
"""

__version__ = "0.1.0"

from qflash_gen import ops  # noqa: E402, F401  (registers the torch.library ops)
from qflash_gen.codegen import render  # noqa: E402
from qflash_gen.config import DEFAULT_CONFIG, KernelConfig, check_workload  # noqa: E402
from qflash_gen.kernel import Kernel, get_kernel  # noqa: E402
from qflash_gen.models import calibrate, patch_model  # noqa: E402
from qflash_gen.runtime import attention, attention_int8  # noqa: E402

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
