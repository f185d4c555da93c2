"""One Optuna study per (GPU, workload, batch): the search loop, its bookkeeping and the pick.

The loop is Optuna's ask/tell with four rules of our own:

1. **Correctness first.**  A candidate that crashes, hangs, fails to compile or differs from the
   oracle is told ``FAIL`` (with the reason in ``user_attrs["error"]``): it never becomes a
   "fast" trial.
2. **Accuracy floor.**  A correct candidate below ``sqnr_floor`` is told with its latency but a
   violated constraint (``constraints_func``), so TPE / NSGA-II learn where the floor is and the
   pick ignores it.
3. **No re-measurement.**  Every measured config is stored on its trial (``config_hash``); when the
   sampler proposes a config already measured (by this or an earlier, killed run, or by another
   worker on the same storage), the trial is told the stored outcome (``user_attrs["duplicate_of"]``)
   without touching the GPU.  A config is measured only under its lease (:mod:`.lease`): when
   another worker is measuring it right now, the trial is told FAIL with ``user_attrs["claimed_by"]``
   (FAIL: the samplers ignore it, so it teaches them nothing false).  After a few such proposals in
   a row, an unmeasured config nobody is measuring is enqueued so the study keeps moving.
4. **A budget per worker.**  Each process takes a worker slot of the study (:mod:`.lease`) and
   measures until ``budget`` distinct configs carry its slot (``user_attrs["worker"]``; trials of
   older runs without one count for slot 0).  Concurrent workers each spend their own budget, so
   the study gets their sum; worker k samples with seed ``seed + k`` so they do not propose in
   lockstep.
5. **Resume.**  The study is ``load_if_exists``; all of the above is rebuilt from storage, so a
   rerun after a kill takes the dead worker's slot and continues where it stopped, and its trials
   in flight (RUNNING, never finished) are marked failed.

The pick (:func:`select_best`): the fastest feasible trial, except that a simpler config
(:func:`qflash_gen.tune.space.complexity`) within measurement noise of it wins the tie.

Objectives: ``latency`` (µs, TPE), ``energy`` (µJ per call from NVML's counter, TPE; a trial
measured without energy fails), ``pareto`` (NSGA-II over latency × SQNR) and ``pareto-energy``
(NSGA-II over latency × energy × SQNR; the CLI's ``--objective pareto --pareto-axes
latency,energy,sqnr``).  For ``energy`` the pick is the least energy under the same rules; the
Pareto objectives pick the fastest point for the DB and keep the front.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import optuna
from optuna.trial import TrialState

from qflash_gen.config import KernelConfig
from qflash_gen.tune import lease as lease_mod
from qflash_gen.tune import storage as storage_mod
from qflash_gen.tune.measure import Measurement, Measurer, ShapeSpec
from qflash_gen.tune.space import SearchSpace, complexity

Objective = Literal["latency", "energy", "pareto", "pareto-energy"]
SamplerName = Literal["tpe", "random", "nsga2"]
OBJECTIVES: tuple[str, ...] = ("latency", "energy", "pareto", "pareto-energy")
# The axes of each Pareto objective, and their Optuna directions.
PARETO_AXES: dict[str, tuple[str, ...]] = {
    "pareto": ("latency", "sqnr"),
    "pareto-energy": ("latency", "energy", "sqnr"),
}
_AXIS_DIRECTION = {"latency": "minimize", "energy": "minimize", "sqnr": "maximize"}
DEFAULT_SQNR_FLOOR = 30.0
TIE_REL_MIN = 0.01  # ties: within max(1 %, the two spreads' mean) ...
TIE_REL_MAX = 0.02  # ... but never more than 2 % apart
STUCK_DUPLICATES = 3  # consecutive duplicate proposals before an unmeasured config is enqueued
INFEASIBLE = 1.0  # constraint value of a trial that has no SQNR (pruned before measuring)
# Optuna >= 5 stores constraints on the trial (``Trial.set_constraint``); 4.x needs a
# ``constraints_func`` on the sampler.  Both read the same user attribute here.
_TRIAL_CONSTRAINTS = hasattr(optuna.trial.Trial, "set_constraint")


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """A measured config as stored on its trial."""

    number: int
    config: KernelConfig
    measurement: Measurement
    measured_by: Mapping[str, Any] | None = None  # worker slot, host, device label (user_attrs["measured_by"])

    @property
    def latency_us(self) -> float | None:
        return self.measurement.latency_us

    @property
    def sqnr_db(self) -> float | None:
        return self.measurement.sqnr_db

    @property
    def energy_uj(self) -> float | None:
        return self.measurement.energy_uj


@dataclasses.dataclass
class StudyResult:
    """What a study produced: the pick, the Pareto front, counts and the measurement history."""

    shape: ShapeSpec
    study_name: str
    objective: str
    sqnr_floor: float
    best: TrialRecord | None
    front: list[TrialRecord]
    history: list[TrialRecord]  # measured configs, in measurement order (this run and earlier ones)
    n_trials: int  # finished Optuna trials (measured + duplicates + pruned + failed)
    space_size: int
    wall_s: float
    new_measurements: int = 0
    worker: int | None = None  # this process's worker slot (None: read from storage, no slot held)
    by_worker: dict[int, int] = dataclasses.field(default_factory=dict)  # slot -> distinct configs measured
    study_id: int | None = None

    @property
    def n_measured(self) -> int:
        return len(self.history)

    @property
    def n_mine(self) -> int:
        """Distinct configs measured under this process's worker slot (its budget's progress)."""
        return self.by_worker.get(self.worker, 0) if self.worker is not None else self.n_measured

    def measured_per(self, *fields: str) -> dict[Any, int]:
        """Measured configs counted by ``measured_by`` fields (``device``, ``host``, ``worker``):
        keyed by the value of one field, or by the tuple of several."""
        out: dict[Any, int] = {}
        for r in self.history:
            by = r.measured_by or {}
            value = by.get(fields[0]) if len(fields) == 1 else tuple(by.get(f) for f in fields)
            out[value] = out.get(value, 0) + 1
        return out

    @property
    def n_failed(self) -> int:
        return sum(1 for r in self.history if not r.measurement.ok)

    @property
    def n_below_floor(self) -> int:
        return sum(1 for r in self.history if r.measurement.ok and not r.measurement.feasible(self.sqnr_floor))


def study_name(prefix: str, gpu: str, shape: ShapeSpec, dtype: str, space: SearchSpace, objective: str) -> str:
    """Deterministic study name: a rerun with the same arguments resumes the same study.

    The search-space hash is part of it because Optuna refuses to change a parameter's choices
    within a study (another grid is another study)."""
    obj = "" if objective == "latency" else f"/{objective}"
    return f"{prefix}/{gpu}/{shape.workload}/b{shape.batch}/{dtype}/space-{space.hash[:10]}{obj}"


def _constraint_from_attrs(trial: optuna.trial.FrozenTrial) -> tuple[float]:
    return (float(trial.user_attrs.get("constraint", INFEASIBLE)),)


def _set_constraint(trial: optuna.trial.Trial, value: float) -> None:
    trial.set_user_attr("constraint", value)
    if _TRIAL_CONSTRAINTS:
        trial.set_constraint("sqnr_floor", value)


def make_sampler(name: SamplerName, seed: int | None, *, population_size: int = 50) -> optuna.samplers.BaseSampler:
    """TPE (default; multivariate, constraint-aware), random search, or NSGA-II for the front."""
    constraints = {} if _TRIAL_CONSTRAINTS else {"constraints_func": _constraint_from_attrs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            # constant_liar: trials other workers are running count as bad guesses, so concurrent
            # workers do not all propose the same region (Optuna 5's default; 4.x needs it said).
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, **constraints)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size, **constraints)
    raise ValueError(f"sampler={name!r} is unknown; choose tpe, random or nsga2")


def _record_from_trial(t: optuna.trial.FrozenTrial) -> TrialRecord | None:
    ua = t.user_attrs
    if not ua.get("measured") or "config" not in ua:
        return None
    try:
        config = KernelConfig.from_dict(dict(ua["config"]))
    except (ValueError, TypeError):
        return None
    by = ua.get("measured_by")
    return TrialRecord(t.number, config, Measurement.from_dict(ua), dict(by) if isinstance(by, Mapping) else None)


def _worker_of(t: optuna.trial.FrozenTrial) -> int:
    try:
        return int(t.user_attrs.get("worker", 0))
    except (TypeError, ValueError):
        return 0


class _Measured:
    """config hash → first measured record, over the finished trials in storage (incremental:
    each trial is read once, so polling it before every measurement stays cheap)."""

    _FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)

    def __init__(self) -> None:
        self.by_hash: dict[str, TrialRecord] = {}
        self.by_worker: dict[int, set[str]] = {}  # worker slot -> hashes its trials measured
        self._seen: set[int] = set()

    def refresh(self, study: optuna.Study) -> None:
        for t in study.get_trials(deepcopy=False, states=self._FINISHED):
            if t.number in self._seen:
                continue
            self._seen.add(t.number)
            rec = _record_from_trial(t)
            if rec is None:
                continue
            h = str(t.user_attrs.get("config_hash") or rec.config.hash)
            old = self.by_hash.get(h)
            if old is None or rec.number < old.number:
                self.by_hash[h] = rec
            self.by_worker.setdefault(_worker_of(t), set()).add(h)

    def add(self, config_hash: str, rec: TrialRecord, worker: int) -> None:
        self._seen.add(rec.number)
        self.by_hash.setdefault(config_hash, rec)
        self.by_worker.setdefault(worker, set()).add(config_hash)

    def count(self, worker: int) -> int:
        return len(self.by_worker.get(worker, ()))


def is_pareto(objective: str) -> bool:
    return objective in PARETO_AXES


def needs_energy(objective: str) -> bool:
    """True if the objective's values include energy per call (the measurer must record it)."""
    return objective == "energy" or "energy" in PARETO_AXES.get(objective, ())


