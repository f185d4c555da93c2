"""What each study of a run measures first: the warm starts (docs/design.md, "Tuner").

A study enqueues, in order (``--warm-start all``, the default of a run on a GPU):

1. the ``--try`` configs, as given;
2. the runtime's current pick for the key (``get_kernel``: an exact entry, a nearer bucket, a
   sibling card's entry or the default; :mod:`.incumbent`), which the DB entry must beat;
3. the DB's usable entry for the key, then the configs of every entry stored for the key, stale
   ones too (another template, Triton or P width): this GPU's files first (``--db`` and the
   shipped one), then the shipped files of the other cards of its architecture, then of the
   other cards;
4. the safe default;
5. the configs of entries for the same N, D, masking and dtypes at other B*H buckets, in the
   same file order, nearest bucket first.

Each config is mapped into the study's space (``SearchSpace.adapt``); those of 1 to 4 are each
followed by their register-capped and head-grouped variants (axes TPE rarely lands on together,
docs/perf-notes.md).  ``--warm-start db`` (the default of ``--simulate``: a replay lives in its
table's world) reads ``--db`` only, not the shipped files; ``--warm-start none`` enqueues only
``--try`` and the default (a cold start: what the search finds on its own).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from qflash_gen import db, keys
from qflash_gen.config import KernelConfig, default_config, parse_config
from qflash_gen.gpu import KNOWN_GPUS
from qflash_gen.tune.incumbent import CurrentPick, current_pick
from qflash_gen.tune.measure.base import ShapeSpec
from qflash_gen.tune.setup import UsageError, smem_of, warm_start_mode

WARM_STARTS: tuple[str, ...] = ("all", "db", "none")


def db_file(target: str | os.PathLike[str] | None, gpu_name: str) -> Path:
    """``--db``: a ``<gpu>.yaml`` file, or a directory holding it (default: the user DB dir).

    ValueError for a path that is neither: an existing file not named ``.yaml``/``.yml``, or a
    path with a file suffix that does not exist as a directory (``--db out/foo.txt`` would
    otherwise become a directory ``foo.txt/``)."""
    if target is None:
        return db.user_db_path(gpu_name)  # $QFLASH_GEN_DB: a folder or its <gpu>.yaml
    path = Path(target).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if path.stem != gpu_name:
            raise ValueError(f"--db {path}: a DB for gpu {gpu_name!r} must be named {db.file_name(gpu_name)}")
        if path.is_dir():
            raise ValueError(f"--db {path}: is a directory, not a {db.file_name(gpu_name)} file")
        return path
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"--db {path}: is a file, not a directory or a {db.file_name(gpu_name)} file; "
            "give the directory that holds <gpu>.yaml, or the .yaml file itself"
        )
    if path.suffix and not path.exists():
        raise ValueError(
            f"--db {path}: names neither a directory nor a .yaml file (suffix {path.suffix!r}); give a "
            f"directory (created if missing) or the {db.file_name(gpu_name)} file"
        )
    return path / db.file_name(gpu_name)


def db_best(
    target: str | os.PathLike[str] | None, gpu_name: str, key: keys.WorkloadKey, *, shipped: bool = True
) -> KernelConfig | None:
    """The config the DB holds for ``key`` on ``gpu_name`` (shipped DB overlaid by ``--db``; without
    ``shipped``, ``--db`` alone), or None: the incumbent, measured again under this run's protocol."""
    path = db_file(target, gpu_name)
    dirs = [db.shipped_db_dir(), path.parent] if shipped else [path.parent]
    entry = db.TuningDB(dirs).lookup(gpu_name, key)  # a corrupt file: DBError
    return None if entry is None else entry.config


def shipped_files(gpu_name: str) -> list[Path]:
    """The shipped DB files, this GPU's first, then the other cards of its architecture, then
    the rest (``gpu.KNOWN_GPUS`` order, unknown names last)."""
    shipped = db.shipped_db_dir()
    names = db.TuningDB([shipped]).gpus()
    spec = KNOWN_GPUS.get(gpu_name)
    order = list(KNOWN_GPUS)

    def rank(name: str) -> tuple:
        other = KNOWN_GPUS.get(name)
        same_arch = spec is not None and other is not None and other.cc == spec.cc
        return (name != gpu_name, not same_arch, order.index(name) if name in order else len(order), name)

    return [shipped / db.file_name(n) for n in sorted(names, key=rank)]


def seed_files(target: str | os.PathLike[str] | None, gpu_name: str, *, shipped: bool | str = True) -> list[Path]:
    """DB files whose entries seed a study: this GPU's (shipped, then ``--db``); with
    ``shipped="all"`` every shipped file after them (see :func:`shipped_files`)."""
    own = db_file(target, gpu_name)
    files = [db.shipped_db_dir() / db.file_name(gpu_name)] if shipped else []
    files.append(own)
    if shipped == "all":
        files += shipped_files(gpu_name)
    out: list[Path] = []
    for f in files:
        if f not in out:
            out.append(f)
    return out


def _stored(files: Iterable[Path]) -> Iterator[tuple[str, KernelConfig]]:
    for path in files:
        yield from db.raw_configs(path)


def db_seeds(
    target: str | os.PathLike[str] | None, gpu_name: str, key: keys.WorkloadKey, *, shipped: bool | str = True
) -> list[KernelConfig]:
    """Configs of every entry stored for ``key``, stale ones included (the files of
    :func:`seed_files`, in that order)."""
    return [config for k, config in _stored(seed_files(target, gpu_name, shipped=shipped)) if k == str(key)]


