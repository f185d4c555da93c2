"""GPU naming, in one place: device name (+ compute capability, memory) -> a short stable name.

The short name picks the tuning DB file (``tuning_db/<gpu>.yaml``), so a wrong name is worse than
an unknown one: a config tuned on an H100 SXM is not the best on an H100 PCIe (114 SMs instead of
132, lower clocks and bandwidth).  The rules below therefore only map names that say which card
they are, and check the compute capability when it is given.  Anything else gets a *sanitized*
name (lower case, ``[a-z0-9_]``) that is stable for the same device name and never equal to a
known one.

Known cards (``KNOWN_GPUS``), with the device names they report through CUDA:

================  ==========================================  =====  ==================
short name        device name(s)                              cc     note
================  ==========================================  =====  ==================
h100              NVIDIA H100 80GB HBM3, NVIDIA H100 SXM5 ...  9.0    SXM5, 132 SMs
h100_pcie         NVIDIA H100 PCIe                            9.0    114 SMs
h100_nvl          NVIDIA H100 NVL                             9.0    94 GB HBM3
h200              NVIDIA H200                                 9.0    SXM, 141 GB HBM3e
h200_nvl          NVIDIA H200 NVL                             9.0
gh200             NVIDIA GH200 480GB, NVIDIA GH200 144G HBM3e 9.0    Grace Hopper
h800              NVIDIA H800                                 9.0
h800_pcie         NVIDIA H800 PCIe                            9.0
h20               NVIDIA H20                                  9.0
b200              NVIDIA B200                                 10.0
gb200             NVIDIA GB200                                10.0
a100              NVIDIA A100-SXM4-80GB                       8.0
a100_40gb         NVIDIA A100-SXM4-40GB                       8.0
a100_pcie         NVIDIA A100 80GB PCIe                       8.0
a100_pcie_40gb    NVIDIA A100-PCIE-40GB                       8.0
a30               NVIDIA A30                                  8.0
a10               NVIDIA A10                                  8.6
a10g              NVIDIA A10G                                 8.6    AWS
a40               NVIDIA A40                                  8.6
rtx_a6000         NVIDIA RTX A6000                            8.6
l4                NVIDIA L4                                   8.9
l40               NVIDIA L40                                  8.9
l40s              NVIDIA L40S                                 8.9
rtx6000_ada       NVIDIA RTX 6000 Ada Generation              8.9
rtx3090           NVIDIA GeForce RTX 3090                     8.6
rtx4090           NVIDIA GeForce RTX 4090                     8.9
rtx5090           NVIDIA GeForce RTX 5090                     12.0
t4                Tesla T4, NVIDIA T4                         7.5
v100              Tesla V100-SXM2-16GB, -32GB, Tesla V100 ... 7.0
================  ==========================================  =====  ==================

Beyond the table: any other ``GeForce RTX NNNN [Ti] [SUPER] [D]`` maps to ``rtxNNNN[_ti][_super][d]``
(a rule, not a guess: the name says the model); laptop parts get ``_laptop`` (an "RTX 4090 Laptop
GPU" is a different chip); MIG slices get ``_mig_<profile>`` after the card's name (a 1g.10gb
slice has 1/7 of the SMs, so it must never share the full card's DB).  A100s whose name lacks the
memory size are split by ``total_mem_bytes`` (>= 60 GiB: 80 GB part).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import torch


@dataclasses.dataclass(frozen=True)
class Peaks:
    """Datasheet peaks of one card (dense rates, no sparsity), for the roofline fractions."""

    hbm_bytes_per_s: float
    int8_ops_per_s: float
    sms: int
    int32_lanes_per_sm: int


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """One known card: what its short name stands for, the compute capability it must report,
    the per-block shared memory it allows (opt-in maximum, bytes: the search space skips configs
    that cannot fit) and, where known, its datasheet peaks (the benchmark's roofline)."""

    name: str
    description: str
    cc: tuple[int, int]
    smem_per_block: int | None = None
    peaks: Peaks | None = None


_HOPPER_SMEM = 232448
_AMPERE_DC_SMEM = 166912  # A100, A30
_CONSUMER_SMEM = 101376  # sm_86 / sm_89 / sm_120 cards


def _spec(
    name: str, description: str, cc: tuple[int, int], smem: int | None = None, peaks: Peaks | None = None
) -> tuple[str, GpuSpec]:
    return name, GpuSpec(name, description, cc, smem, peaks)


# The one table of per-GPU facts: naming (below), the tuner's shared-memory limit
# (qflash_gen.tune.space) and the roofline's peaks (qflash_gen.roofline) all read it.
KNOWN_GPUS: dict[str, GpuSpec] = dict(
    [
        _spec("h100", "H100 SXM5 80 GB (NVIDIA H100 80GB HBM3)", (9, 0), _HOPPER_SMEM, Peaks(3.35e12, 1979e12, 132, 64)),
        _spec("h100_pcie", "H100 PCIe 80 GB", (9, 0), _HOPPER_SMEM),
        _spec("h100_nvl", "H100 NVL 94 GB", (9, 0), _HOPPER_SMEM),
        _spec("h200", "H200 SXM 141 GB", (9, 0), _HOPPER_SMEM, Peaks(4.8e12, 1979e12, 132, 64)),
        _spec("h200_nvl", "H200 NVL 141 GB", (9, 0), _HOPPER_SMEM),
        _spec("gh200", "GH200 Grace Hopper superchip", (9, 0), _HOPPER_SMEM),
        _spec("h800", "H800 SXM", (9, 0), _HOPPER_SMEM),
        _spec("h800_pcie", "H800 PCIe", (9, 0), _HOPPER_SMEM),
        _spec("h20", "H20", (9, 0), _HOPPER_SMEM),
        _spec("b200", "B200", (10, 0), _HOPPER_SMEM),
        _spec("gb200", "GB200 Grace Blackwell", (10, 0), _HOPPER_SMEM),
        _spec("a100", "A100 SXM4 80 GB", (8, 0), _AMPERE_DC_SMEM),
        _spec("a100_40gb", "A100 SXM4 40 GB", (8, 0), _AMPERE_DC_SMEM),
        _spec("a100_pcie", "A100 PCIe 80 GB", (8, 0), _AMPERE_DC_SMEM),
        _spec("a100_pcie_40gb", "A100 PCIe 40 GB", (8, 0), _AMPERE_DC_SMEM),
        _spec("a30", "A30", (8, 0), _AMPERE_DC_SMEM),
        _spec("a10", "A10", (8, 6), _CONSUMER_SMEM),
        _spec("a10g", "A10G (AWS)", (8, 6), _CONSUMER_SMEM),
        _spec("a40", "A40", (8, 6), _CONSUMER_SMEM),
        _spec("rtx_a6000", "RTX A6000", (8, 6), _CONSUMER_SMEM),
        _spec("l4", "L4", (8, 9), _CONSUMER_SMEM),
        _spec("l40", "L40", (8, 9), _CONSUMER_SMEM),
        _spec("l40s", "L40S", (8, 9), _CONSUMER_SMEM),
        _spec("rtx6000_ada", "RTX 6000 Ada Generation", (8, 9), _CONSUMER_SMEM),
        _spec("rtx3090", "GeForce RTX 3090", (8, 6), _CONSUMER_SMEM),
        _spec("rtx4090", "GeForce RTX 4090", (8, 9), _CONSUMER_SMEM),
        _spec("rtx5090", "GeForce RTX 5090", (12, 0), _CONSUMER_SMEM),
        _spec("t4", "T4", (7, 5), 65536),
        _spec("v100", "V100", (7, 0), 98304),
    ]
)


def smem_limit(gpu: str) -> int | None:
    """Per-block shared memory of a known GPU (bytes), None for any other name (no limit: the
    compile decides)."""
    spec = KNOWN_GPUS.get(gpu)
    return None if spec is None else spec.smem_per_block


def peaks(gpu: str) -> Peaks | None:
    """Datasheet peaks of a known GPU, None where the table has none."""
    spec = KNOWN_GPUS.get(gpu)
    return None if spec is None else spec.peaks


def arch_of(gpu: str | None) -> int | None:
    """Compute capability a short name implies, as one number (``h100`` -> 90), or None."""
    spec = KNOWN_GPUS.get(gpu) if gpu else None
    return None if spec is None else spec.cc[0] * 10 + spec.cc[1]


# GeForce RTX generation (first digit pair of the model number) -> compute capability.
_RTX_SERIES_CC = {"20": (7, 5), "30": (8, 6), "40": (8, 9), "50": (12, 0)}

_A100_80GB_THRESHOLD = 60 * 2**30  # between the 40 GB and 80 GB parts, whatever CUDA reserves

# (pattern on the normalized device name, short name or None = decide in code).  First match wins,
# so longer / more specific names come first (gh200 before h200, h100 nvl before h100).
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), n)
    for p, n in (
        (r"\bgh200\b", "gh200"),
        (r"\bgb200\b", "gb200"),
        (r"\bh200 nvl\b", "h200_nvl"),
        (r"^h200\b", "h200"),
        (r"^h100 nvl\b", "h100_nvl"),
        (r"^h100 pcie\b", "h100_pcie"),
        (r"^h100 (80gb hbm3|sxm5?\b)", "h100"),
        (r"^h800 pcie\b", "h800_pcie"),
        (r"^h800$", "h800"),
        (r"^h20$", "h20"),
        (r"^b200\b", "b200"),
        (r"^a100\b", "a100*"),
        (r"^a30$", "a30"),
        (r"^a10g$", "a10g"),
        (r"^a10$", "a10"),
        (r"^a40$", "a40"),
        (r"^rtx a6000$", "rtx_a6000"),
        (r"^rtx 6000 ada generation$", "rtx6000_ada"),
        (r"^l40s$", "l40s"),
        (r"^l40$", "l40"),
        (r"^l4$", "l4"),
        (r"^t4$", "t4"),
        (r"^v100\b", "v100"),
    )
)
_GEFORCE = re.compile(r"^geforce rtx (\d{4})((?: ti| super| d)*)$")
_MIG = re.compile(r"\s+mig\s+(.+)$")