def objective_for(objective: str, pareto_axes: str | Sequence[str] | None = None) -> str:
    """The study objective for ``--objective`` and ``--pareto-axes`` (ValueError if unsupported).

    ``pareto`` with axes ``latency,sqnr`` (the default) stays ``pareto``; with
    ``latency,energy,sqnr`` (any order) it is ``pareto-energy``."""
    if pareto_axes is None or pareto_axes == "":
        axes: tuple[str, ...] = ()
    elif isinstance(pareto_axes, str):
        axes = tuple(a.strip() for a in pareto_axes.split(",") if a.strip())
    else:
        axes = tuple(pareto_axes)
    if objective != "pareto":
        if axes and set(axes) != set(PARETO_AXES["pareto"]):
            raise ValueError(f"--pareto-axes {','.join(axes)} needs --objective pareto (got --objective {objective})")
        if objective not in OBJECTIVES:
            raise ValueError(f"--objective {objective!r} is unknown; choose one of {OBJECTIVES}")
        return objective
    if not axes:
        return "pareto"
    for name, known in PARETO_AXES.items():
        if len(axes) == len(known) and set(axes) == set(known):
            return name
    shown = " or ".join(",".join(a) for a in PARETO_AXES.values())
    raise ValueError(f"--pareto-axes {','.join(axes)} is not supported; choose {shown}")


