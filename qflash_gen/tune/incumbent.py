"""The runtime's current pick for a study's key, and what a run's winner improves on (issue 17).

Before a run writes anything, ``get_kernel`` already answers for every key: an exact entry, a
nearest bucket, a sibling card's entry, or the default (``Kernel.why``).  A tuning run must never
make that worse: on an H200 with a stale DB, a 50-trial study once wrote a config 1.55x slower
than the H100 entry the runtime was already running, and the fresh exact entry then won the
lookup.  So each study

* measures the current pick first, under the run's protocol (:mod:`.plan` enqueues it; where the
  space cannot hold it, :func:`measure_outside` measures it once and stores the result on the
  study), and
* writes its winner only where it is faster than that measurement (:func:`judge`): when nothing
  measured beats the current pick, the DB keeps it (an exact entry stays as it is; a pick from
  a sibling, a nearer bucket or the default is written as this GPU's exact entry, with the
  measurement taken here), and the summary says which.

On a GPU, one measurement of the current pick taken first in a study can be a cold one, so the
decision there rests on a final head-to-head instead (:mod:`.headtohead`, :func:`head_to_head`):
the study's best and the current pick measured again, alternating, and compared by their
medians; where they are within noise of each other (the tie rule of :mod:`.objective`:
``TIE_REL_MIN`` / ``TIE_REL_MAX``) the current pick is kept as above, and ``vs current`` is the
ratio of the two medians.  A replayed table (``--simulate``) decides from the study's records.

The pick is stored on the study (``user_attrs["current_pick"]``), and so is the head-to-head
(``user_attrs["head_to_head"]``), so ``--export`` and the other processes of a tuning farm judge
against the same one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qflash_gen import db
from qflash_gen.config import KernelConfig, default_config
from qflash_gen.tune import headtohead
from qflash_gen.tune.headtohead import HEAD_TO_HEAD_ATTR, HeadToHead
from qflash_gen.tune.measure.base import Measurement, Measurer, ShapeSpec
from qflash_gen.tune.measure.simulate import NOT_RECORDED
from qflash_gen.tune.objective import has_values, metric
from qflash_gen.tune.space import SearchSpace
from qflash_gen.tune.trials import StudyResult, TrialRecord, tie_tolerance

CURRENT_ATTR = "current_pick"  # study user attribute


@dataclasses.dataclass(frozen=True)
class CurrentPick:
    """What ``get_kernel`` returns for a study's key before the run writes.

    Attributes:
        config: the config the runtime runs.
        why: ``Kernel.why`` (``exact``, ``nearest:<key>``, ``sibling:<gpu>:...``, ``default``).
        origin: the DB file of the entry (None for the default).
        measurement: this run's measurement of ``config`` where the study's space cannot hold it
            (:func:`measure_outside`); None when it is one of the study's trials.
    """

    config: KernelConfig
    why: str
    origin: str | None = None
    measurement: Measurement | None = None

    def to_attr(self) -> dict[str, Any]:
        out: dict[str, Any] = {"config": self.config.to_dict(), "why": self.why, "origin": self.origin}
        if self.measurement is not None:
            out["measurement"] = self.measurement.to_dict()
        return out

    @classmethod
    def from_attr(cls, data: Any) -> CurrentPick | None:
        if not isinstance(data, Mapping) or not isinstance(data.get("config"), Mapping):
            return None
        try:
            config = KernelConfig.from_dict(dict(data["config"]))
        except (TypeError, ValueError):
            return None
        m = data.get("measurement")
        return cls(
            config=config,
            why=str(data.get("why") or "?"),
            origin=data.get("origin"),
            measurement=Measurement.from_dict(m) if isinstance(m, Mapping) else None,
        )

    def label(self) -> str:
        return f"{self.why} {self.config.short()}"


def runtime_db(db_dir: Path) -> db.TuningDB:
    """The DB the runtime reads when this run's DB directory is its user layer: the shipped DB,
    then ``db_dir`` on top."""
    shipped = db.shipped_db_dir()
    same = db_dir.resolve() == shipped.resolve() if db_dir.exists() else False
    return db.TuningDB([shipped] if same else [shipped, db_dir])


def current_pick(shape: ShapeSpec, dtype: str, gpu: str, db_dir: Path) -> CurrentPick | None:
    """``get_kernel``'s answer for ``shape`` on ``gpu`` (shipped DB + ``db_dir``), or None for a GPU
    name the runtime does not know (a synthetic table's).  A corrupt DB file raises ``DBError``."""
    from qflash_gen.kernel import get_kernel

    try:
        kern = get_kernel(
            shape.shape, dtype=dtype, masked=shape.masked, out_dtype=dtype, gpu=gpu, db=runtime_db(db_dir)
        )
    except db.DBError:
        raise
    except ValueError:  # not a known GPU and no DB file for it
        return None
    return CurrentPick(kern.config, kern.why, None if kern.origin is None else str(kern.origin))


def measure_outside(current: CurrentPick, space: SearchSpace, measurer: Measurer, shape: ShapeSpec) -> CurrentPick:
    """``current`` with a measurement of its config when the space holds no equivalent of it (a
    narrower ``--grid`` or ``--p-bits``, a replayed table's grid); unchanged otherwise."""
    if current.measurement is not None or in_space(current.config, space):
        return current
    return dataclasses.replace(current, measurement=measurer.measure(current.config, shape))


def settle(
    study: Any, current: CurrentPick | None, space: SearchSpace, measurer: Measurer, shape: ShapeSpec
) -> CurrentPick | None:
    """Record ``current`` on the Optuna ``study`` (measured first where the space cannot hold it;
    a measurement stored by an earlier run of the same pick is reused), and return it."""
    if current is None:
        return CurrentPick.from_attr(study.user_attrs.get(CURRENT_ATTR))
    stored = CurrentPick.from_attr(study.user_attrs.get(CURRENT_ATTR))
    if stored is not None and stored.config == current.config and stored.measurement is not None:
        current = dataclasses.replace(current, measurement=stored.measurement)
    current = measure_outside(current, space, measurer, shape)
    study.set_user_attr(CURRENT_ATTR, current.to_attr())
    return current


def in_space(config: KernelConfig, space: SearchSpace) -> bool:
    return space.params_for(space.canonical(config)) is not None


def head_to_head(
    study: Any,
    result: StudyResult,
    space: SearchSpace,
    current: CurrentPick | None,
    measurer: Measurer,
    *,
    floor: float,
    objective: str = "latency",
) -> HeadToHead | None:
    """The final head-to-head of the study's best and the current pick (:mod:`.headtohead`),
    measured now and stored on the Optuna ``study``; None (nothing measured) for a measurer
    without rounds (a replayed table), without a best or a current pick, where they are one
    config, or where the current pick fails in the study (it is replaced without a contest).

    A resumed run that measured nothing new in the study gets the head-to-head an earlier run
    stored there, where it is of the same two configs and every round measured
    (``HeadToHead.earlier``): it is not measured again."""
    best = result.best
    if measurer.head_to_head_rounds < 1 or best is None or current is None:
        return None
    if space.equivalent(best.config, current.config):
        return None
    cur = _find(result, space, current.config)
    m = cur.measurement if cur is not None else current.measurement
    if m is None or not (m.feasible(floor) and has_values(m, objective)):
        return None
    stored = stored_head_to_head(study.user_attrs)
    if (
        result.new_measurements == 0
        and stored is not None
        and stored.ok
        and (stored.best, stored.current) == (best.config, current.config)
    ):
        return stored
    duel = headtohead.measure(measurer, result.shape, best.config, current.config)
    study.set_user_attr(HEAD_TO_HEAD_ATTR, duel.to_attr())
    return duel


def stored_head_to_head(attrs: Mapping[str, Any]) -> HeadToHead | None:
    """The head-to-head stored on a study (its ``user_attrs``), for ``--export``."""
    return HeadToHead.from_attr(attrs.get(HEAD_TO_HEAD_ATTR))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a study's DB entry is, and what it improves on.

    ``pick``: the record the entry holds (None: no config meets the floor); ``write``: False
    when the runtime's exact entry stays as it is; ``current`` / ``default``: the runtime's pick
    and the default config as measured in this study (None: not measured); ``note``: one line
    for the summary; ``current_why``: how the runtime found its pick (``Kernel.why``)."""

    pick: TrialRecord | None
    write: bool
    current: TrialRecord | None
    default: TrialRecord | None
    note: str
    objective: str = "latency"
    current_why: str | None = None  # Kernel.why of the runtime's pick (None: not looked up)
    head_to_head: HeadToHead | None = None  # the decision's evidence where there was one (pick, current: its medians)

    def ratio(self, other: TrialRecord | None) -> float | None:
        """``other``'s value over the pick's (> 1: the pick is faster)."""
        if other is None or self.pick is None or not other.measurement.ok:
            return None
        mine, theirs = _value(self.pick, self.objective), _value(other, self.objective)
        return None if mine is None or theirs is None or mine <= 0 else theirs / mine


def _value(r: TrialRecord, objective: str) -> float | None:
    return metric(r.measurement, objective)[0]


def _find(result: StudyResult, space: SearchSpace, config: KernelConfig) -> TrialRecord | None:
    return next((r for r in result.history if space.equivalent(r.config, config)), None)


def judge(
    result: StudyResult,
    space: SearchSpace,
    current: CurrentPick | None,
    *,
    floor: float,
    objective: str = "latency",
    duel: HeadToHead | None = None,
) -> Verdict:
    """The DB entry of a study: its pick, unless the runtime's current pick measured at least as
    fast in the same study (see the module doc); with a head-to-head of this best and this
    current pick (``duel``), from its medians instead, a tie keeping the current pick."""
    n, d = result.shape.n, result.shape.d
    default = _find(result, space, default_config(n, d))
    cur = None
    if current is not None:
        cur = _find(result, space, current.config)
        if cur is None and current.measurement is not None:
            cur = TrialRecord(-1, current.config, current.measurement)
    best = result.best

    def verdict(pick: TrialRecord | None, write: bool, note: str) -> Verdict:
        return Verdict(pick, write, cur, default, note, objective, None if current is None else current.why)

    if best is None:
        return verdict(None, False, "no config meets the floor: nothing written")
    if current is None:
        return verdict(
            best,
            True,
            "no runtime pick to compare with (not looked up: --warm-start none, or a GPU the runtime does not know)",
        )
    what = f"the runtime's pick ({current.why}, {current.config.short()})"
    if cur is None:
        return verdict(best, True, f"{what} was not measured in this study")
    m = cur.measurement
    if m.error == NOT_RECORDED:
        return verdict(best, True, f"{what} is not in the replayed table: not compared")
    if not (m.feasible(floor) and has_values(m, objective)):
        why = m.error if not m.ok else f"SQNR {m.sqnr_db:.1f} dB below the {floor:g} dB floor"
        return verdict(best, True, f"{what} fails here ({why}); the entry replaces it")
    after = ""
    if duel is not None and duel.best == best.config and duel.current == current.config:
        decided = _by_head_to_head(duel, best, cur, default, current, what, objective)
        if decided is not None:
            return decided
        after = f" (in the study's records; {duel.describe()})"
    if space.equivalent(best.config, cur.config) or _value(cur, objective) <= _value(best, objective):
        if current.why == "exact":
            return verdict(cur, False, f"{what} is the fastest measured{after}: the DB keeps it, nothing written")
        return verdict(cur, True, f"{what} is the fastest measured{after}: written as this GPU's exact entry")
    ratio = _value(cur, objective) / _value(best, objective)
    return verdict(best, True, f"improves on {what} by {ratio:.2f}x{after}")


def _by_head_to_head(
    duel: HeadToHead,
    best: TrialRecord,
    cur: TrialRecord,
    default: TrialRecord | None,
    current: CurrentPick,
    what: str,
    objective: str,
) -> Verdict | None:
    """:func:`judge`'s decision from a head-to-head (None where a round failed): the records
    carry its medians (an entry is written with them); within noise of the best (the tie rule),
    the current pick is kept."""
    b, c = duel.best_median, duel.current_median
    if b is None or c is None or not (has_values(b, objective) and has_values(c, objective)):
        return None
    said = duel.describe("uJ" if objective == "energy" else "us")
    first = cur  # the current pick as measured in the study
    best = dataclasses.replace(best, measurement=b)
    cur = dataclasses.replace(cur, measurement=c)
    if default is not None and default.number == first.number:
        default = cur  # the default config is the current pick: the same medians
    in_study = ""
    if abs(_value(first, objective) - _value(cur, objective)) > tie_tolerance(c, first.measurement, objective):
        in_study = f"; the study's one measurement of it: {_value(first, objective):.2f}"
    if _value(cur, objective) - _value(best, objective) <= tie_tolerance(b, c, objective):
        keep = "the DB keeps it, nothing written" if current.why == "exact" else "written as this GPU's exact entry"
        if _value(cur, objective) <= _value(best, objective):
            note = f"{what} is the fastest measured ({said}{in_study}): {keep}"
        else:
            note = f"{what} ties with the best ({said}{in_study}; a tie: within max(1 %, the spreads), <= 2 %): {keep}"
        return Verdict(cur, current.why != "exact", cur, default, note, objective, current.why, duel)
    ratio = _value(cur, objective) / _value(best, objective)
    note = f"improves on {what} by {ratio:.2f}x ({said}{in_study})"
    return Verdict(best, True, cur, default, note, objective, current.why, duel)
