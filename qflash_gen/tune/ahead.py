"""Compiling ahead: configs known before they are measured are compiled in parallel first.

On a GPU a trial costs ~2.7 s, almost all of it Triton's compile; the timing takes 0.1-0.3 s
(issue 17).  Where a run knows a batch of configs before it measures them -- a sweep's whole
plan (:mod:`.sweep`), a study's warm starts and each stage of its climb (:mod:`.study`,
:mod:`.staged`) -- ``jobs`` worker processes first compile the batch into Triton's on-disk cache
(``GPUMeasurer.precompile``), then the one timed worker measures the configs one by one and
finds every binary there.  The batch compiles *before* its measurements, not beside them: the
timings are taken on a host as quiet as without compiling ahead, and a config's numbers do not
depend on ``--compile-jobs``.

Only a measurer that compiles has ``precompile`` (:class:`~.measure.gpu.GPUMeasurer`); a replayed
table (``--simulate``) has none, and nothing changes there.  ``jobs`` 0 turns it off.  It is an
optimization only: a config that fails to compile fails again, and is recorded, when measured;
a precompile that breaks is reported and the run goes on, compiling as it measures.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence

from qflash_gen.config import KernelConfig
from qflash_gen.tune.measure.base import Measurer, ShapeSpec


def compiles_ahead(measurer: Measurer, jobs: int) -> bool:
    """Whether ``measurer`` compiles batches ahead with ``jobs`` workers (it has ``precompile``)."""
    return jobs > 0 and callable(getattr(measurer, "precompile", None))


def compile_ahead(
    measurer: Measurer,
    items: Sequence[tuple[KernelConfig, Sequence[ShapeSpec]]],
    jobs: int,
    progress: Callable[[KernelConfig, str | None], None] | None = None,
) -> None:
    """Compile ``items`` (each config with the shapes it will be measured on) in at most ``jobs``
    workers, where :func:`compiles_ahead`; ``progress(config, error)`` after each one."""
    if not items or not compiles_ahead(measurer, jobs):
        return
    try:
        measurer.precompile(items, min(jobs, len(items)), progress)  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - compiling ahead is an optimization only
        print(f"qflash-tune: precompile skipped ({type(exc).__name__}: {exc})", file=sys.stderr)


class StudyBatches:
    """A study's compile-ahead: each batch it is given, less the configs compiled already and cut
    to the budget left, compiled before the study measures it.

    Args:
        measurer: the study's measurer.
        shape: the shape the study measures on.
        jobs: compile workers (``--compile-jobs``); 0, or a measurer that does not compile: nothing.
        on_batch: called with ``(configs, jobs)`` before a batch compiles (progress output).
    """

    def __init__(
        self, measurer: Measurer, shape: ShapeSpec, jobs: int, on_batch: Callable[[int, int], None] | None = None
    ) -> None:
        self.measurer = measurer
        self.shape = shape
        self.jobs = jobs if compiles_ahead(measurer, jobs) else 0
        self.on_batch = on_batch
        self.compiled: set[str] = set()  # config hashes sent to the compile workers

    def __call__(self, configs: Iterable[KernelConfig], limit: int) -> None:
        """Compile those of the first ``limit`` of ``configs`` (in the order they will be measured;
        ``limit``: the budget left) not compiled yet."""
        if not self.jobs:
            return
        batch = [c for c in list(dict.fromkeys(configs))[: max(0, limit)] if c.hash not in self.compiled]
        if not batch:
            return
        self.compiled.update(c.hash for c in batch)
        if self.on_batch is not None:
            self.on_batch(len(batch), min(self.jobs, len(batch)))
        compile_ahead(self.measurer, [(c, (self.shape,)) for c in batch], self.jobs)
