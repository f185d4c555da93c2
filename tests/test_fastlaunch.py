"""fastlaunch's specialization key: at least as fine as Triton's (pointer dtype and 16-byte
alignment, ints equal to 1 / divisible by 16 / 32-bit, constexpr values, launch options), so the
cached CompiledKernel of a key is the one Triton's own lookup would pick.  The launches themselves
are checked against the oracle in test_quant_kernels (compiled on the GPU)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from helpers import kernel_device

from qflash_gen import fastlaunch

pytestmark = pytest.mark.gpu


@triton.jit
def _copy(X, Y, n, scale, FLAG, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < n) * scale, mask=i < n)


def key(*args, **kwargs):
    return fastlaunch.bind(_copy, args, kwargs)[2]


def test_bind_orders_arguments_and_separates_options():
    x, y = torch.zeros(64), torch.zeros(64)
    full, options, _ = fastlaunch.bind(_copy, (x, y), {"BLOCK": 64, "n": 5, "scale": 2.0, "FLAG": True, "num_warps": 2})
    assert full[:2] == (x, y) and full[2:] == (5, 2.0, True, 64)
    assert options == {"num_warps": 2}


def test_key_separates_what_triton_specializes_on():
    x, y = torch.zeros(64), torch.zeros(64)
    base = key(x, y, 5, 2.0, True, BLOCK=64)
    assert key(torch.zeros(64), torch.zeros(64), 7, 3.0, False, BLOCK=64) == base  # values alone: same kernel
    different = [
        key(x.half(), y, 5, 2.0, True, BLOCK=64),  # dtype
        key(x[1:], y, 5, 2.0, True, BLOCK=64),  # 4-byte offset: not 16-byte aligned
        key(x, y, 1, 2.0, True, BLOCK=64),  # an int equal to 1
        key(x, y, 32, 2.0, True, BLOCK=64),  # divisible by 16
        key(x, y, 2**31 + 5, 2.0, True, BLOCK=64),  # 64-bit
        key(x, y, 5, 2.0, True, BLOCK=32),  # a constexpr's value
        key(x, y, 5, 2.0, True, BLOCK=64, num_warps=8),  # a launch option
    ]
    assert all(k != base for k in different)
    assert len(set(different)) == len(different)


def test_run_launches_the_kernel_on_each_calls_tensors():
    """Three calls with one specialization (on CUDA the second and third run the cached kernel;
    on CPU, the interpreter, Triton's launch) write each call's own result."""
    dev = kernel_device()
    for scale in (0.5, 2.0, -1.0):
        x = torch.arange(8, dtype=torch.float32, device=dev) * scale
        y = torch.zeros(8, device=dev)
        fastlaunch.run(_copy, (1,), x, y, 6, 0.5, True, BLOCK=8)
        want = torch.where(torch.arange(8, device=dev) < 6, x * 0.5, 0.0)
        assert torch.equal(y, want)
    assert fastlaunch.enabled(x.device) == (dev == "cuda" and fastlaunch.FAST_TRITON)