def _normalize_text(device_name: str) -> str:
    """Lower case, single spaces, vendor prefixes ("NVIDIA", "Tesla") dropped."""
    s = " ".join(device_name.lower().split())
    for prefix in ("nvidia ", "tesla "):
        if s.startswith(prefix):
            s = s[len(prefix) :]
    return s


def sanitize(device_name: str) -> str:
    """A file-name-safe stable form of any device name: ``[a-z0-9_]``, vendor prefix dropped."""
    return re.sub(r"[^a-z0-9]+", "_", _normalize_text(device_name)).strip("_") or "unnamed"


def _check_args(device_name: object, cc: object, total_mem_bytes: object) -> None:
    if not isinstance(device_name, str) or not device_name.strip():
        raise ValueError(f"device_name must be a non-empty str, got {device_name!r}")
    if cc is not None and not (
        isinstance(cc, tuple) and len(cc) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in cc)
    ):
        raise ValueError(f"cc must be a (major, minor) tuple of ints or None, got {cc!r}")
    if total_mem_bytes is not None and (
        not isinstance(total_mem_bytes, int) or isinstance(total_mem_bytes, bool) or total_mem_bytes < 0
    ):
        raise ValueError(f"total_mem_bytes must be a non-negative int or None, got {total_mem_bytes!r}")


