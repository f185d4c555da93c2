"""The tuner's only contact with the GPU naming, the workload keys and the YAML DB.

Kept in one small module so that a change of those APIs (``qflash_gen.gpu``, ``qflash_gen.keys``,
``qflash_gen.db``) changes one file of the tuner.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from qflash_gen import db, gpu, keys
from qflash_gen.config import KernelConfig
from qflash_gen.tune.measure import ShapeSpec

# Workload dtype (what the user's tensors are) → (key in_dtype, key out_dtype, kernel out dtype).
DTYPES: dict[str, tuple[str, str, str]] = {
    "fp16": ("fp16", "fp16", "fp16"),
    "bf16": ("bf16", "bf16", "bf16"),
    "fp32": ("fp32", "fp32", "fp32"),
    "int8": ("int8", "int8", "int8"),
}


def known_gpus() -> list[str]:
    return sorted(gpu.KNOWN_GPUS)


def check_gpu_name(name: str) -> str:
    """``--gpu`` must be a known short name (ValueError listing them)."""
    return gpu.check_gpu_name(name, argument="--gpu")


def present_gpu() -> tuple[str | None, str]:
    """``(short name, description)`` of the CUDA device present, or ``(None, why not)``."""
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA GPU is present (torch.cuda.is_available() is False)"
    name = gpu.current_gpu()
    return name, f"{name} ({torch.cuda.get_device_name()})"


def device_models(indices: Sequence[int]) -> list[tuple[int, str, str]]:
    """``(index, short name, device name)`` of the CUDA devices ``indices`` (``--devices``);
    ValueError naming ``--devices`` when there is no GPU or an index does not exist."""
    import torch

    shown = ",".join(map(str, indices))
    if not torch.cuda.is_available():
        raise ValueError(
            f"--devices {shown}: no CUDA GPU is present (torch.cuda.is_available() is False); "
            "without a GPU, replay a recorded table: --simulate FILE --devices 0,1"
        )
    count = torch.cuda.device_count()
    out = []
    for i in indices:
        if not 0 <= i < count:
            raise ValueError(f"--devices {shown}: CUDA device {i} does not exist ({count} visible: 0..{count - 1})")
        props = torch.cuda.get_device_properties(i)
        short = gpu.normalize_gpu_name(props.name, (props.major, props.minor), int(props.total_memory))
        out.append((i, short, props.name))
    return out


def key_for(shape: ShapeSpec, dtype: str) -> keys.WorkloadKey:
    in_dtype, out_dtype, _ = DTYPES[dtype]
    return keys.workload_key(
        shape.b, shape.h, shape.n, shape.d, masked=shape.masked, in_dtype=in_dtype, out_dtype=out_dtype
    )


def kernel_out_dtype(dtype: str) -> str:
    return DTYPES[dtype][2]


def dtype_for_kernel_out(out_dtype: str) -> str:
    """The workload dtype whose kernel output is ``out_dtype`` (to key a recorded table)."""
    for name, (_, _, out) in DTYPES.items():
        if out == out_dtype:
            return name
    raise ValueError(f"no workload dtype has kernel output {out_dtype!r}")


def db_file(target: str | os.PathLike[str] | None, gpu_name: str) -> Path:
    """``--db``: a ``<gpu>.yaml`` file, or a directory holding it (default: the user DB dir)."""
    if target is None:
        return db.user_db_dir() / f"{gpu_name}.yaml"
    path = Path(target).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if path.stem != gpu_name:
            raise ValueError(f"--db {path}: a DB for gpu {gpu_name!r} must be named {gpu_name}.yaml")
        return path
    return path / f"{gpu_name}.yaml"


def db_best(
    target: str | os.PathLike[str] | None, gpu_name: str, key: keys.WorkloadKey, *, shipped: bool = True
) -> KernelConfig | None:
    """The config the DB holds for ``key`` on ``gpu_name`` (shipped DB overlaid by ``--db``; without
    ``shipped``, ``--db`` alone), or None.

    What the tuner enqueues first: the incumbent is measured again under this run's protocol."""
    path = db_file(target, gpu_name)
    dirs = [db.shipped_db_dir(), path.parent] if shipped else [path.parent]
    entry = db.TuningDB(dirs).lookup(gpu_name, key)  # a corrupt file: DBError
    return None if entry is None else entry.config