def db_neighbors(
    target: str | os.PathLike[str] | None, gpu_name: str, key: keys.WorkloadKey, *, shipped: bool | str = True
) -> list[KernelConfig]:
    """Configs of entries for the same N, D, masking and dtypes at other B*H buckets, file by
    file (:func:`seed_files`), nearest bucket first within a file."""
    out: list[KernelConfig] = []
    for path in seed_files(target, gpu_name, shipped=shipped):
        found: list[tuple[float, KernelConfig]] = []
        for k, config in db.raw_configs(path):
            try:
                dist = keys.key_distance(key, keys.WorkloadKey.from_str(k))
            except ValueError:
                continue
            if 0 < dist < float("inf"):
                found.append((dist, config))
        out += [c for _, c in sorted(found, key=lambda t: t[0])]
    return out


def try_configs(args: argparse.Namespace) -> list[KernelConfig]:
    """``--try`` configs (fields over the default config, as ``qflash-show --config``)."""
    out = []
    for text in getattr(args, "try_configs", None) or []:
        try:
            out.append(parse_config(text))
        except ValueError as exc:
            raise UsageError(f"--try {text!r}: {exc}") from None
    return out


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    """One study of a run: its shape, space, name, the configs it measures first and the
    runtime's current pick for its key (None: not looked up, or unknown GPU)."""

    shape: ShapeSpec
    space: Any
    name: str
    enqueue: list[KernelConfig]
    current: CurrentPick | None = None

    def __iter__(self):  # unpacks as (shape, space, name, enqueue)
        return iter((self.shape, self.space, self.name, self.enqueue))


def warm_starts(
    space: Any,
    shape: ShapeSpec,
    gpu: str,
    dtype: str,
    *,
    target: str | os.PathLike[str] | None = None,
    mode: str = "all",
    current: CurrentPick | None = None,
    tries: Iterable[KernelConfig] = (),
) -> list[KernelConfig]:
    """The configs a study measures first, in order (the module doc), mapped into ``space``."""
    if mode not in WARM_STARTS:
        raise ValueError(f"--warm-start {mode!r} is unknown; choose one of {WARM_STARTS}")
    seeds: list[KernelConfig] = []
    if current is not None and mode != "none":
        seeds.append(current.config)
    shipped: bool | str = "all" if mode == "all" else False
    if mode != "none":
        key = shape.key(dtype)
        incumbent = db_best(target, gpu, key, shipped=bool(shipped))
        seeds += ([incumbent] if incumbent is not None else []) + db_seeds(target, gpu, key, shipped=shipped)
    seeds.append(default_config(shape.n, shape.d))
    nearby = db_neighbors(target, gpu, shape.key(dtype), shipped=shipped) if mode != "none" else []
    first = [c for c in tries if space.params_for(c) is not None and space.check(c) is None]
    mapped = _mapped(space, seeds)
    out = first + [c for c in seed_variants(space, mapped) if c not in first]
    return out + [c for c in _mapped(space, nearby) if c not in out]


def _mapped(space: Any, configs: Iterable[KernelConfig]) -> list[KernelConfig]:
    """``configs`` mapped into ``space``, each kernel once (a single pass's rescale twins are one)."""
    out: list[KernelConfig] = []
    seen: set[KernelConfig] = set()
    for c in configs:
        adapted = space.adapt(c)
        if adapted is not None and space.canonical(adapted) not in seen:
            seen.add(space.canonical(adapted))
            out.append(adapted)
    return out


def make_plans(
    args: argparse.Namespace, gpu: str, dtype: str, shapes: list, grid: Any, *, enqueue_db: bool
) -> list[StudyPlan]:
    """One :class:`StudyPlan` per shape, in the order the studies run (``enqueue_db=False``: the
    study names only, for ``--export`` and ``--devices``: no DB is read)."""
    from qflash_gen.tune import study
    from qflash_gen.tune.space import SearchSpace

    smem = smem_of(gpu)
    tries = try_configs(args)
    mode = warm_start_mode(args)
    plans = []
    for s in shapes:
        space = SearchSpace(grid, s.n, s.d, smem_limit=smem)
        name = study.study_name(args.study, gpu, s, dtype, space, args.objective)
        current = None
        try:
            if enqueue_db and mode != "none":
                current = current_pick(s, dtype, gpu, db_file(args.db, gpu).parent)
            enqueue = warm_starts(
                space, s, gpu, dtype, target=args.db, mode=mode if enqueue_db else "none", current=current, tries=tries
            )
        except ValueError as exc:  # a bad --db path, a corrupt DB file (DBError names file:line)
            raise UsageError(f"--db: {exc}" if not str(exc).startswith("--db") else str(exc)) from None
        plans.append(StudyPlan(s, space, name, enqueue, current))
    return plans


def seed_variants(space, seeds: list[KernelConfig]) -> list[KernelConfig]:
    """``seeds`` in order, each followed by its register-capped and head-grouped variants that
    the space can produce and that fit."""
    out: list[KernelConfig] = []

    def add(c: KernelConfig) -> None:
        if c not in out and space.params_for(c) is not None and space.check(c) is None:
            out.append(c)

    for seed in seeds:
        if seed not in out:
            out.append(seed)
        for r in space.choices["max_regs"]:
            capped = seed.replace(max_regs=r)
            add(capped)
            for g in space.choices["heads_per_program"]:
                if g > 1:
                    add(capped.replace(heads_per_program=g, num_stages=max(2, capped.num_stages)))
    return out
