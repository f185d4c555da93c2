"""What each study of a run measures first: the warm starts (docs/design.md, "Tuner").

A study enqueues, in order: the ``--try`` configs; the DB's entry for its key (measured again
under this run's protocol); configs of stale entries for the key (another template, Triton or
P width) and of entries at other B*H buckets of the same N and D, each mapped into this space;
the safe default; and, seed by seed, the same tiling under each register cap and as a pipelined
loop over 2+ heads per program (axes TPE rarely lands on together, docs/perf-notes.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from qflash_gen import db, keys
from qflash_gen.config import KernelConfig, default_config, parse_config
from qflash_gen.tune.measure.base import ShapeSpec
from qflash_gen.tune.setup import UsageError, smem_of


def db_file(target: str | os.PathLike[str] | None, gpu_name: str) -> Path:
    """``--db``: a ``<gpu>.yaml`` file, or a directory holding it (default: the user DB dir)."""
    if target is None:
        return db.user_db_path(gpu_name)  # $QFLASH_GEN_DB: a folder or its <gpu>.yaml
    path = Path(target).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if path.stem != gpu_name:
            raise ValueError(f"--db {path}: a DB for gpu {gpu_name!r} must be named {db.file_name(gpu_name)}")
        return path
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


def _stored(target, gpu_name: str, shipped: bool):
    paths = [db.shipped_db_dir() / db.file_name(gpu_name)] if shipped else []
    for path in (*paths, db_file(target, gpu_name)):
        yield from db.raw_configs(path)


def db_seeds(
    target: str | os.PathLike[str] | None, gpu_name: str, key: keys.WorkloadKey, *, shipped: bool = True
) -> list[KernelConfig]:
    """Configs that stale entries for ``key`` hold (shipped DB unless not ``shipped``, and ``--db``)."""
    return [config for k, config in _stored(target, gpu_name, shipped) if k == str(key)]


def db_neighbors(
    target: str | os.PathLike[str] | None, gpu_name: str, key: keys.WorkloadKey, *, shipped: bool = True
) -> list[KernelConfig]:
    """Configs of entries for the same N, D, masking and dtypes at other B*H buckets, nearest
    bucket first (shipped DB unless not ``shipped``, and ``--db``)."""
    found: list[tuple[float, KernelConfig]] = []
    for k, config in _stored(target, gpu_name, shipped):
        try:
            dist = keys.key_distance(key, keys.WorkloadKey.from_str(k))
        except ValueError:
            continue
        if 0 < dist < float("inf"):
            found.append((dist, config))
    return [c for _, c in sorted(found, key=lambda t: t[0])]


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
    """One study of a run: its shape, space, name and the configs it measures first."""

    shape: ShapeSpec
    space: Any
    name: str
    enqueue: list[KernelConfig]

    def __iter__(self):  # unpacks as (shape, space, name, enqueue)
        return iter((self.shape, self.space, self.name, self.enqueue))


def make_plans(
    args: argparse.Namespace, gpu: str, dtype: str, shapes: list, grid: Any, *, enqueue_db: bool
) -> list[StudyPlan]:
    """One :class:`StudyPlan` per shape, in the order the studies run."""
    from qflash_gen.tune import study
    from qflash_gen.tune.space import SearchSpace

    smem = smem_of(gpu)
    tries = try_configs(args)
    plans = []
    for s in shapes:
        space = SearchSpace(grid, s.n, s.d, smem_limit=smem)
        name = study.study_name(args.study, gpu, s, dtype, space, args.objective)
        enqueue: list[KernelConfig] = []
        if enqueue_db and not args.no_db:
            key = s.key(dtype)
            try:
                # A replay (--simulate) lives in its table's world: the shipped DB's live
                # measurements would make it depend on what this checkout ships.
                incumbent = db_best(args.db, gpu, key, shipped=not args.simulate)
            except ValueError as exc:
                raise UsageError(f"--db: {exc}") from None
            if incumbent is not None:
                enqueue.append(incumbent)
            seeds = db_seeds(args.db, gpu, key, shipped=not args.simulate)
            seeds += db_neighbors(args.db, gpu, key, shipped=not args.simulate)
            for seed in seeds:
                adapted = space.adapt(seed)
                if adapted is not None and adapted not in enqueue:
                    enqueue.append(adapted)
        default = default_config(s.n, s.d)
        enqueue.append(space.adapt(default) or default)
        # --try first, as given (no variants), where the space holds it and it fits
        first = [c for c in tries if space.params_for(c) is not None and space.check(c) is None]
        plans.append(StudyPlan(s, space, name, first + [c for c in seed_variants(space, enqueue) if c not in first]))
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