def _raw_entries(
    target: str | os.PathLike[str] | None, gpu_name: str, shipped: bool
) -> Iterator[tuple[str, KernelConfig]]:
    """(key string, config) of every entry in the shipped DB (unless not ``shipped``) and ``--db``,
    read raw: stale entries included, unreadable files and entries skipped (the normal DB read
    reports them; a seed is only a hint)."""
    paths = [db.shipped_db_dir() / f"{gpu_name}.yaml"] if shipped else []
    for path in (*paths, db_file(target, gpu_name)):
        if not path.is_file():
            continue
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        for entry in raw.get("entries") or []:
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
                continue
            try:
                yield entry["key"], KernelConfig.from_dict(dict(entry.get("config") or {}))
            except (TypeError, ValueError):
                continue


def db_seeds(
    target: str | os.PathLike[str] | None, gpu_name: str, key: keys.WorkloadKey, *, shipped: bool = True
) -> list[KernelConfig]:
    """Configs that stale entries for ``key`` hold (shipped DB unless not ``shipped``, and
    ``--db``; other template, Triton or P width): a warm start for a new study, which measures
    them again like any trial."""
    return [config for k, config in _raw_entries(target, gpu_name, shipped) if k == str(key)]


def db_neighbors(
    target: str | os.PathLike[str] | None, gpu_name: str, key: keys.WorkloadKey, *, shipped: bool = True
) -> list[KernelConfig]:
    """Configs of entries for the same N, D, masking and dtypes at other B*H buckets (nearest
    bucket first; shipped DB unless not ``shipped``, and ``--db``): a warm start across batch
    sizes, which a new study measures again like any trial."""
    found: list[tuple[float, KernelConfig]] = []
    for k, config in _raw_entries(target, gpu_name, shipped):
        try:
            dist = keys.key_distance(key, keys.WorkloadKey.from_str(k))
        except ValueError:
            continue
        if 0 < dist < float("inf"):
            found.append((dist, config))
    return [c for _, c in sorted(found, key=lambda t: t[0])]


def _software(environment: Mapping[str, Any], space_hash: str) -> dict[str, str | None]:
    """Entry software fingerprint: the measuring machine's (a recorded table's environment, or this
    process when it measured live)."""
    if not environment or environment.get("triton") is None:
        return db.running_software(space_hash)
    return {
        "triton": environment.get("triton"),
        "torch": environment.get("torch"),
        "cuda": environment.get("cuda"),
        "template_hash": environment.get("template_sha256"),
        "search_space_hash": space_hash,
        "qflash_gen": environment.get("qflash_gen"),
    }


def _plain(value: Any) -> Any:
    """YAML-safe copy (str keys, plain scalars, lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@dataclasses.dataclass(frozen=True)
class BestResult:
    """What goes into one DB entry (filled by the CLI from a study's pick)."""

    shape: ShapeSpec
    dtype: str
    config: KernelConfig
    latency_us: float
    spread_us: float
    sqnr_db: float
    trials: int
    protocol: Mapping[str, Any]
    environment: Mapping[str, Any]
    space_hash: str
    measured_on_device: str | None = None  # default: the environment's device name
    energy_uj: float | None = None  # µJ per call where the measurer recorded energy (Entry.energy_uj)


def write_best(target: str | os.PathLike[str] | None, gpu_name: str, results: Sequence[BestResult]) -> db.WriteReport:
    """Merge the picks into ``<db>/<gpu>.yaml`` (atomic, locked; a worse result never replaces a
    better one).  Each entry's protocol carries the provenance (measured or simulated from which
    table), the tuner settings and the workload."""
    path = db_file(target, gpu_name)
    entries = []
    for r in results:
        device = r.measured_on_device or (r.environment.get("device") if r.environment else None)
        entries.append(
            db.Entry(
                key=key_for(r.shape, r.dtype),
                config=r.config,
                latency_us=float(r.latency_us),
                latency_spread_us=float(r.spread_us),
                sqnr_db=float(r.sqnr_db),
                trials=int(r.trials),
                protocol=_plain(r.protocol),
                measured_on_device=str(device) if device else None,
                energy_uj=None if r.energy_uj is None else float(r.energy_uj),
                software=_software(r.environment, r.space_hash),
            )
        )
    return db.write_entries(path, entries, gpu=gpu_name)


def write_front(
    target: str | os.PathLike[str] | None, gpu_name: str, shape: ShapeSpec, dtype: str, front: list[dict[str, Any]]
) -> Path:
    """Store a Pareto front next to the DB: ``<db dir>/fronts/<gpu>/<key>.yaml`` (atomic)."""
    key = key_for(shape, dtype).to_str()
    path = db_file(target, gpu_name).parent / "fronts" / gpu_name / f"{key}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(
        {"gpu": gpu_name, "key": key, "workload": shape.workload, "batch": shape.batch, "front": _plain(front)},
        sort_keys=False,
    )
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
