"""One Optuna study per (GPU, workload, batch): open it, take a slot, search, read the result.

The loop is Optuna's ask/tell with rules of our own:

1. **Correctness first.**  A candidate that crashes, hangs, fails to compile or differs from the
   oracle is told ``FAIL`` (with the reason in ``user_attrs["error"]``): it never becomes a
   "fast" trial.
2. **Accuracy floor.**  A correct candidate below the SQNR floor is told with its latency but a
   violated constraint, so TPE / NSGA-II learn where the floor is and the pick ignores it.
3. **No re-measurement.**  When the sampler proposes a config already measured (by this or an
   earlier, killed run, or by another process on the same storage), the trial is told the stored
   outcome (``duplicate_of``) without touching the GPU.  A config is measured only under its
   lease (:mod:`.lease`): when another process is measuring it right now, the trial is told FAIL
   with ``claimed_by`` (the samplers ignore it).  After a few such proposals in a row, an
   unmeasured config nobody is measuring is enqueued so the study keeps moving.
4. **Structure first.**  With the default ``strategy="staged"`` (latency and energy), the warm
   starts are followed by a climb along the grid's axes from the fastest config so far, tiling
   first (:mod:`.staged`); the sampler proposes once that climb has measured every move around
   its centre.  ``strategy="sampler"`` leaves everything after the warm starts to the sampler.
5. **A budget per slot.**  Each process takes a slot of the study (:mod:`.lease`) and measures
   until ``budget`` distinct configs carry its slot.  Concurrent processes each spend their own
   budget, so the study gets their sum; slot k samples with seed ``seed + k``.
6. **Resume.**  The study is ``load_if_exists``; all of the above is rebuilt from storage, so a
   rerun after a kill takes the dead process's slot and continues where it stopped, and its
   trials in flight (RUNNING, never finished) are marked failed.

How a study runs is one :class:`StudySettings` (budget, objective, floor, seed, sampler),
passed down whole.  Where the measurer compiles (the GPU's), the configs known before they are
measured -- the warm starts, then each climb stage's moves -- are compiled ahead in parallel, a
batch at a time, before the timed worker measures them (:mod:`.ahead`): nothing else changes.
Objectives and the pick: :mod:`.objective`; the trial records: :mod:`.trials`; who writes the
DB: :mod:`.db_turn`.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from qflash_gen.config import KernelConfig, single_pass
from qflash_gen.reference import SQNR_FLOOR_DB
from qflash_gen.tune import lease as lease_mod
from qflash_gen.tune import staged
from qflash_gen.tune import storage as storage_mod
from qflash_gen.tune.ahead import StudyBatches
from qflash_gen.tune.measure.base import Measurer, ShapeSpec
from qflash_gen.tune.objective import AXIS_DIRECTION, OBJECTIVES, PARETO_AXES, Objective, is_pareto
from qflash_gen.tune.space import SearchSpace
from qflash_gen.tune.trials import (
    INFEASIBLE,
    MeasuredTrials,
    SamplerName,
    StudyResult,
    TrialRecord,
    collect,
    fail_strays,
    make_sampler,
    set_constraint,
    tell,
)

STUCK_DUPLICATES = 3  # consecutive duplicate proposals before an unmeasured config is enqueued


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """How one study runs (Kernel Tuner's ``tuning_options``: one object, passed down whole).

    Attributes:
        budget: distinct configs this process's slot measures (``--trials``).
        objective: ``latency``, ``energy``, ``pareto`` or ``pareto-energy`` (:mod:`.objective`).
        sqnr_floor: the accuracy floor in dB.
        seed: sampler seed (slot k samples with ``seed + k``); None: unseeded.
        sampler: ``tpe``, ``random`` or ``nsga2``; None: ``nsga2`` for Pareto objectives, else ``tpe``.
        max_asks: a bound on trials asked (default ``20 * budget + 200``).
        strategy: ``staged`` (default: the climb of :mod:`.staged` before the sampler) or
            ``sampler`` (the sampler alone after the warm starts); Pareto objectives use the sampler.
        compile_jobs: workers that compile the warm starts and each climb stage ahead, before
            they are measured (``--compile-jobs``, :mod:`.ahead`); 0: each compiles as it is
            measured.  Only a measurer that compiles (the GPU's) uses it.
    """

    budget: int
    objective: Objective = "latency"
    sqnr_floor: float = SQNR_FLOOR_DB
    seed: int | None = 0
    sampler: SamplerName | None = None
    max_asks: int | None = None
    strategy: str = "staged"
    compile_jobs: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in staged.STRATEGIES:
            raise ValueError(f"--strategy {self.strategy!r} is unknown; choose one of {staged.STRATEGIES}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective {self.objective!r} is unknown; choose one of {OBJECTIVES}")
        if self.budget < 1:
            raise ValueError(f"--trials {self.budget} must be >= 1")
        if self.compile_jobs < 0:
            raise ValueError(f"--compile-jobs {self.compile_jobs} must be >= 0")

    @property
    def sampler_name(self) -> str:
        return self.sampler or ("nsga2" if is_pareto(self.objective) else "tpe")

    @property
    def ask_limit(self) -> int:
        return self.max_asks if self.max_asks is not None else 20 * self.budget + 200


def study_name(prefix: str, gpu: str, shape: ShapeSpec, dtype: str, space: SearchSpace, objective: str) -> str:
    """Deterministic study name: a rerun with the same arguments resumes the same study.

    The search-space hash is part of it because Optuna refuses to change a parameter's choices
    within a study (another grid is another study)."""
    obj = "" if objective == "latency" else f"/{objective}"
    return f"{prefix}/{gpu}/{shape.workload}/b{shape.batch}/{dtype}/space-{space.hash[:10]}{obj}"


def load_result(
    storage: optuna.storages.BaseStorage | str,
    name: str,
    shape: ShapeSpec,
    space: SearchSpace,
    *,
    objective: Objective = "latency",
    sqnr_floor: float = SQNR_FLOOR_DB,
) -> StudyResult:
    """The result of the study ``name`` as stored now, measuring nothing (KeyError if absent)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage_mod.as_backend(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    tracker = MeasuredTrials()
    tracker.refresh(study)
    return collect(
        study,
        tracker,
        shape=shape,
        name=name,
        objective=objective,
        sqnr_floor=sqnr_floor,
        space_size=space.size,
        t0=time.monotonic(),
        study_id=storage.get_study_id_from_name(name),
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
    sqnr_floor: float = SQNR_FLOOR_DB,
    seed: int | None = 0,
    sampler: SamplerName | None = None,
    enqueue: Sequence[KernelConfig] = (),
    on_progress: Callable[[StudyResult], None] | None = None,
    should_stop: Callable[[list[TrialRecord]], bool] | None = None,
    max_asks: int | None = None,
    worker_info: Mapping[str, Any] | None = None,
    study_attrs: Mapping[str, Any] | None = None,
    strategy: str = "staged",
    compile_jobs: int = 0,
    on_compile: Callable[[int, int], None] | None = None,
) -> StudyResult:
    """Search ``space`` for ``shape`` until this process's slot has measured ``budget`` distinct
    configs (or the space is exhausted), in the study ``name`` on ``storage`` (created or
    resumed), alongside any other process on the same study (the module doc's rules): the
    keywords make a :class:`StudySettings`, then :func:`open_study` and :meth:`StudyRun.search`.

    Args:
        enqueue: configs to try first (the DB's current best, the safe default), if the space
            holds them and they were not measured yet.
        on_progress: called after every measured trial (for progress bars).
        on_compile: called with ``(configs, jobs)`` before a batch compiles ahead (``compile_jobs``).
        should_stop: called with the measurement history after every measured trial; True ends
            the study early (the efficiency tool stops once within 3 % of the known optimum).
        worker_info: recorded on every trial this process measures (``user_attrs["measured_by"]``,
            with the slot and host added), e.g. ``{"device": "cuda:1", "device_name": ...}``.
        study_attrs: study user attributes to set (how the measurements are taken, for an export
            of the DB entry by another process).
    """
    settings = StudySettings(budget, objective, sqnr_floor, seed, sampler, max_asks, strategy, compile_jobs)
    run = open_study(shape, space, storage=storage, name=name, settings=settings, worker_info=worker_info,
                     study_attrs=study_attrs)  # fmt: skip
    with run:
        return run.search(
            measurer, enqueue=enqueue, on_progress=on_progress, should_stop=should_stop, on_compile=on_compile
        )


def open_study(
    shape: ShapeSpec,
    space: SearchSpace,
    *,
    storage: optuna.storages.BaseStorage | str,
    name: str,
    settings: StudySettings,
    worker_info: Mapping[str, Any] | None = None,
    study_attrs: Mapping[str, Any] | None = None,
) -> StudyRun:
    """Create or load the study and take a slot in it (see :func:`run_study`).

    ``qflash-tune`` opens all its studies before it searches the first, so that processes started
    together hold one slot each in every study, however far apart their progress drifts: one
    that reached a study late still spends its own budget there, instead of taking over the slot
    of one that already finished it (which is what a *rerun* does, by design)."""
    objective = settings.objective
    directions = [AXIS_DIRECTION[a] for a in PARETO_AXES[objective]] if is_pareto(objective) else ["minimize"]
    population = max(4, min(50, settings.budget // 4))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backend = storage_mod.as_backend(storage)
    study = optuna.create_study(
        storage=backend,
        study_name=name,
        sampler=make_sampler(settings.sampler_name, settings.seed, population_size=population),
        directions=directions,
        load_if_exists=True,
    )
    if not study.user_attrs.get("space_hash"):
        study.set_user_attr("space_hash", space.hash)
        study.set_user_attr("shape", shape.to_dict())
        study.set_user_attr("space_size", space.size)
    for key, value in (study_attrs or {}).items():
        study.set_user_attr(key, value)
    storage_mod.label_study(study, PARETO_AXES.get(objective, (objective,)), settings.sqnr_floor)  # dashboard
    storage_mod.fail_abandoned(study)
    lease_mod.sweep_once(backend)  # leases a killed run left in other studies, or of deleted ones

    study_id = backend.get_study_id_from_name(name)
    info = {k: v for k, v in (worker_info or {}).items() if k in ("device", "device_name")}
    leases = lease_mod.Leases(backend, study_id, info=info)
    try:
        slot = leases.claim_slot()  # before reaping: a dead process's slot is resumed, not freed
        leases.info["worker"] = slot
        leases.reap_dead()  # config leases of dead processes: their configs are free again
        if not leases.live(lease_mod.SLOT):
            fail_strays(study)
    except BaseException:
        leases.close()
        raise
    if slot and settings.seed is not None:
        study.sampler = make_sampler(settings.sampler_name, settings.seed + slot, population_size=population)
    measured_by = {"worker": slot, "host": storage_mod.owner_tag().rpartition(":")[0], **(worker_info or {})}
    return StudyRun(
        study=study,
        leases=leases,
        shape=shape,
        space=space,
        slot=slot,
        study_id=study_id,
        name=name,
        settings=settings,
        measured_by=measured_by,
    )


@dataclasses.dataclass
class StudyRun:
    """A study opened by this process (:func:`open_study`), holding slot ``slot`` until
    :meth:`close` (or the end of :meth:`search`)."""

    study: optuna.Study
    leases: lease_mod.Leases
    shape: ShapeSpec
    space: SearchSpace
    slot: int
    study_id: int
    name: str
    settings: StudySettings
    measured_by: dict[str, Any]

    def search(
        self,
        measurer: Measurer,
        *,
        enqueue: Sequence[KernelConfig] = (),
        on_progress: Callable[[StudyResult], None] | None = None,
        should_stop: Callable[[list[TrialRecord]], bool] | None = None,
        on_compile: Callable[[int, int], None] | None = None,
    ) -> StudyResult:
        """Run the search (the module doc's rules), then give the slot back."""
        try:
            ahead = StudyBatches(measurer, self.shape, self.settings.compile_jobs, on_compile)
            return _search(self, measurer, enqueue, on_progress, should_stop, ahead)
        finally:
            self.close()

    def close(self) -> None:
        """Release the slot (and any lease still held); idempotent."""
        self.leases.close()

    def __enter__(self) -> StudyRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _enqueue_warm(study: optuna.Study, space: SearchSpace, warm: Sequence[KernelConfig]) -> None:
    """Enqueue the warm starts (none measured yet), each once: not where a trial of it waits, runs
    or was pruned (infeasible), but again where its trials all failed unmeasured (a run interrupted
    or killed while measuring it: Optuna's ``skip_if_exists`` would skip it for good, and a resumed
    study would never measure the runtime's current pick it enqueued first)."""
    tried = [
        t.system_attrs.get("fixed_params", t.params)
        for t in study.get_trials(deepcopy=False)
        if t.state != TrialState.FAIL
    ]
    for config in warm:
        params = space.params_for(config)
        if params not in tried:
            study.enqueue_trial(params)
            tried.append(params)


def _search(
    run: StudyRun,
    measurer: Measurer,
    enqueue: Sequence[KernelConfig],
    on_progress: Callable[[StudyResult], None] | None,
    should_stop: Callable[[list[TrialRecord]], bool] | None,
    ahead: StudyBatches,
) -> StudyResult:
    study, leases, shape, space, slot = run.study, run.leases, run.shape, run.space, run.slot
    settings = run.settings
    objective, sqnr_floor, budget = settings.objective, settings.sqnr_floor, settings.budget
    measured_by, t0 = run.measured_by, time.monotonic()
    tracker = MeasuredTrials()
    tracker.refresh(study)
    measured = tracker.by_hash  # every measured config of the study: earlier runs and other processes too
    warm = [c for c in enqueue if space.params_for(c) is not None and c.hash not in measured]
    _enqueue_warm(study, space, warm)

    rng = random.Random(settings.seed if settings.seed is None else settings.seed + slot)
    owner = storage_mod.owner_tag()
    kernels = space.kernel_hashes  # a single pass's rescale twins are one kernel (SearchSpace.canonical)
    new = 0
    duplicates_in_row = 0
    asks = 0

    def result() -> StudyResult:
        return collect(
            study,
            tracker,
            shape=shape,
            name=run.name,
            objective=objective,
            sqnr_floor=sqnr_floor,
            space_size=space.size,
            t0=t0,
            new=new,
            slot=slot,
            study_id=run.study_id,
        )

    def measured_kernels() -> set[str]:
        return {space.canonical(r.config).hash for r in measured.values()}

    def twin_of(config: KernelConfig) -> TrialRecord | None:
        """A measured config that runs the same kernel as ``config`` (a single pass's rescale twin)."""
        if not single_pass(config, space.n):
            return None  # only a single pass has twins
        canon = space.canonical(config)
        return next((r for r in measured.values() if space.canonical(r.config) == canon), None)

    def unstick() -> bool:
        """Enqueue an unmeasured config nobody is measuring; False if there is none left."""
        done = measured_kernels()
        configs = zip(space.configs(), space.hash_list, strict=True)
        left = [(c, h) for c, h in configs if space.canonical(c).hash not in done]
        if left:
            busy = {info.key for info in leases.live(lease_mod.CONFIG)}
            left = [(c, h) for c, h in left if h not in busy]
        if not left:
            return False
        params = space.params_for(rng.choice(left)[0])
        if params is not None:
            study.enqueue_trial(params)
        return True

    climb = staged.Climb(space, sqnr_floor, objective) if settings.strategy == "staged" else None
    if is_pareto(objective):
        climb = None

    def taken(config: KernelConfig) -> bool:  # being measured by another process now
        return lease_mod.holder_alive(leases.holder_of(lease_mod.CONFIG, config.hash))

    done = measured_kernels()
    ahead([c for c in warm if space.canonical(c).hash not in done], budget - tracker.count(slot))
    while tracker.count(slot) < budget and asks < settings.ask_limit:
        if kernels <= measured_kernels():
            break  # every feasible config (or its twin) is measured: the search is exhaustive
        asks += 1
        if climb and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            tracker.refresh(study)
            records = sorted(measured.values(), key=lambda r: r.number)
            steps = climb.propose(records, taken=taken)
            if steps:  # none: a local optimum of the axes, the sampler proposes
                ahead(steps, budget - tracker.count(slot))  # the stage's moves, compiled as one batch
                study.enqueue_trial(space.params_for(steps[0]))
        trial = study.ask(space.distributions)
        trial.set_user_attr("owner", owner)
        trial.set_user_attr("worker", slot)
        config, reason = space.config_from_params(trial.params)
        if reason is not None:  # infeasible before measuring (shared memory): nothing to run
            trial.set_user_attr("infeasible", reason)
            set_constraint(trial, INFEASIBLE)
            study.tell(trial, state=TrialState.PRUNED)
            continue
        config_hash = config.hash
        tracker.refresh(study)  # measurements by other processes on the same storage
        prior = measured.get(config_hash) or twin_of(config)
        if prior is None:
            if not leases.acquire(lease_mod.CONFIG, config_hash, trial=trial.number):
                # Another process is measuring it right now: skip it (FAIL: no sampler learns from it).
                holder = leases.holder_of(lease_mod.CONFIG, config_hash) or {}
                trial.set_user_attr("config", config.to_dict())
                trial.set_user_attr("config_hash", config_hash)
                trial.set_user_attr("claimed_by", {k: holder.get(k) for k in ("trial", "worker", "host", "device")})
                study.tell(trial, state=TrialState.FAIL)
                duplicates_in_row += 1
                if duplicates_in_row >= STUCK_DUPLICATES:
                    duplicates_in_row = 0
                    if not unstick():
                        break  # what is left is being measured by other processes
                continue
            tracker.refresh(study)  # measured by someone who released the lease just before we took it?
            prior = measured.get(config_hash) or twin_of(config)
            if prior is not None:
                leases.release(lease_mod.CONFIG, config_hash)
        if prior is not None:
            tell(
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
                    break  # what is left is being measured by other processes
            continue
        duplicates_in_row = 0
        try:
            m = measurer.measure(config, shape)
        except BaseException as exc:  # the measurer itself broke (not the candidate): end the trial, stop
            trial.set_user_attr("error", f"measurer failed: {type(exc).__name__}: {exc}"[:500])
            study.tell(trial, state=TrialState.FAIL)
            leases.release(lease_mod.CONFIG, config_hash)
            raise
        told = tell(
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
