"""The final head-to-head of a study (issue 17): its best config against the runtime's current pick.

A study measures the current pick first (:mod:`.plan`), so on a GPU that has been idle that one
measurement can be the coldest of the run: on an H200 the first three timings of a study came
out 3-4x slow with spreads of 10-29 µs, and the summary then claimed a "4.19x" improvement on a
pick that runs as fast as the winner.  So before the DB decision a measurer whose numbers drift
(the GPU's: ``Measurer.head_to_head_rounds`` > 0) measures the two again, back to back and
alternating (best, current, best, current, ...), and :func:`qflash_gen.tune.incumbent.judge`
decides, and computes ``vs current``, from the two medians.  A replayed table
(``--simulate``) has no such rounds: its numbers are the recorded ones whatever the order.

The head-to-head is stored on the study (``user_attrs["head_to_head"]``) so ``--export``
decides from it too.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping
from typing import Any

from qflash_gen.config import KernelConfig
from qflash_gen.tune.measure.base import ENERGY_FIELDS, Measurement, Measurer, ShapeSpec

HEAD_TO_HEAD_ATTR = "head_to_head"  # study user attribute


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if len(got) == len(values) and got else None


def median_of(runs: tuple[Measurement, ...]) -> Measurement | None:
    """One measurement from a config's rounds: the median of their medians (and of their
    spreads, and of their energies where each has one); None when a round failed."""
    if not runs or not all(m.ok for m in runs):
        return None
    first = runs[0]
    energy = {k: _median([getattr(m, k) for m in runs]) for k in ENERGY_FIELDS}
    return Measurement(
        latency_us=_median([m.latency_us for m in runs]),
        spread_us=_median([m.spread_us for m in runs]),
        sqnr_db=first.sqnr_db,
        correct=True,
        error=None,
        **energy,
    )


@dataclasses.dataclass(frozen=True)
class HeadToHead:
    """The study's best config and the current pick, each measured ``rounds`` times, alternating."""

    best: KernelConfig
    current: KernelConfig
    best_runs: tuple[Measurement, ...]
    current_runs: tuple[Measurement, ...]
    earlier: bool = dataclasses.field(default=False, compare=False)  # read back from a study, not measured now

    @property
    def rounds(self) -> int:
        return len(self.best_runs)

    @property
    def best_median(self) -> Measurement | None:
        return median_of(self.best_runs)

    @property
    def current_median(self) -> Measurement | None:
        return median_of(self.current_runs)

    @property
    def ok(self) -> bool:
        """Every round of both measured: the medians decide."""
        return self.best_median is not None and self.current_median is not None

    def describe(self, unit: str = "us") -> str:
        """``head-to-head, 3 rounds each, alternating: best 8.80 vs current 8.91 us (medians)``."""
        b, c = self.best_median, self.current_median
        if b is None or c is None:
            return f"head-to-head, {self.rounds} rounds each: a round failed"
        value = (lambda m: m.energy_uj) if unit == "uJ" else (lambda m: m.latency_us)
        return (
            f"head-to-head, {self.rounds} rounds each, alternating: "
            f"best {value(b):.2f} vs current {value(c):.2f} {unit} (medians)"
        )

    def to_attr(self) -> dict[str, Any]:
        return {
            "best": self.best.to_dict(),
            "current": self.current.to_dict(),
            "best_runs": [m.to_dict() for m in self.best_runs],
            "current_runs": [m.to_dict() for m in self.current_runs],
        }

    @classmethod
    def from_attr(cls, data: Any) -> HeadToHead | None:
        if not isinstance(data, Mapping):
            return None
        try:
            return cls(
                best=KernelConfig.from_dict(dict(data["best"])),
                current=KernelConfig.from_dict(dict(data["current"])),
                best_runs=tuple(Measurement.from_dict(m) for m in data["best_runs"]),
                current_runs=tuple(Measurement.from_dict(m) for m in data["current_runs"]),
                earlier=True,
            )
        except (KeyError, TypeError, ValueError):
            return None

    def evidence(self) -> dict[str, Any]:
        """What a DB entry records of it (``protocol.tuner.head_to_head``)."""
        b, c = self.best_median, self.current_median
        return {
            "rounds": self.rounds,
            "order": "alternating, best first",
            "best": {"config": self.best.short(), "latency_us": [m.latency_us for m in self.best_runs],
                     "median_us": None if b is None else b.latency_us},
            "current_pick": {"config": self.current.short(), "latency_us": [m.latency_us for m in self.current_runs],
                             "median_us": None if c is None else c.latency_us},
        }  # fmt: skip


def measure(measurer: Measurer, shape: ShapeSpec, best: KernelConfig, current: KernelConfig) -> HeadToHead:
    """``measurer.head_to_head_rounds`` rounds of ``best`` then ``current``, back to back."""
    best_runs, current_runs = [], []
    for _ in range(measurer.head_to_head_rounds):
        best_runs.append(measurer.measure(best, shape))
        current_runs.append(measurer.measure(current, shape))
    return HeadToHead(best, current, tuple(best_runs), tuple(current_runs))
