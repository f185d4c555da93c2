"""A study's trials as the tuner reads and writes them: records, the result, telling a trial.

What is stored on each trial (``user_attrs``): ``config`` and ``config_hash``, the measurement,
``measured`` and ``measured_by`` for a trial that measured, ``duplicate_of`` for one told an
earlier trial's result, ``claimed_by`` for one skipped because another process was measuring
its config, and ``worker``: the slot that asked for it (the attribute keeps its older name).

The pick (:func:`select_best`): the fastest feasible trial, except that a simpler config
(:func:`qflash_gen.tune.space.complexity`) within measurement noise of it wins the tie.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import optuna
from optuna.trial import TrialState

from qflash_gen.config import KernelConfig
from qflash_gen.tune.measure.base import Measurement, ShapeSpec
from qflash_gen.tune.objective import (
    AXIS_DIRECTION,
    PARETO_AXES,
    TIE_REL_MAX,
    TIE_REL_MIN,
    axis_value,
    has_values,
    metric,
    values,
)
from qflash_gen.tune.space import complexity
from qflash_gen.tune.storage import record_constraint, tell_measured

SamplerName = Literal["tpe", "random", "nsga2"]
INFEASIBLE = 1.0  # constraint value of a trial that has no SQNR (pruned before measuring)
# Optuna >= 5 stores constraints on the trial (``Trial.set_constraint``); 4.x needs a
# ``constraints_func`` on the sampler.  Both read the same user attribute here.
TRIAL_CONSTRAINTS = hasattr(optuna.trial.Trial, "set_constraint")
FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """A measured config as stored on its trial."""

    number: int
    config: KernelConfig
    measurement: Measurement
    measured_by: Mapping[str, Any] | None = None  # slot, host, device label (user_attrs["measured_by"])

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
    slot: int | None = None  # this process's slot (None: read from storage, no slot held)
    by_slot: dict[int, int] = dataclasses.field(default_factory=dict)  # slot -> distinct configs measured
    study_id: int | None = None

    @property
    def n_measured(self) -> int:
        return len(self.history)

    @property
    def n_mine(self) -> int:
        """Distinct configs measured under this process's slot (its budget's progress)."""
        return self.by_slot.get(self.slot, 0) if self.slot is not None else self.n_measured

    def measured_per(self, *fields: str) -> dict[Any, int]:
        """Measured configs counted by ``measured_by`` fields (``device``, ``host``, ``worker``: the slot):
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



def _constraint_from_attrs(trial: optuna.trial.FrozenTrial) -> tuple[float]:
    return (float(trial.user_attrs.get("constraint", INFEASIBLE)),)


def set_constraint(trial: optuna.trial.Trial, value: float) -> None:
    trial.set_user_attr("constraint", value)
    if TRIAL_CONSTRAINTS:
        trial.set_constraint("sqnr_floor", value)
    record_constraint(trial, value)  # the list optuna-dashboard reads (tune/storage.py)


def make_sampler(name: SamplerName, seed: int | None, *, population_size: int = 50) -> optuna.samplers.BaseSampler:
    """TPE (default; multivariate, constraint-aware), random search, or NSGA-II for the front."""
    constraints = {} if TRIAL_CONSTRAINTS else {"constraints_func": _constraint_from_attrs}
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


def record_from_trial(t: optuna.trial.FrozenTrial) -> TrialRecord | None:
    ua = t.user_attrs
    if not ua.get("measured") or "config" not in ua:
        return None
    try:
        config = KernelConfig.from_dict(dict(ua["config"]))
    except (ValueError, TypeError):
        return None
    by = ua.get("measured_by")
    return TrialRecord(t.number, config, Measurement.from_dict(ua), dict(by) if isinstance(by, Mapping) else None)


def slot_of(t: optuna.trial.FrozenTrial) -> int:
    try:
        return int(t.user_attrs.get("worker", 0))
    except (TypeError, ValueError):
        return 0


