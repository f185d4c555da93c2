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
   without touching the GPU.  After a few duplicates in a row, an unmeasured config is enqueued so
   the study keeps moving.  The budget counts *measured* configs.
4. **Resume.**  The study is ``load_if_exists``; all of the above is rebuilt from storage, so a
   rerun after a kill continues where the killed run stopped, and its trials in flight (RUNNING,
   never finished) are marked failed.

The pick (:func:`select_best`): the fastest feasible trial, except that a simpler config
(:func:`qflash_gen.tune.space.complexity`) within measurement noise of it wins the tie.
"""

from __future__ import annotations

import dataclasses
import random
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import optuna
from optuna.trial import TrialState

from qflash_gen.config import KernelConfig
from qflash_gen.tune import storage as storage_mod
from qflash_gen.tune.measure import Measurement, Measurer, ShapeSpec
from qflash_gen.tune.space import SearchSpace, complexity

Objective = Literal["latency", "pareto"]
SamplerName = Literal["tpe", "random", "nsga2"]
OBJECTIVES: tuple[str, ...] = ("latency", "pareto")
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

    @property
    def latency_us(self) -> float | None:
        return self.measurement.latency_us

    @property
    def sqnr_db(self) -> float | None:
        return self.measurement.sqnr_db


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

    @property
    def n_measured(self) -> int:
        return len(self.history)

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
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, **constraints)
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
    return TrialRecord(t.number, config, Measurement.from_dict(ua))


class _Measured:
    """config hash → first measured record, over the finished trials in storage (incremental:
    each trial is read once, so polling it before every measurement stays cheap)."""

    _FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)

    def __init__(self) -> None:
        self.by_hash: dict[str, TrialRecord] = {}
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

    def add(self, config_hash: str, rec: TrialRecord) -> None:
        self._seen.add(rec.number)
        self.by_hash.setdefault(config_hash, rec)


def _values(m: Measurement, objective: str) -> float | list[float]:
    assert m.latency_us is not None and m.sqnr_db is not None
    if objective == "pareto":
        # NSGA-II needs finite values: an exact (infinite-SQNR) result is capped at 200 dB.
        return [m.latency_us, min(m.sqnr_db, 200.0)]
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
) -> None:
    attrs = {
        "config": config.to_dict(),
        "config_hash": config_hash,
        "config_short": config.short(),
        **m.to_dict(),
        **extra,
    }
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    if m.ok:
        _set_constraint(trial, floor - float(m.sqnr_db))  # <= 0: feasible
    if m.ok:
        study.tell(trial, _values(m, objective))
    else:
        study.tell(trial, state=TrialState.FAIL)


def tie_tolerance(best: Measurement, other: Measurement) -> float:
    """How far (µs) ``other`` may be above ``best`` and still tie with it (measurement noise)."""
    assert best.latency_us is not None
    spread = 0.5 * ((best.spread_us or 0.0) + (other.spread_us or 0.0))
    return min(max(TIE_REL_MIN * best.latency_us, spread), TIE_REL_MAX * best.latency_us)


def select_best(records: Sequence[TrialRecord], sqnr_floor: float) -> TrialRecord | None:
    """The fastest record at or above the floor; a simpler one within noise wins the tie."""
    ok = [r for r in records if r.measurement.feasible(sqnr_floor)]
    if not ok:
        return None
    fastest = min(ok, key=lambda r: (r.latency_us, complexity(r.config)))
    ties = [r for r in ok if r.latency_us - fastest.latency_us <= tie_tolerance(fastest.measurement, r.measurement)]
    return min(ties, key=lambda r: (complexity(r.config), r.latency_us))


def pareto_front(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Correct records not dominated in (latency ↓, SQNR ↑), fastest first."""
    ok = [r for r in records if r.measurement.ok]
    front = []
    for r in ok:
        dominated = any(
            o.latency_us <= r.latency_us
            and o.sqnr_db >= r.sqnr_db
            and (o.latency_us < r.latency_us or o.sqnr_db > r.sqnr_db)
            for o in ok
        )
        if not dominated:
            front.append(r)
    unique: dict[str, TrialRecord] = {}
    for r in sorted(front, key=lambda r: (r.latency_us, -r.sqnr_db)):
        unique.setdefault(r.config.hash, r)
    return list(unique.values())


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
) -> StudyResult:
    """Search ``space`` for ``shape`` until ``budget`` distinct configs are measured (or the space
    is exhausted), in the study ``name`` on ``storage`` (created or resumed).

    Args:
        enqueue: configs to try first (the DB's current best, the safe default), if the space
            holds them and they were not measured yet.
        sampler: default ``tpe`` for ``objective="latency"``, ``nsga2`` for ``"pareto"``.
        on_progress: called after every measured trial (for progress bars).
        should_stop: called with the measurement history after every measured trial; True ends
            the study early (the efficiency tool stops once within 3 % of the known optimum).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective {objective!r} is unknown; choose one of {OBJECTIVES}")
    if budget < 1:
        raise ValueError(f"--trials {budget} must be >= 1")
    t0 = time.monotonic()
    sampler = sampler or ("nsga2" if objective == "pareto" else "tpe")
    directions = ["minimize", "maximize"] if objective == "pareto" else ["minimize"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        sampler=make_sampler(sampler, seed, population_size=max(4, min(50, budget // 4))),
        directions=directions,
        load_if_exists=True,
    )
    if not study.user_attrs.get("space_hash"):
        study.set_user_attr("space_hash", space.hash)
        study.set_user_attr("shape", shape.to_dict())
        study.set_user_attr("space_size", space.size)
    storage_mod.fail_abandoned(study)

    tracker = _Measured()
    tracker.refresh(study)
    measured = tracker.by_hash  # every measured config of the study: earlier runs and other workers too
    for config in enqueue:
        params = space.params_for(config)
        if params is not None and config.hash not in measured:
            study.enqueue_trial(params, skip_if_exists=True)

    rng = random.Random(seed)
    owner = storage_mod.owner_tag()
    space_hashes = space.hashes
    new = 0
    duplicates_in_row = 0
    asks = 0
    max_asks = max_asks if max_asks is not None else 20 * budget + 200

    def history() -> list[TrialRecord]:
        return sorted(measured.values(), key=lambda r: r.number)

    def result() -> StudyResult:
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED))
        done = history()
        return StudyResult(
            shape=shape,
            study_name=name,
            objective=objective,
            sqnr_floor=sqnr_floor,
            best=select_best(done, sqnr_floor),
            front=pareto_front(done),
            history=done,
            n_trials=len(finished),
            space_size=space.size,
            wall_s=time.monotonic() - t0,
            new_measurements=new,
        )

    while len(measured) < budget and asks < max_asks:
        if space_hashes <= measured.keys():
            break  # every feasible config is measured: the search is exhaustive
        asks += 1
        trial = study.ask(space.distributions)
        trial.set_user_attr("owner", owner)
        config, reason = space.config_from_params(trial.params)
        if reason is not None:  # infeasible before measuring (shared memory): nothing to run
            trial.set_user_attr("infeasible", reason)
            _set_constraint(trial, INFEASIBLE)
            study.tell(trial, state=TrialState.PRUNED)
            continue
        config_hash = config.hash
        tracker.refresh(study)  # measurements by other workers on the same storage
        prior = measured.get(config_hash)
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
                left = [c for c, h in zip(space.configs(), space.hash_list, strict=True) if h not in measured]
                if left:
                    params = space.params_for(rng.choice(left))
                    if params is not None:
                        study.enqueue_trial(params)
                duplicates_in_row = 0
            continue
        duplicates_in_row = 0
        try:
            m = measurer.measure(config, shape)
        except BaseException as exc:  # the measurer itself broke (not the candidate): end the trial, stop
            trial.set_user_attr("error", f"measurer failed: {type(exc).__name__}: {exc}"[:500])
            study.tell(trial, state=TrialState.FAIL)
            raise
        _tell(study, trial, config, config_hash, m, objective, sqnr_floor, {"measured": True})
        tracker.add(config_hash, TrialRecord(trial.number, config, m))
        new += 1
        if on_progress is not None:
            on_progress(result())
        if should_stop is not None and should_stop(history()):
            break
    return result()
