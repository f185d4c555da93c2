"""What a study optimizes and how it picks: objectives, Pareto axes, the tie rule.

Objectives: ``latency`` (µs, TPE), ``energy`` (µJ per call from NVML's counter, TPE; a trial
measured without energy fails), ``pareto`` (NSGA-II over latency x SQNR) and ``pareto-energy``
(NSGA-II over latency x energy x SQNR; the CLI's ``--objective pareto --pareto-axes
latency,energy,sqnr``).  For ``energy`` the pick is the least energy under the same rules; the
Pareto objectives pick the fastest point for the DB and keep the front.

The pick over measured trials (``select_best``, ``pareto_front``) is in :mod:`.trials`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from qflash_gen.tune.measure.base import Measurement

Objective = Literal["latency", "energy", "pareto", "pareto-energy"]
OBJECTIVES: tuple[str, ...] = ("latency", "energy", "pareto", "pareto-energy")
# The axes of each Pareto objective, and their Optuna directions.
PARETO_AXES: dict[str, tuple[str, ...]] = {
    "pareto": ("latency", "sqnr"),
    "pareto-energy": ("latency", "energy", "sqnr"),
}
AXIS_DIRECTION = {"latency": "minimize", "energy": "minimize", "sqnr": "maximize"}
TIE_REL_MIN = 0.01  # ties: within max(1 %, the two spreads' mean) ...
TIE_REL_MAX = 0.02  # ... but never more than 2 % apart


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


def axis_value(m: Measurement, axis: str) -> float | None:
    if axis == "latency":
        return m.latency_us
    if axis == "energy":
        return m.energy_uj
    if axis == "sqnr":
        # NSGA-II needs finite values: an exact (infinite-SQNR) result is capped at 200 dB.
        return None if m.sqnr_db is None else min(m.sqnr_db, 200.0)
    raise ValueError(f"unknown objective axis {axis!r}")


def has_values(m: Measurement, objective: str) -> bool:
    """Correct, timed and, where the objective needs it, with an energy value."""
    return m.ok and (not needs_energy(objective) or (m.energy_uj is not None and math.isfinite(m.energy_uj)))


def values(m: Measurement, objective: str) -> float | list[float]:
    assert m.latency_us is not None and m.sqnr_db is not None
    if is_pareto(objective):
        return [float(axis_value(m, a)) for a in PARETO_AXES[objective]]
    if objective == "energy":
        assert m.energy_uj is not None
        return m.energy_uj
    return m.latency_us



def metric(m: Measurement, objective: str) -> tuple[float | None, float | None]:
    """``(value, spread)`` the pick minimizes: energy for ``energy``, latency otherwise."""
    if objective == "energy":
        return m.energy_uj, m.energy_spread_uj
    return m.latency_us, m.spread_us