def _match(text: str, total_mem_bytes: int | None) -> str | None:
    """The known (or rule-derived GeForce) short name that ``text`` states, else None."""
    for pattern, name in _RULES:
        if not pattern.search(text):
            continue
        if name != "a100*":
            return name
        # A100 names usually carry form factor and memory: "a100-sxm4-80gb", "a100 80gb pcie".
        pcie = "pcie" in text
        if "80gb" in text:
            big = True
        elif "40gb" in text:
            big = False
        elif total_mem_bytes is not None:
            big = total_mem_bytes >= _A100_80GB_THRESHOLD
        else:
            return None  # form factor known, memory not: do not guess
        return ("a100_pcie" if pcie else "a100") + ("" if big else "_40gb")
    m = _GEFORCE.match(text)
    if m:
        model, suffix = m.group(1), m.group(2).split()
        name = f"rtx{model}"
        for word in suffix:
            name += "d" if word == "d" else f"_{word}"
        return name
    return None


def _is_reserved(name: str) -> bool:
    """True for names a rule hands out: an unknown card must not end up with one."""
    return name in KNOWN_GPUS or re.match(r"^rtx\d{4}", name) is not None


def _expected_cc(name: str) -> tuple[int, int] | None:
    if name in KNOWN_GPUS:
        return KNOWN_GPUS[name].cc
    m = re.match(r"rtx(\d\d)\d\d", name)
    return _RTX_SERIES_CC.get(m.group(1)) if m else None


