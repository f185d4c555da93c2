"""Workload keys: the one place that decides which calls share a tuned config.

A key is what the tuning DB is indexed by.  ``N`` and ``D`` are kept exact: both are
``tl.constexpr`` in the kernel (each value compiles its own binary) and vision transformers use a
handful of them (N = 49, 197, 577, ...; D = 32, 64).  ``B*H`` only sets the grid's second axis,
so it is bucketed (see :func:`bh_bucket`).  The dtypes are the workload's, not the kernel's (the
kernel always reads int8): ``fp16-fp16`` is what ``qflash_gen.attention`` runs on half tensors,
``int8-int8`` an integer pipeline calling the kernel directly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Sequence

import torch

BH_BUCKET_MAX = 1 << 16
"""Largest B*H bucket.  Above it every config is far past saturating any GPU (65536 heads x at
least one program each is hundreds of waves on 132 SMs), so more buckets would add DB entries
without changing the best config."""

# The one dtype table: workload dtypes by the short names used in keys, the CLIs and the tables
# (a workload's kernel output has its dtype: fp16 in -> fp16 out, int8 in -> int8 out).
_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.int8: "int8",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
}
_NAME_ALIASES: dict[str, str] = {
    "int8": "int8",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
}
DTYPE_NAMES: tuple[str, ...] = ("int8", "fp16", "bf16", "fp32")
FLOAT_DTYPE_NAMES: tuple[str, ...] = ("fp16", "bf16", "fp32")
_DTYPES: dict[str, torch.dtype] = {v: k for k, v in _DTYPE_NAMES.items()}
DTYPES: tuple[torch.dtype, ...] = tuple(_DTYPES[n] for n in DTYPE_NAMES)
"""Every dtype a workload (and the kernel's output) may have, int8 first."""
FLOAT_DTYPES: tuple[torch.dtype, ...] = tuple(_DTYPES[n] for n in FLOAT_DTYPE_NAMES)
"""The float dtypes ``attention`` takes (and the float outputs of the kernel)."""

_KEY_RE = re.compile(
    r"^n(?P<n>[1-9]\d*)_d(?P<d>[1-9]\d*)_(?P<mask>mask|nomask)_bh(?P<bh>[1-9]\d*)"
    r"_(?P<inp>[a-z0-9]+)-(?P<out>[a-z0-9]+)$"
)


def dtype_name(dtype: torch.dtype | str, argument: str = "dtype") -> str:
    """``torch.float16`` / ``"float16"`` / ``"fp16"`` -> ``"fp16"``; ValueError naming ``argument``."""
    if isinstance(dtype, torch.dtype):
        name = _DTYPE_NAMES.get(dtype)
    elif isinstance(dtype, str):
        name = _NAME_ALIASES.get(dtype.lower().removeprefix("torch."))
    else:
        name = None
    if name is None:
        raise ValueError(f"{argument}={dtype!r} is not supported; supported: {list(DTYPE_NAMES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`."""
    return _DTYPES[dtype_name(name)]


def bh_bucket(bh: int) -> int:
    """The B*H bucket: the smallest power of two >= ``bh``, capped at ``BH_BUCKET_MAX``.

    Buckets: 1, 2, 4, 8, ..., 32768, 65536.  Bucket ``b`` holds every B*H in ``(b/2, b]``
    (e.g. ViT-B, 12 heads: batch 1 -> 16, batch 8 -> 128, batch 64 -> 1024), so a bucket's
    calls launch within a factor of two as many programs: the quantity that decides between
    tile shapes (enough programs to fill the SMs vs. fewer, larger tiles)."""
    if not isinstance(bh, int) or isinstance(bh, bool) or bh < 1:
        raise ValueError(f"B*H={bh!r} must be an int >= 1 (empty inputs return without a launch and need no key)")
    return min(1 << (bh - 1).bit_length(), BH_BUCKET_MAX)


def _is_bucket(bh: int) -> bool:
    return 1 <= bh <= BH_BUCKET_MAX and bh & (bh - 1) == 0


@dataclasses.dataclass(frozen=True)
class WorkloadKey:
    """DB key of a workload: exact N and D, masked or not, B*H bucket, workload in/out dtypes.

    ``masked`` covers any attention bias (bool mask, float mask or relative-position bias): they
    all switch on the kernel's HAS_BIAS branch.  Build keys with :func:`workload_key`; the
    constructor validates but does not bucket."""

    n: int
    d: int
    masked: bool
    bh_bucket: int
    in_dtype: str
    out_dtype: str

    def __post_init__(self) -> None:
        for name in ("n", "d", "bh_bucket"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"WorkloadKey.{name}={v!r} must be an int >= 1")
        if not isinstance(self.masked, bool):
            raise ValueError(f"WorkloadKey.masked={self.masked!r} must be a bool")
        if not _is_bucket(self.bh_bucket):
            raise ValueError(
                f"WorkloadKey.bh_bucket={self.bh_bucket} is not a bucket: powers of two 1..{BH_BUCKET_MAX}"
            )
        for name in ("in_dtype", "out_dtype"):
            v = getattr(self, name)
            if v not in DTYPE_NAMES:
                raise ValueError(f"WorkloadKey.{name}={v!r} is not one of {list(DTYPE_NAMES)}")

    def to_str(self) -> str:
        """Readable key used in YAML, e.g. ``n197_d64_nomask_bh64_fp16-fp16``."""
        mask = "mask" if self.masked else "nomask"
        return f"n{self.n}_d{self.d}_{mask}_bh{self.bh_bucket}_{self.in_dtype}-{self.out_dtype}"

    @classmethod
    def from_str(cls, text: str) -> WorkloadKey:
        """Parse :meth:`to_str` output; ValueError (with the expected form) on anything else."""
        m = _KEY_RE.match(text) if isinstance(text, str) else None
        if m is None:
            raise ValueError(
                f"workload key {text!r} is malformed; expected n<N>_d<D>_<mask|nomask>_bh<bucket>_<in>-<out>, "
                "e.g. n197_d64_nomask_bh64_fp16-fp16"
            )
        return cls(
            n=int(m["n"]),
            d=int(m["d"]),
            masked=m["mask"] == "mask",
            bh_bucket=int(m["bh"]),
            in_dtype=m["inp"],
            out_dtype=m["out"],
        )

    def __str__(self) -> str:
        return self.to_str()


def _as_bhnd(shape: tuple) -> tuple[int, int, int, int]:
    if len(shape) == 1 and isinstance(shape[0], Sequence):
        shape = tuple(shape[0])
    if len(shape) != 4 or not all(isinstance(x, int) and not isinstance(x, bool) for x in shape):
        raise ValueError(f"shape={shape!r}: expected (B, H, N, D) as one sequence or four ints, like SDPA's q.shape")
    b, h, n, d = shape
    if b < 0 or h < 0:
        raise ValueError(f"shape={shape!r}: B and H must be >= 0")
    if n < 1 or d < 1:
        raise ValueError(f"shape={shape!r}: N and D must be >= 1 (empty inputs need no key)")
    return b, h, n, d


def workload_key(
    *shape: int | Sequence[int],
    masked: bool = False,
    in_dtype: torch.dtype | str = torch.float16,
    out_dtype: torch.dtype | str | None = None,
) -> WorkloadKey:
    """Bucket a call into its DB key: ``workload_key(q.shape)`` or ``workload_key(B, H, N, D)``.

    N and D stay exact; B*H goes to :func:`bh_bucket` (powers of two 1..65536, ceiling).
    ``out_dtype=None`` means the workload's natural output: the input dtype for float inputs
    (what ``attention`` returns), int8 for int8 inputs (what ``attention_int8`` returns)."""
    b, h, n, d = _as_bhnd(shape)
    if not isinstance(masked, bool):
        raise ValueError(f"masked={masked!r} must be a bool")
    inp = dtype_name(in_dtype, "in_dtype")
    out = inp if out_dtype is None else dtype_name(out_dtype, "out_dtype")
    return WorkloadKey(n=n, d=d, masked=masked, bh_bucket=bh_bucket(b * h), in_dtype=inp, out_dtype=out)


def key_distance(a: WorkloadKey, b: WorkloadKey) -> float:
    """How far apart two keys are for "nearest bucket" lookup: ``|log2(a.bh) - log2(b.bh)|``.

    ``math.inf`` unless N, D, masked and both dtypes are equal: a config tuned for another N or D
    was never checked for overflow there, and other dtypes or masking change the kernel body."""
    if (a.n, a.d, a.masked, a.in_dtype, a.out_dtype) != (b.n, b.d, b.masked, b.in_dtype, b.out_dtype):
        return math.inf
    return float(abs(a.bh_bucket.bit_length() - b.bh_bucket.bit_length()))


def nearest_key(key: WorkloadKey, candidates: Iterable[WorkloadKey]) -> WorkloadKey | None:
    """The candidate nearest to ``key`` (finite :func:`key_distance`), or None.

    Ties (one bucket below and one above) go to the smaller bucket: a config tuned for fewer
    programs (smaller tiles, to fill the SMs) loses little when there are more, while one tuned
    for more programs can leave SMs idle when there are fewer.  A heuristic, not a measurement."""
    best: tuple[float, int] | None = None
    found = None
    for cand in candidates:
        dist = key_distance(key, cand)
        if math.isinf(dist):
            continue
        rank = (dist, cand.bh_bucket)
        if best is None or rank < best:
            best, found = rank, cand
    return found
