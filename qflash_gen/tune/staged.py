"""The staged neighbourhood search: what a study measures between its warm starts and the sampler.

A ``tune`` grid holds tens of thousands of configs per workload; a default run measures 50.  A
flat sampler (TPE) sees 0.1 % of such a grid, and an H200 run that way wrote a config 1.55x
slower than the one the runtime already used (issue 17).  The grid has a structure the sampler
does not know: the tiling (``block_n``: a single pass or not; ``block_m``; warps; stages) decides
most of the latency, the numeric variants (exp, rescale, P width) trade a few percent against
accuracy, and the launch options (register cap, heads per program) pay off only on a good tiling
(docs/perf-notes.md).  So, after the warm starts (:mod:`.plan`), the study climbs from the
fastest feasible config measured so far (the centre), in stages:

1. **tiling**: every one-axis move of ``block_n``, ``block_m``, ``num_warps``, ``num_stages``;
2. **numeric variants**: ``exp``, ``rescale``, ``p_bits`` (and ``acc_bits`` where searched);
3. **launch options**: each register cap, each with 1 and 2+ heads per program (2+ heads only
   pay with a pipelined loop, so they come with ``num_stages >= 2``).

A move to a config that runs the same kernel as one measured (a single pass's rescale twins,
``SearchSpace.equivalent``) is not made.

``Climb.propose`` returns the unmeasured moves of the earliest stage around the centre that has
any: the study measures the first, and compiles the stage's moves ahead as one batch
(:mod:`.ahead`).  Once a stage's moves are all measured, the best config so far (a feasible one
beats any below the SQNR floor; before any is feasible, the fastest correct one leads) becomes
the centre and the climb starts again at its tiling.  Around a centre below the floor, the
numeric and the tiling moves are one first stage, numeric first (both can lift SQNR: a single
pass is more accurate).  When every move around the centre is measured and none is better (a
local optimum of the grid's axes) it returns none and the sampler proposes; a better config the
sampler finds restarts the climb.  The only state is the centre: a resumed study, or
another process on the same study, climbs from the best config stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from qflash_gen.config import KernelConfig
from qflash_gen.tune.objective import has_values, metric
from qflash_gen.tune.space import SearchSpace
from qflash_gen.tune.trials import TrialRecord

STAGES: tuple[tuple[str, ...], ...] = (
    ("block_n", "block_m", "num_warps", "num_stages"),
    ("exp", "rescale", "p_bits", "acc_bits"),
    ("max_regs", "heads_per_program"),
)
# Around a centre below the SQNR floor, the numeric moves (which move SQNR most) and the tiling
# moves (a single pass is also more accurate) form one first stage.
BELOW_FLOOR: tuple[tuple[str, ...], ...] = (STAGES[1] + STAGES[0], STAGES[2])
STRATEGIES: tuple[str, ...] = ("staged", "sampler")


def moves(space: SearchSpace, center: KernelConfig, axes: Sequence[str]) -> Iterator[KernelConfig]:
    """Feasible configs of ``space`` one move of ``axes`` away from ``center``, in axis order and
    the grid's value order (the launch axes move together: see the module doc)."""
    values = space.axis_values(center)
    if values is None:
        return
    seen = {space.canonical(center)}  # twins that run the same kernel count once
    if "max_regs" in axes:
        stages = values["num_stages"]
        for r in space.choices["max_regs"]:
            for g in space.choices["heads_per_program"]:
                s = stages if g == 1 else max(2, stages)
                if s not in space.choices["num_stages"]:
                    s = stages
                yield from _feasible(space, {**values, "max_regs": r, "heads_per_program": g, "num_stages": s}, seen)
        return
    for axis in axes:
        for v in space.choices.get(axis, ()):
            if v != values[axis]:
                yield from _feasible(space, {**values, axis: v}, seen)


def _feasible(space: SearchSpace, values: dict, seen: set[KernelConfig]) -> Iterator[KernelConfig]:
    config, reason = space.config_from_params(values)
    if reason is None and space.canonical(config) not in seen:
        seen.add(space.canonical(config))
        yield config


def center_of(records: Sequence[TrialRecord], floor: float, objective: str = "latency") -> TrialRecord | None:
    """The best record so far: the fastest feasible one (the first measured of equals); where none
    is feasible yet, the fastest correct one."""
    ok = [r for r in records if has_values(r.measurement, objective)]
    feasible = [r for r in ok if r.measurement.feasible(floor)]
    pool = feasible or ok
    if not pool:
        return None
    return min(pool, key=lambda r: (metric(r.measurement, objective)[0], r.number))


class Climb:
    """The staged climb of one study (see the module doc): :meth:`propose` gives the next configs
    to measure, or none once every move around the centre is measured (a local optimum of the
    grid's axes; the sampler proposes then, and a better config it finds restarts the climb).

    The centre moves only after all moves of a stage around it are measured (steepest descent,
    stage by stage): on the recorded H100 table, where small kernels time with much noise, a
    first-improvement climb left a good start for a lucky neighbour and never came back.  The
    state is one config; a resumed study starts again from the best config stored."""

    def __init__(self, space: SearchSpace, floor: float, objective: str = "latency") -> None:
        self.space = space
        self.floor = floor
        self.objective = objective
        self.center: TrialRecord | None = None

    def _better(self, a: TrialRecord, b: TrialRecord) -> bool:
        fa, fb = a.measurement.feasible(self.floor), b.measurement.feasible(self.floor)
        if fa != fb:
            return fa
        return metric(a.measurement, self.objective)[0] < metric(b.measurement, self.objective)[0]

    def propose(
        self, records: Sequence[TrialRecord], *, taken: Callable[[KernelConfig], bool] = lambda c: False
    ) -> list[KernelConfig]:
        """The moves the climb measures next, or [] at a local optimum (the sampler proposes then).

        The first is the next move; the others are the stage's unmeasured moves after it, in
        order, which the study measures next (the centre moves only once the stage is measured)
        unless its budget ends or another process measures some first; the study compiles them
        ahead as one batch (:mod:`.ahead`).  ``records``: the study's measured
        trials (measurement order); ``taken(config)``: True for a config that must not be
        proposed now (another process is measuring it): the list starts at the first move not
        taken, and the study checks the others again when it comes to them."""
        best = center_of(records, self.floor, self.objective)
        if best is None:
            return []
        if self.center is None:
            self.center = best
        measured = {self.space.canonical(r.config).hash for r in records}
        while True:
            center = self.center
            stages = STAGES if center.measurement.feasible(self.floor) else BELOW_FLOOR
            for axes in stages:
                todo = [c for c in moves(self.space, center.config, axes) if self.space.canonical(c).hash not in measured]
                first = next((i for i, c in enumerate(todo) if not taken(c)), None)
                if first is not None:
                    return todo[first:]
                if best is not center and self._better(best, center):
                    break  # this stage is measured around the centre: move to the best
            else:
                return []  # every move around the centre is measured and none is better
            self.center = best
