"""Compiling ahead: configs known before they are measured are compiled in parallel.

On a GPU a trial costs ~2.7 s, almost all of it Triton's compile; the timing takes 0.1-0.3 s
(issue 17).  Where a run knows configs before it measures them, ``jobs`` worker processes
compile them into Triton's on-disk cache (``GPUMeasurer.precompile_iter``) and the one timed
worker finds every binary there:

* a sweep's whole plan (:mod:`.sweep`) *streams* (:func:`in_compile_order`): the timed worker
  measures each config as soon as its compile is done, while the workers compile the next ones
  (at most a few per worker ahead).  An interrupted sweep keeps every row it measured.  The
  timings are then taken beside running compiles: on other CPU cores, and each compile worker
  launches its kernel once on a batch-1/2 instance on the same GPU (docs/tuner-efficiency.md's
  protocol note).  ``stream=False`` compiles everything first (the energy sweep: its idle spans
  and energy loops must see a quiet GPU).
* a study's warm starts and each stage of its climb (:mod:`.study`, :mod:`.staged`) compile as a
  batch *before* they are measured (:class:`StudyBatches`), not beside them: a study's timings
  are taken on a host as quiet as without compiling ahead.

Either way the configs measured and their order do not depend on ``--compile-jobs`` (a sweep
measures in the order the compiles finish, but measures the same configs).  Only a measurer that
compiles has ``precompile`` (:class:`~.measure.gpu.GPUMeasurer`); a replayed table
(``--simulate``) has none, and nothing changes there.  ``jobs`` 0 turns it off.  It is an
optimization only: a config that fails to compile fails again, and is recorded, when measured;
a precompile that breaks is reported and the run goes on, compiling as it measures.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence

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


def in_compile_order(
    measurer: Measurer,
    items: Sequence[tuple[KernelConfig, Sequence[ShapeSpec]]],
    jobs: int,
    progress: Callable[[KernelConfig, str | None], None] | None = None,
    *,
    stream: bool = True,
) -> Iterator[tuple[KernelConfig, Sequence[ShapeSpec]]]:
    """Each of ``items``, once, as soon as it is compiled: the order the ``jobs`` workers finish
    them where the measurer streams (``precompile_iter``) and ``stream``; all of them compiled
    first, then in order, where it only has ``precompile``; at once, in order, where it compiles
    nothing ahead (``jobs`` 0, a replay).  ``progress(config, error)`` after each compile.

    Close the iterator (``contextlib.closing``) when not running it to the end: that stops the
    compiles at once.  A streaming precompile that breaks is reported; the items it has not
    handed out follow in order, compiled as they are measured."""
    if not compiles_ahead(measurer, jobs) or not items:
        yield from items
        return
    stream_of = getattr(measurer, "precompile_iter", None)
    if not stream or not callable(stream_of):
        compile_ahead(measurer, items, jobs, progress)
        yield from items
        return
    sent: set[int] = set()
    compiled = iter(stream_of(items, min(jobs, len(items))))
    try:
        while True:
            try:
                i, error = next(compiled)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - compiling ahead is an optimization only
                print(f"qflash-tune: precompile stopped ({type(exc).__name__}: {exc})", file=sys.stderr)
                break
            if progress is not None:
                progress(items[i][0], error)
            sent.add(i)
            yield items[i]
    finally:
        close = getattr(compiled, "close", None)
        if close is not None:
            close()
    yield from (item for i, item in enumerate(items) if i not in sent)


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
