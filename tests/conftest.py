"""Test setup: without a usable CUDA GPU, run kernels through Triton's CPU interpreter.

TRITON_INTERPRET must be set before any kernel module is imported (kernels are rendered and
imported lazily, so setting it here is early enough).  On a GPU machine the same tests run the
compiled kernels on CUDA tensors.  Markers: `gpu` marks kernel tests (they run everywhere; on
the device machine `pytest -m gpu` selects them), `cuda_only` marks tests that need CUDA itself
(graph capture, timing) and are skipped without it.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    """Where kernels run in this session: 'cuda' (compiled) or 'cpu' (interpreter)."""
    from helpers import kernel_device

    return kernel_device()


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
    # Rendered kernels go to a per-session temp cache, never the user's cache dir.
    monkeypatch.setenv("QFLASH_GEN_CACHE", str(tmp_path_factory.getbasetemp() / "kernel-cache"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA itself (graph capture / timing): run on the device machine")
    for item in items:
        if "cuda_only" in item.keywords:
            item.add_marker(skip)