class MeasuredTrials:
    """config hash → first measured record, over the finished trials in storage (incremental:
    each trial is read once, so polling it before every measurement stays cheap)."""

    def __init__(self) -> None:
        self.by_hash: dict[str, TrialRecord] = {}
        self.by_slot: dict[int, set[str]] = {}  # slot -> hashes its trials measured
        self._seen: set[int] = set()

    def refresh(self, study: optuna.Study) -> None:
        for t in study.get_trials(deepcopy=False, states=FINISHED):
            if t.number in self._seen:
                continue
            self._seen.add(t.number)
            rec = record_from_trial(t)
            if rec is None:
                continue
            h = str(t.user_attrs.get("config_hash") or rec.config.hash)
            old = self.by_hash.get(h)
            if old is None or rec.number < old.number:
                self.by_hash[h] = rec
            self.by_slot.setdefault(slot_of(t), set()).add(h)

    def add(self, config_hash: str, rec: TrialRecord, slot: int) -> None:
        self._seen.add(rec.number)
        self.by_hash.setdefault(config_hash, rec)
        self.by_slot.setdefault(slot, set()).add(config_hash)

    def count(self, slot: int) -> int:
        return len(self.by_slot.get(slot, ()))



def tell(
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
            set_constraint(trial, floor - float(m.sqnr_db))  # <= 0: feasible
        if has_values(m, objective):
            tell_measured(study, trial, values(m, objective), m.feasible(floor))  # dashboard-safe (tune/storage.py)
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



def collect(
    study: optuna.Study,
    tracker: MeasuredTrials,
    *,
    shape: ShapeSpec,
    name: str,
    objective: str,
    sqnr_floor: float,
    space_size: int,
    t0: float,
    new: int = 0,
    slot: int | None = None,
    study_id: int | None = None,
) -> StudyResult:
    finished = study.get_trials(deepcopy=False, states=FINISHED)
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
        slot=slot,
        by_slot={k: len(v) for k, v in sorted(tracker.by_slot.items())},
        study_id=study_id,
    )



def fail_strays(study: optuna.Study) -> int:
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


def tie_tolerance(best: Measurement, other: Measurement, objective: str = "latency") -> float:
    """How far ``other`` may be above ``best`` (µs, or µJ for ``energy``) and still tie with it
    (measurement noise)."""
    value, best_spread = metric(best, objective)
    assert value is not None
    spread = 0.5 * ((best_spread or 0.0) + (metric(other, objective)[1] or 0.0))
    return min(max(TIE_REL_MIN * value, spread), TIE_REL_MAX * value)


def select_best(records: Sequence[TrialRecord], sqnr_floor: float, objective: str = "latency") -> TrialRecord | None:
    """The fastest record at or above the floor (the least energy for ``objective="energy"``); a
    simpler one within noise wins the tie."""
    ok = [r for r in records if r.measurement.feasible(sqnr_floor) and has_values(r.measurement, objective)]
    if not ok:
        return None

    def value(r: TrialRecord) -> float:
        return float(metric(r.measurement, objective)[0])

    best = min(ok, key=lambda r: (value(r), complexity(r.config)))
    ties = [r for r in ok if value(r) - value(best) <= tie_tolerance(best.measurement, r.measurement, objective)]
    return min(ties, key=lambda r: (complexity(r.config), value(r)))


def pareto_front(records: Sequence[TrialRecord], axes: Sequence[str] = PARETO_AXES["pareto"]) -> list[TrialRecord]:
    """Correct records not dominated in ``axes`` (latency ↓, energy ↓, SQNR ↑), fastest first."""
    ok = [r for r in records if r.measurement.ok and all(axis_value(r.measurement, a) is not None for a in axes)]
    sign = [1.0 if AXIS_DIRECTION[a] == "minimize" else -1.0 for a in axes]

    def costs(r: TrialRecord) -> list[float]:
        return [s * float(axis_value(r.measurement, a)) for s, a in zip(sign, axes, strict=True)]

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
