"""GPU naming (qflash_gen.gpu): the table, the guards against a wrong known name, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qflash_gen.gpu import KNOWN_GPUS, check_gpu_name, current_gpu, is_valid_gpu_name, normalize_gpu_name

GIB = 2**30

# (device name as CUDA reports it, compute capability, total memory) -> short name.
TABLE = [
    ("NVIDIA H100 80GB HBM3", (9, 0), 80 * GIB, "h100"),
    ("NVIDIA H100 SXM5 80GB", (9, 0), None, "h100"),
    ("NVIDIA H100 PCIe", (9, 0), 80 * GIB, "h100_pcie"),
    ("NVIDIA H100 NVL", (9, 0), 94 * GIB, "h100_nvl"),
    ("NVIDIA H200", (9, 0), 141 * GIB, "h200"),
    ("NVIDIA H200 NVL", (9, 0), None, "h200_nvl"),
    ("NVIDIA GH200 480GB", (9, 0), None, "gh200"),
    ("NVIDIA H800", (9, 0), None, "h800"),
    ("NVIDIA H800 PCIe", (9, 0), None, "h800_pcie"),
    ("NVIDIA H20", (9, 0), None, "h20"),
    ("NVIDIA B200", (10, 0), None, "b200"),
    ("NVIDIA GB200", (10, 0), None, "gb200"),
    ("NVIDIA A100-SXM4-80GB", (8, 0), 80 * GIB, "a100"),
    ("NVIDIA A100-SXM4-40GB", (8, 0), 40 * GIB, "a100_40gb"),
    ("NVIDIA A100 80GB PCIe", (8, 0), None, "a100_pcie"),
    ("NVIDIA A100-PCIE-40GB", (8, 0), None, "a100_pcie_40gb"),
    ("NVIDIA A30", (8, 0), None, "a30"),
    ("NVIDIA A10", (8, 6), None, "a10"),
    ("NVIDIA A10G", (8, 6), None, "a10g"),
    ("NVIDIA A40", (8, 6), None, "a40"),
    ("NVIDIA RTX A6000", (8, 6), None, "rtx_a6000"),
    ("NVIDIA L4", (8, 9), None, "l4"),
    ("NVIDIA L40", (8, 9), None, "l40"),
    ("NVIDIA L40S", (8, 9), 48 * GIB, "l40s"),
    ("NVIDIA RTX 6000 Ada Generation", (8, 9), None, "rtx6000_ada"),
    ("NVIDIA GeForce RTX 3090", (8, 6), None, "rtx3090"),
    ("NVIDIA GeForce RTX 4090", (8, 9), 24 * GIB, "rtx4090"),
    ("NVIDIA GeForce RTX 5090", (12, 0), 32 * GIB, "rtx5090"),
    ("Tesla T4", (7, 5), None, "t4"),
    ("Tesla V100-SXM2-16GB", (7, 0), None, "v100"),
    # rule-derived names (not in KNOWN_GPUS, but stated by the device name)
    ("NVIDIA GeForce RTX 4070 Ti SUPER", (8, 9), None, "rtx4070_ti_super"),
    ("NVIDIA GeForce RTX 4090 D", (8, 9), None, "rtx4090d"),
    ("NVIDIA GeForce RTX 4090 Laptop GPU", (8, 9), None, "rtx4090_laptop"),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", (9, 0), 10 * GIB, "h100_mig_1g_10gb"),
    # unknown cards: sanitized, never a known name
    ("AMD Instinct MI300X", (9, 4), None, "amd_instinct_mi300x"),
    ("NVIDIA H100", (9, 0), None, "h100_sm90"),  # form factor not stated: not guessed
    ("NVIDIA H100", None, None, "h100_unverified"),
]


@pytest.mark.parametrize(("device_name", "cc", "mem", "expected"), TABLE)
def test_naming_table(device_name, cc, mem, expected):
    assert normalize_gpu_name(device_name, cc, mem) == expected


def test_table_covers_every_known_gpu():
    produced = {row[3] for row in TABLE}
    assert set(KNOWN_GPUS) <= produced, sorted(set(KNOWN_GPUS) - produced)


def test_known_specs_are_consistent():
    for name, spec in KNOWN_GPUS.items():
        assert spec.name == name and is_valid_gpu_name(name)
        assert isinstance(spec.cc, tuple) and len(spec.cc) == 2


def test_cc_is_optional_for_a_stated_name():
    assert normalize_gpu_name("NVIDIA H100 PCIe") == "h100_pcie"
    assert normalize_gpu_name("  nvidia   h200  ") == "h200"


@pytest.mark.parametrize("device_name", ["NVIDIA H100 80GB HBM3", "NVIDIA L40S", "NVIDIA GeForce RTX 4090"])
def test_wrong_compute_capability_never_gives_the_known_name(device_name):
    right = normalize_gpu_name(device_name)
    wrong = normalize_gpu_name(device_name, (7, 0))
    assert right in KNOWN_GPUS
    assert wrong != right and wrong not in KNOWN_GPUS and is_valid_gpu_name(wrong)


def test_a100_memory_decides_only_when_the_name_is_silent():
    assert normalize_gpu_name("NVIDIA A100-SXM4", (8, 0), 79 * GIB) == "a100"
    assert normalize_gpu_name("NVIDIA A100-SXM4", (8, 0), 39 * GIB) == "a100_40gb"
    unsure = normalize_gpu_name("NVIDIA A100-SXM4", (8, 0))
    assert unsure not in KNOWN_GPUS
    # the name wins over memory (a MIG slice or a reserved carve-out must not flip it)
    assert normalize_gpu_name("NVIDIA A100-SXM4-80GB", (8, 0), 20 * GIB) == "a100"


def test_mig_slice_and_laptop_are_not_the_full_card():
    full = normalize_gpu_name("NVIDIA A100-SXM4-40GB", (8, 0))
    mig = normalize_gpu_name("NVIDIA A100-SXM4-40GB MIG 3g.20gb", (8, 0), 20 * GIB)
    assert mig.startswith(full) and mig != full and mig not in KNOWN_GPUS
    assert normalize_gpu_name("NVIDIA GeForce RTX 4090 Laptop GPU") != "rtx4090"


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40).filter(lambda s: s.strip()))
def test_any_name_is_stable_and_file_safe_and_unknown_cc_is_never_known(device_name):
    a = normalize_gpu_name(device_name, (1, 0))
    assert a == normalize_gpu_name(device_name, (1, 0))
    assert is_valid_gpu_name(a)
    assert a not in KNOWN_GPUS  # no known card has compute capability 1.0


@pytest.mark.parametrize(
    ("args", "argument"),
    [
        (("",), "device_name"),
        ((None,), "device_name"),
        (("NVIDIA H100 PCIe", (9,)), "cc"),
        (("NVIDIA H100 PCIe", "9.0"), "cc"),
        (("NVIDIA H100 PCIe", (9, 0), -1), "total_mem_bytes"),
        (("NVIDIA H100 PCIe", (9, 0), 1.5), "total_mem_bytes"),
    ],
)
def test_bad_arguments_name_the_argument(args, argument):
    with pytest.raises(ValueError, match=argument):
        normalize_gpu_name(*args)


def test_check_gpu_name_lists_known_ones():
    assert check_gpu_name("h100") == "h100"
    assert check_gpu_name("my_card", also=("my_card",)) == "my_card"
    with pytest.raises(ValueError, match=r"gpu='h1000' is not a known GPU.*'h100'.*'rtx4090'"):
        check_gpu_name("h1000")
    with pytest.raises(ValueError, match=r"normalize_gpu_name\('NVIDIA H100 PCIe'\) = 'h100_pcie'"):
        check_gpu_name("NVIDIA H100 PCIe")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_current_gpu_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        current_gpu()


@pytest.mark.cuda_only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_current_gpu_on_a_gpu():
    props = torch.cuda.get_device_properties(0)
    name = current_gpu(0)
    assert name == normalize_gpu_name(props.name, (props.major, props.minor), props.total_memory)
    assert current_gpu("cuda:0") == name == current_gpu(torch.device("cuda", 0))
    with pytest.raises(ValueError, match="device"):
        current_gpu("cpu")