def normalize_gpu_name(
    device_name: str,
    cc: tuple[int, int] | None = None,
    total_mem_bytes: int | None = None,
) -> str:
    """Short stable name of a GPU, e.g. ``"NVIDIA H100 80GB HBM3" -> "h100"`` (table in the module doc).

    ``cc`` (compute capability) guards against a wrong known name: a name whose rule expects
    another cc falls back to the sanitized form with ``_sm<cc>`` appended.  ``total_mem_bytes``
    is only used where the name leaves the memory size open (A100).  Unknown cards get
    :func:`sanitize` of their name, suffixed so that it never equals a known short name.
    """
    _check_args(device_name, cc, total_mem_bytes)
    text = _normalize_text(device_name)
    laptop = bool(re.search(r"\b(laptop|mobile)\b", text))
    text = re.sub(r"\s*\b(laptop gpu|laptop|mobile)\b", "", text).strip()
    mig = _MIG.search(text)
    if mig:
        text = text[: mig.start()]
        total_mem_bytes = None  # a slice's memory says nothing about the card's
    name = _match(text, total_mem_bytes)
    expected = _expected_cc(name) if name else None
    if name is None or (cc is not None and expected is not None and cc != expected):
        name = sanitize(device_name if not mig else text)
        if _is_reserved(name):
            name += f"_sm{cc[0]}{cc[1]}" if cc is not None else "_unverified"
        if mig:
            name += "_mig_" + re.sub(r"[^a-z0-9]+", "_", mig.group(1)).strip("_")
        return name
    if laptop:
        name += "_laptop"
    if mig:
        name += "_mig_" + re.sub(r"[^a-z0-9]+", "_", mig.group(1)).strip("_")
    return name


_GPU_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")


def is_valid_gpu_name(name: object) -> bool:
    """True for names of the form this module produces (``[a-z0-9_]``, usable as a file name)."""
    return isinstance(name, str) and bool(_GPU_NAME_RE.match(name))


def check_gpu_name(name: object, *, also: tuple[str, ...] = (), argument: str = "gpu") -> str:
    """Return ``name`` if it is a known GPU (or in ``also``), else a ValueError listing the known ones.

    Used where a name must be known: ``get_kernel(gpu=...)``, ``qflash-tune --gpu``.  ``also`` lets
    a caller accept extra names (e.g. GPUs that have a DB file)."""
    if isinstance(name, str) and (name in KNOWN_GPUS or name in also):
        return name
    extra = f"; with a tuning DB: {sorted(set(also) - set(KNOWN_GPUS))}" if set(also) - set(KNOWN_GPUS) else ""
    hint = ""
    if isinstance(name, str) and name.strip() and not is_valid_gpu_name(name):
        hint = f" (a device name? normalize_gpu_name({name!r}) = {normalize_gpu_name(name)!r})"
    raise ValueError(f"{argument}={name!r} is not a known GPU{hint}; known: {sorted(KNOWN_GPUS)}{extra}")


@functools.lru_cache(maxsize=64)
def _gpu_of_index(index: int) -> str:
    props = torch.cuda.get_device_properties(index)
    return normalize_gpu_name(props.name, (props.major, props.minor), int(props.total_memory))


def current_gpu(device: torch.device | str | int | None = None) -> str:
    """Short name of a CUDA device (default: the current one); cached per device index.

    Raises RuntimeError when CUDA is not available: on a CPU machine, name the GPU instead
    (``get_kernel(shape, gpu="h100")``)."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "current_gpu() needs a CUDA device, and torch.cuda.is_available() is False; "
            f"on a machine without one, name the GPU instead (one of {sorted(KNOWN_GPUS)})"
        )
    if device is None:
        index = torch.cuda.current_device()
    elif isinstance(device, int) and not isinstance(device, bool):
        index = device
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device={device!r} is not a CUDA device: {exc}") from None
        if dev.type != "cuda":
            raise ValueError(f"device={device!r} is not a CUDA device")
        index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(f"device={device!r}: CUDA device {index} does not exist ({torch.cuda.device_count()} present)")
    return _gpu_of_index(index)