def _axis_value(m: Measurement, axis: str) -> float | None:
    if axis == "latency":
        return m.latency_us
    if axis == "energy":
        return m.energy_uj
    if axis == "sqnr":
        # NSGA-II needs finite values: an exact (infinite-SQNR) result is capped at 200 dB.
        return None if m.sqnr_db is None else min(m.sqnr_db, 200.0)
    raise ValueError(f"unknown objective axis {axis!r}")


def _has_values(m: Measurement, objective: str) -> bool:
    """Correct, timed and, where the objective needs it, with an energy value."""
    return m.ok and (not needs_energy(objective) or (m.energy_uj is not None and math.isfinite(m.energy_uj)))


def _values(m: Measurement, objective: str) -> float | list[float]:
    assert m.latency_us is not None and m.sqnr_db is not None
    if is_pareto(objective):
        return [float(_axis_value(m, a)) for a in PARETO_AXES[objective]]
    if objective == "energy":
        assert m.energy_uj is not None
        return m.energy_uj
    return m.latency_us


def _tell(
    study: optuna.Study,
    trial: optuna.trial.Trial,
    config: KernelConfig,
    config_hash: str,
    m: Measurement,
    objective: str,
    floor: float,
    extra: dict[str, Any],
) -> bool:
    """Record ``m`` on ``trial`` and finish it.  False when another process finished the trial
    first (a reaper that judged its worker dead): then nothing of ``m`` is recorded, the caller
    counts nothing, and the config stays free to be measured again."""
    attrs = {
        "config": config.to_dict(),
        "config_hash": config_hash,
        "config_short": config.short(),
        **m.to_dict(),
        **extra,
    }
    try:
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        if m.ok:
            _set_constraint(trial, floor - float(m.sqnr_db))  # <= 0: feasible
        if _has_values(m, objective):
            study.tell(trial, _values(m, objective))
        else:
            if m.ok:  # correct and timed, but the objective needs energy and none was measured
                trial.set_user_attr("error", f"no energy measured: objective {objective} needs energy_uj")
            study.tell(trial, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        print(
            f"qflash-tune: trial {trial.number} was finished by another process before this one "
            "could record it; its measurement is dropped",
            file=sys.stderr,
        )
        return False
    return True


def _metric(m: Measurement, objective: str) -> tuple[float | None, float | None]:
    """``(value, spread)`` the pick minimizes: energy for ``energy``, latency otherwise."""
    if objective == "energy":
        return m.energy_uj, m.energy_spread_uj
    return m.latency_us, m.spread_us


def tie_tolerance(best: Measurement, other: Measurement, objective: str = "latency") -> float:
    """How far ``other`` may be above ``best`` (µs, or µJ for ``energy``) and still tie with it
    (measurement noise)."""
    value, best_spread = _metric(best, objective)
    assert value is not None
    spread = 0.5 * ((best_spread or 0.0) + (_metric(other, objective)[1] or 0.0))
    return min(max(TIE_REL_MIN * value, spread), TIE_REL_MAX * value)


def select_best(records: Sequence[TrialRecord], sqnr_floor: float, objective: str = "latency") -> TrialRecord | None:
    """The fastest record at or above the floor (the least energy for ``objective="energy"``); a
    simpler one within noise wins the tie."""
    ok = [r for r in records if r.measurement.feasible(sqnr_floor) and _has_values(r.measurement, objective)]
    if not ok:
        return None

    def value(r: TrialRecord) -> float:
        return float(_metric(r.measurement, objective)[0])

    best = min(ok, key=lambda r: (value(r), complexity(r.config)))
    ties = [r for r in ok if value(r) - value(best) <= tie_tolerance(best.measurement, r.measurement, objective)]
    return min(ties, key=lambda r: (complexity(r.config), value(r)))


def pareto_front(records: Sequence[TrialRecord], axes: Sequence[str] = PARETO_AXES["pareto"]) -> list[TrialRecord]:
    """Correct records not dominated in ``axes`` (latency ↓, energy ↓, SQNR ↑), fastest first."""
    ok = [r for r in records if r.measurement.ok and all(_axis_value(r.measurement, a) is not None for a in axes)]
    sign = [1.0 if _AXIS_DIRECTION[a] == "minimize" else -1.0 for a in axes]

    def costs(r: TrialRecord) -> list[float]:
        return [s * float(_axis_value(r.measurement, a)) for s, a in zip(sign, axes, strict=True)]

    front = []
    for r in ok:
        mine = costs(r)
        dominated = False
        for o in ok:
            theirs = costs(o)
            if all(t <= m for t, m in zip(theirs, mine, strict=True)) and theirs != mine:
                dominated = True
                break
        if not dominated:
            front.append(r)
    unique: dict[str, TrialRecord] = {}
    for r in sorted(front, key=lambda r: (r.latency_us, -r.sqnr_db)):
        unique.setdefault(r.config.hash, r)
    return list(unique.values())


def _collect(
    study: optuna.Study,
    tracker: _Measured,
    *,
    shape: ShapeSpec,
    name: str,
    objective: str,
    sqnr_floor: float,
    space_size: int,
    t0: float,
    new: int = 0,
    worker: int | None = None,
    study_id: int | None = None,
) -> StudyResult:
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED))
    done = sorted(tracker.by_hash.values(), key=lambda r: r.number)
    return StudyResult(
        shape=shape,
        study_name=name,
        objective=objective,
        sqnr_floor=sqnr_floor,
        best=select_best(done, sqnr_floor, objective),
        front=pareto_front(done, PARETO_AXES.get(objective, PARETO_AXES["pareto"])),
        history=done,
        n_trials=len(finished),
        space_size=space_size,
        wall_s=time.monotonic() - t0,
        new_measurements=new,
        worker=worker,
        by_worker={k: len(v) for k, v in sorted(tracker.by_worker.items())},
        study_id=study_id,
    )


