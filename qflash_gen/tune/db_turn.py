"""Who writes a study's winner into the YAML DB: the last slot to finish, once.

A slot that finishes while another still holds its lease leaves the write to it; of slots
finishing together, the one that takes the study's ``export`` lease writes; and a winner already
written (same measured count, same best trial: ``user_attrs["db_written"]``) is not written again
unless forced (``qflash-tune --export``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import optuna

from qflash_gen.reference import SQNR_FLOOR_DB
from qflash_gen.tune import lease as lease_mod
from qflash_gen.tune import storage as storage_mod
from qflash_gen.tune.measure.base import ShapeSpec
from qflash_gen.tune.objective import Objective
from qflash_gen.tune.space import SearchSpace
from qflash_gen.tune.study import load_result
from qflash_gen.tune.trials import StudyResult, fail_strays


@dataclasses.dataclass
class DBWrite:
    """This process's turn to write one study's winner into the YAML DB (:func:`claim_db_write`).

    ``result`` is the study as stored when the turn was taken (every slot's trials).  Call
    :meth:`done` after the write (it records it on the study and ends the turn) or :meth:`cancel`
    (the write failed: a later run retries)."""

    result: StudyResult
    leases: lease_mod.Leases
    mark: dict[str, Any]

    def done(self, **where: Any) -> None:
        mark = {**self.mark, "by": storage_mod.owner_tag(), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **where}
        try:
            self.leases.storage.set_study_user_attr(self.leases.study_id, DB_WRITTEN, mark)
        finally:
            self.leases.close()

    def cancel(self) -> None:
        self.leases.close()


DB_WRITTEN = "db_written"  # study user attr: what was last written to a DB, by whom


def claim_db_write(
    storage: optuna.storages.BaseStorage | str,
    name: str,
    shape: ShapeSpec,
    space: SearchSpace,
    *,
    objective: Objective = "latency",
    sqnr_floor: float = SQNR_FLOOR_DB,
    force: bool = False,
) -> tuple[DBWrite | None, str]:
    """Should this process write the study's winner?  ``(turn, "")`` if so, else ``(None, why)``.

    The study's winner is written once, by the last worker to finish: a worker that finishes while
    another still holds a worker slot leaves the write to it; of workers finishing together, the
    one that takes the study's ``export`` lease writes; and a winner already written (same
    measured count, same best trial: ``user_attrs["db_written"]``) is not written again unless
    ``force`` (``qflash-tune --export``)."""
    backend = storage_mod.as_backend(storage)
    try:
        study_id = backend.get_study_id_from_name(name)
    except KeyError:
        return None, "no such study in the storage"
    leases = lease_mod.Leases(backend, study_id)
    running = leases.live(lease_mod.SLOT, wait=True)
    # (the messages below say "worker" for a slot's process: the text qflash-tune users and
    # docs/distributed.md know)
    if running and not force:
        who = ", ".join(
            f"worker {i.key} ({(i.holder or {}).get('host')}:{(i.holder or {}).get('pid')})" for i in running
        )
        return None, f"left to {who}, still running on this study"
    if not leases.acquire(lease_mod.EXPORT, "db"):
        return None, "another worker is writing it now"
    try:
        if not running:  # the last slot: tidy up after dead ones
            leases.reap_dead(wait=True)
            fail_strays(optuna.load_study(study_name=name, storage=backend))
        result = load_result(backend, name, shape, space, objective=objective, sqnr_floor=sqnr_floor)
        mark = {"measured": result.n_measured, "best_trial": result.best.number if result.best else None}
        last = backend.get_study_user_attrs(study_id).get(DB_WRITTEN) or {}
        if not force and all(last.get(k) == v for k, v in mark.items()):
            leases.close()
            return None, f"already written by {last.get('by')} at {last.get('at')}"
    except BaseException:
        leases.close()
        raise
    return DBWrite(result, leases, mark), ""