def load_result(
    storage: optuna.storages.BaseStorage | str,
    name: str,
    shape: ShapeSpec,
    space: SearchSpace,
    *,
    objective: Objective = "latency",
    sqnr_floor: float = DEFAULT_SQNR_FLOOR,
) -> StudyResult:
    """The result of the study ``name`` as stored now, measuring nothing (KeyError if absent)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = lease_mod._backend(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    tracker = _Measured()
    tracker.refresh(study)
    study_id = storage.get_study_id_from_name(name)
    return _collect(
        study,
        tracker,
        shape=shape,
        name=name,
        objective=objective,
        sqnr_floor=sqnr_floor,
        space_size=space.size,
        t0=time.monotonic(),
        study_id=study_id,
    )


def run_study(
    shape: ShapeSpec,
    measurer: Measurer,
    space: SearchSpace,
    *,
    storage: optuna.storages.BaseStorage | str,
    name: str,
    budget: int,
    objective: Objective = "latency",
    sqnr_floor: float = DEFAULT_SQNR_FLOOR,
    seed: int | None = 0,
    sampler: SamplerName | None = None,
    enqueue: Sequence[KernelConfig] = (),
    on_progress: Callable[[StudyResult], None] | None = None,
    should_stop: Callable[[list[TrialRecord]], bool] | None = None,
    max_asks: int | None = None,
    worker_info: Mapping[str, Any] | None = None,
    study_attrs: Mapping[str, Any] | None = None,
) -> StudyResult:
    """Search ``space`` for ``shape`` until this worker has measured ``budget`` distinct configs
    (or the space is exhausted), in the study ``name`` on ``storage`` (created or resumed),
    alongside any other workers on the same study (see the module doc, rules 3-5).
    :func:`open_study` then :meth:`StudyRun.search`.

    Args:
        enqueue: configs to try first (the DB's current best, the safe default), if the space
            holds them and they were not measured yet.
        sampler: default ``tpe`` for ``objective="latency"`` or ``"energy"``, ``nsga2`` for the
            Pareto objectives.
        on_progress: called after every measured trial (for progress bars).
        should_stop: called with the measurement history after every measured trial; True ends
            the study early (the efficiency tool stops once within 3 % of the known optimum).
        worker_info: recorded on every trial this worker measures (``user_attrs["measured_by"]``,
            with the worker slot and host added), e.g. ``{"device": "cuda:1", "device_name": ...}``.
        study_attrs: study user attributes to set (how the measurements are taken, for an export
            of the DB entry by another process).
    """
    run = open_study(
        shape,
        space,
        storage=storage,
        name=name,
        budget=budget,
        objective=objective,
        sqnr_floor=sqnr_floor,
        seed=seed,
        sampler=sampler,
        worker_info=worker_info,
        study_attrs=study_attrs,
    )
    with run:
        return run.search(
            measurer, enqueue=enqueue, on_progress=on_progress, should_stop=should_stop, max_asks=max_asks
        )


def open_study(
    shape: ShapeSpec,
    space: SearchSpace,
    *,
    storage: optuna.storages.BaseStorage | str,
    name: str,
    budget: int,
    objective: Objective = "latency",
    sqnr_floor: float = DEFAULT_SQNR_FLOOR,
    seed: int | None = 0,
    sampler: SamplerName | None = None,
    worker_info: Mapping[str, Any] | None = None,
    study_attrs: Mapping[str, Any] | None = None,
) -> StudyRun:
    """Create or load the study and take a worker slot in it (see :func:`run_study`).

    ``qflash-tune`` opens all its studies before it searches the first, so that workers started
    together hold one slot each in every study, however far apart their progress drifts: a
    worker that reached a study late still spends its own budget there, instead of taking over
    the slot of one that already finished it (which is what a *rerun* does, by design)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective {objective!r} is unknown; choose one of {OBJECTIVES}")
    if budget < 1:
        raise ValueError(f"--trials {budget} must be >= 1")
    sampler = sampler or ("nsga2" if is_pareto(objective) else "tpe")
    directions = [_AXIS_DIRECTION[a] for a in PARETO_AXES[objective]] if is_pareto(objective) else ["minimize"]
    population = max(4, min(50, budget // 4))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backend = lease_mod._backend(storage)
    study = optuna.create_study(
        storage=backend,
        study_name=name,
        sampler=make_sampler(sampler, seed, population_size=population),
        directions=directions,
        load_if_exists=True,
    )
    if not study.user_attrs.get("space_hash"):
        study.set_user_attr("space_hash", space.hash)
        study.set_user_attr("shape", shape.to_dict())
        study.set_user_attr("space_size", space.size)
    for key, value in (study_attrs or {}).items():
        study.set_user_attr(key, value)
    storage_mod.fail_abandoned(study)

    study_id = backend.get_study_id_from_name(name)
    info = {k: v for k, v in (worker_info or {}).items() if k in ("device", "device_name")}
    leases = lease_mod.Leases(backend, study_id, info=info)
    try:
        slot = leases.claim_slot()  # before reaping: a dead worker's slot is resumed, not freed
        leases.info["worker"] = slot
        leases.reap_dead()  # config leases of dead workers: their configs are free again
        if not leases.live(lease_mod.WORKER):
            _fail_strays(study)
    except BaseException:
        leases.close()
        raise
    if slot and seed is not None:
        study.sampler = make_sampler(sampler, seed + slot, population_size=population)
    measured_by = {"worker": slot, "host": storage_mod.owner_tag().rpartition(":")[0], **(worker_info or {})}
    return StudyRun(
        study=study,
        leases=leases,
        shape=shape,
        space=space,
        slot=slot,
        study_id=study_id,
        name=name,
        budget=budget,
        objective=objective,
        sqnr_floor=sqnr_floor,
        seed=seed,
        measured_by=measured_by,
    )


@dataclasses.dataclass
class StudyRun:
    """A study opened by this worker (:func:`open_study`), holding worker slot ``slot`` until
    :meth:`close` (or the end of :meth:`search`)."""

    study: optuna.Study
    leases: lease_mod.Leases
    shape: ShapeSpec
    space: SearchSpace
    slot: int
    study_id: int
    name: str
    budget: int
    objective: str
    sqnr_floor: float
    seed: int | None
    measured_by: dict[str, Any]

    def search(
        self,
        measurer: Measurer,
        *,
        enqueue: Sequence[KernelConfig] = (),
        on_progress: Callable[[StudyResult], None] | None = None,
        should_stop: Callable[[list[TrialRecord]], bool] | None = None,
        max_asks: int | None = None,
    ) -> StudyResult:
        """Run the search (the module doc's rules), then give the slot back."""
        try:
            return _search(
                self.study,
                self.leases,
                self.shape,
                measurer,
                self.space,
                slot=self.slot,
                study_id=self.study_id,
                name=self.name,
                budget=self.budget,
                objective=self.objective,
                sqnr_floor=self.sqnr_floor,
                seed=self.seed,
                enqueue=enqueue,
                on_progress=on_progress,
                should_stop=should_stop,
                max_asks=max_asks if max_asks is not None else 20 * self.budget + 200,
                measured_by=self.measured_by,
                t0=time.monotonic(),
            )
        finally:
            self.close()

    def close(self) -> None:
        """Release the worker slot (and any lease still held); idempotent."""
        self.leases.close()

    def __enter__(self) -> StudyRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _search(
    study: optuna.Study,
    leases: lease_mod.Leases,
    shape: ShapeSpec,
    measurer: Measurer,
    space: SearchSpace,
    *,
    slot: int,
    study_id: int,
    name: str,
    budget: int,
    objective: str,
    sqnr_floor: float,
    seed: int | None,
    enqueue: Sequence[KernelConfig],
    on_progress: Callable[[StudyResult], None] | None,
    should_stop: Callable[[list[TrialRecord]], bool] | None,
    max_asks: int,
    measured_by: dict[str, Any],
    t0: float,
) -> StudyResult:
    """The ask/tell loop of :func:`run_study`, holding worker slot ``slot``."""
    tracker = _Measured()
    tracker.refresh(study)
    measured = tracker.by_hash  # every measured config of the study: earlier runs and other workers too
    for config in enqueue:
        params = space.params_for(config)
        if params is not None and config.hash not in measured:
            study.enqueue_trial(params, skip_if_exists=True)

    rng = random.Random(seed if seed is None else seed + slot)
    owner = storage_mod.owner_tag()
    space_hashes = space.hashes
    new = 0
    duplicates_in_row = 0
    asks = 0

    def result() -> StudyResult:
        return _collect(
            study,
            tracker,
            shape=shape,
            name=name,
            objective=objective,
            sqnr_floor=sqnr_floor,
            space_size=space.size,
            t0=t0,
            new=new,
            worker=slot,
            study_id=study_id,
        )

    def unstick() -> bool:
        """Enqueue an unmeasured config nobody is measuring; False if there is none left."""
        left = [(c, h) for c, h in zip(space.configs(), space.hash_list, strict=True) if h not in measured]
        if left:
            busy = {info.key for info in leases.live(lease_mod.CONFIG)}
            left = [(c, h) for c, h in left if h not in busy]
        if not left:
            return False
        params = space.params_for(rng.choice(left)[0])
        if params is not None:
            study.enqueue_trial(params)
        return True

    while tracker.count(slot) < budget and asks < max_asks:
        if space_hashes <= measured.keys():
            break  # every feasible config is measured: the search is exhaustive
        asks += 1
        trial = study.ask(space.distributions)
        trial.set_user_attr("owner", owner)
        trial.set_user_attr("worker", slot)
        config, reason = space.config_from_params(trial.params)
        if reason is not None:  # infeasible before measuring (shared memory): nothing to run
            trial.set_user_attr("infeasible", reason)
            _set_constraint(trial, INFEASIBLE)
            study.tell(trial, state=TrialState.PRUNED)
            continue
        config_hash = config.hash
        tracker.refresh(study)  # measurements by other workers on the same storage
        prior = measured.get(config_hash)
        if prior is None:
            if not leases.acquire(lease_mod.CONFIG, config_hash, trial=trial.number):
                # Another worker is measuring it right now: skip it (FAIL: no sampler learns from it).
                holder = leases.holder_of(lease_mod.CONFIG, config_hash) or {}
                trial.set_user_attr("config", config.to_dict())
                trial.set_user_attr("config_hash", config_hash)
                trial.set_user_attr("claimed_by", {k: holder.get(k) for k in ("trial", "worker", "host", "device")})
                study.tell(trial, state=TrialState.FAIL)
                duplicates_in_row += 1
                if duplicates_in_row >= STUCK_DUPLICATES:
                    duplicates_in_row = 0
                    if not unstick():
                        break  # what is left is being measured by other workers
                continue
            tracker.refresh(study)  # measured by someone who released the lease just before we took it?
            prior = measured.get(config_hash)
            if prior is not None:
                leases.release(lease_mod.CONFIG, config_hash)
        if prior is not None:
            _tell(
                study,
                trial,
                config,
                config_hash,
                prior.measurement,
                objective,
                sqnr_floor,
                {"duplicate_of": prior.number},
            )
            duplicates_in_row += 1
            if duplicates_in_row >= STUCK_DUPLICATES:
                duplicates_in_row = 0
                if not unstick():
                    break  # what is left is being measured by other workers
            continue
        duplicates_in_row = 0
        try:
            m = measurer.measure(config, shape)
        except BaseException as exc:  # the measurer itself broke (not the candidate): end the trial, stop
            trial.set_user_attr("error", f"measurer failed: {type(exc).__name__}: {exc}"[:500])
            study.tell(trial, state=TrialState.FAIL)
            leases.release(lease_mod.CONFIG, config_hash)
            raise
        told = _tell(
            study,
            trial,
            config,
            config_hash,
            m,
            objective,
            sqnr_floor,
            {"measured": True, "measured_by": measured_by},
        )
        if told:
            tracker.add(config_hash, TrialRecord(trial.number, config, m, measured_by), slot)
        leases.release(lease_mod.CONFIG, config_hash)  # after the tell: a new holder sees the result
        new += 1
        if on_progress is not None:
            on_progress(result())
        if should_stop is not None and should_stop(sorted(measured.values(), key=lambda r: r.number)):
            break
    return result()


def _fail_strays(study: optuna.Study) -> int:
    """Fail every RUNNING trial: call only when no other worker is live on the study.

    Then each one is left over from a dead worker: one killed inside ``study.ask`` (before it
    could tag the trial with its owner, so :func:`storage.fail_abandoned` cannot tell it is dead),
    or one on another host.  None of them was measured; failing them only tidies the study."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        try:
            study.tell(t.number, state=TrialState.FAIL)
            n += 1
        except (RuntimeError, ValueError):  # finished meanwhile
            pass
    return n


# -- who writes the DB ------------------------------------------------------------------------------
@dataclasses.dataclass
class DBWrite:
    """This process's turn to write one study's winner into the YAML DB (:func:`claim_db_write`).

    ``result`` is the study as stored when the turn was taken (every worker's trials).  Call
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
    sqnr_floor: float = DEFAULT_SQNR_FLOOR,
    force: bool = False,
) -> tuple[DBWrite | None, str]:
    """Should this process write the study's winner?  ``(turn, "")`` if so, else ``(None, why)``.

    The study's winner is written once, by the last worker to finish: a worker that finishes while
    another still holds a worker slot leaves the write to it; of workers finishing together, the
    one that takes the study's ``export`` lease writes; and a winner already written (same
    measured count, same best trial: ``user_attrs["db_written"]``) is not written again unless
    ``force`` (``qflash-tune --export``)."""
    backend = lease_mod._backend(storage)
    try:
        study_id = backend.get_study_id_from_name(name)
    except KeyError:
        return None, "no such study in the storage"
    leases = lease_mod.Leases(backend, study_id)
    running = leases.live(lease_mod.WORKER, wait=True)
    if running and not force:
        who = ", ".join(
            f"worker {i.key} ({(i.holder or {}).get('host')}:{(i.holder or {}).get('pid')})" for i in running
        )
        return None, f"left to {who}, still running on this study"
    if not leases.acquire(lease_mod.EXPORT, "db"):
        return None, "another worker is writing it now"
    try:
        if not running:  # the last worker: tidy up after dead ones
            leases.reap_dead(wait=True)
            _fail_strays(optuna.load_study(study_name=name, storage=backend))
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
