"""Measuring on the GPU of this machine: each candidate runs in a worker process.

:class:`GPUMeasurer` sends each candidate as a job to a worker subprocess (:mod:`.isolation`)
whose job code is :mod:`.gpu_jobs`: a crash, a hang or a poisoned CUDA context fails that trial
only.  This module itself imports neither torch nor optuna.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from qflash_gen.config import KernelConfig
from qflash_gen.tune.measure.base import GPU_WARMUP_NOTE, Measurement, Measurer, Protocol, ShapeSpec
from qflash_gen.tune.measure.isolation import IsolatedRunner

GPU_TARGET = "qflash_gen.tune.measure.gpu_jobs:run_job"
AHEAD_PER_JOB = 4  # precompile_iter: items compiled ahead of the measurements, per compile worker
HEAD_TO_HEAD_ROUNDS = 3  # the final head-to-head: best, current pick, best, ... (qflash_gen.tune.headtohead)


class GPUMeasurer(Measurer):
    """Compile and time candidates on the local GPU, each in an isolated worker process.

    Args:
        gpu: the short GPU name the numbers are recorded under (checked by the caller).
        protocol: how to measure.
        timeout_s: limit for one candidate (compile + correctness + timing of all its shapes).
        target: the worker function (tests substitute a fake one).
        env: extra environment for the worker (``CUDA_VISIBLE_DEVICES`` for one GPU of many).

    The timed worker warms the GPU before its first timing and after an idle gap
    (``gpu_jobs.IdleRewarm``; a restarted worker warms again); :attr:`warmups` holds what each
    warm-up reported.  A study's DB decision rests on a
    head-to-head of ``head_to_head_rounds`` alternating rounds (:mod:`qflash_gen.tune.headtohead`).
    """

    head_to_head_rounds = HEAD_TO_HEAD_ROUNDS

    def __init__(
        self,
        gpu: str,
        protocol: Protocol | None = None,
        *,
        timeout_s: float = 120.0,
        target: str = GPU_TARGET,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.gpu = gpu
        self._protocol = protocol or Protocol()
        self.timeout_s = timeout_s
        self.target = target
        self.env = dict(env or {})
        self.runner = IsolatedRunner(target, timeout_s=timeout_s, env=self.env)
        self._environment: dict[str, Any] | None = None
        self._compilers: list[IsolatedRunner] = []  # precompile's workers (started on first use)
        self.warmups: list[dict[str, Any]] = []  # the timed worker's warm-ups (first timing, idle gaps)

    @property
    def protocol(self) -> dict[str, Any]:
        return self._protocol.to_dict()

    @property
    def provenance(self) -> dict[str, Any]:
        environment = self.environment()
        return {"source": "measured", "gpu_warmup": environment["gpu_warmup"], "environment": environment}

    def environment(self) -> dict[str, Any]:
        """Device, driver and library versions, as the worker sees them (asked once), and the
        warm-up rule (so a recorded table's header says it too)."""
        if self._environment is None:
            res = self.runner.run({"op": "environment"})
            self._environment = res.result if res.ok and res.result else {"error": res.error}
            on_gpu = "error" not in self._environment and not str(self._environment.get("device")).startswith("cpu")
            self._environment["gpu_warmup"] = GPU_WARMUP_NOTE if on_gpu else "none (no CUDA device)"
        return dict(self._environment)

    def _job(self, config: KernelConfig, shapes: Sequence[ShapeSpec], op: str) -> dict[str, Any]:
        return {
            "op": op,
            "config": config.to_dict(),
            "shapes": [s.to_dict() for s in shapes],
            "protocol": dataclasses.asdict(self._protocol),
        }

    def measure(self, config: KernelConfig, shape: ShapeSpec) -> Measurement:
        return self.measure_many(config, [shape])[0]

    def measure_many(self, config: KernelConfig, shapes: Sequence[ShapeSpec]) -> list[Measurement]:
        res = self.runner.run(self._job(config, shapes, "measure"))
        if not res.ok or not res.result:
            return [Measurement.failed(res.error or "worker returned nothing") for _ in shapes]
        if isinstance(res.result.get("warmup"), dict):
            self.warmups.append(res.result["warmup"])
        got = res.result.get("measurements") or []
        if len(got) != len(shapes):
            return [Measurement.failed(f"worker returned {len(got)} results for {len(shapes)} shapes") for _ in shapes]
        return [Measurement.from_dict(m) for m in got]

    def precompile(
        self,
        items: Sequence[tuple[KernelConfig, Sequence[ShapeSpec]]],
        jobs: int,
        progress: Callable[[KernelConfig, str | None], None] | None = None,
    ) -> dict[str, str]:
        """Compile all of ``items`` in ``jobs`` parallel workers (:meth:`precompile_iter`), then
        return ``{config hash: error}`` for those that failed to compile (they fail again, and
        are recorded, when measured); ``progress(config, error)`` as each one finishes.  A study's
        batches (:class:`qflash_gen.tune.ahead.StudyBatches`) compile this way, before they are
        measured; an interrupt stops the compiles at once."""
        errors: dict[str, str] = {}
        with contextlib.closing(self.precompile_iter(items, jobs, ahead=len(items))) as compiled:
            for i, error in compiled:  # an exception here (KeyboardInterrupt) stops the compiles at once
                config = items[i][0]
                if error:
                    errors[config.hash] = error
                if progress is not None:
                    progress(config, error)
        return errors

    def precompile_iter(
        self,
        items: Sequence[tuple[KernelConfig, Sequence[ShapeSpec]]],
        jobs: int,
        ahead: int | None = None,
    ) -> Iterator[tuple[int, str | None]]:
        """Compile ``items`` in ``jobs`` parallel workers so the timed worker finds every binary in
        Triton's on-disk cache (a compile costs ~1-3 s of CPU; the timing ~0.1 s of GPU); yield
        ``(index into items, error or None)`` for each as soon as its compile is done (in the
        order they finish), so the caller measures it while the others compile.

        At most ``ahead`` items (default ``AHEAD_PER_JOB * jobs``) are compiling or compiled and
        not yet handed out: compiles run ahead of the measurements, not arbitrarily far.  The
        compile workers stay up until :meth:`close` (a study compiles many small batches, and
        starting a worker -- Python, torch, Triton, a CUDA context -- costs seconds).  Closing the
        iterator early (the caller's ``KeyboardInterrupt``, an error, ``close()``) cancels the
        compiles not started and kills those running, so it returns at once."""
        if not items or jobs < 1:
            return
        ahead = max(jobs, AHEAD_PER_JOB * jobs if ahead is None else ahead)
        while len(self._compilers) < jobs:
            self._compilers.append(IsolatedRunner(self.target, timeout_s=self.timeout_s, env=self.env))
        free = list(self._compilers[:jobs])  # idle workers; one is popped for a job, appended back after
        stop = threading.Event()

        def work(item: tuple[KernelConfig, Sequence[ShapeSpec]]) -> str | None:
            if stop.is_set():
                return "precompile stopped"
            runner = free.pop()
            try:
                res = runner.run(self._job(item[0], item[1], "compile"))
                return None if res.ok else res.error
            finally:
                free.append(runner)

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="qflash-compile")
        pending: dict[concurrent.futures.Future[str | None], int] = {}  # submitted, not handed out yet
        nxt = 0
        try:
            while nxt < len(items) or pending:
                while nxt < len(items) and len(pending) < ahead:
                    pending[pool.submit(work, items[nxt])] = nxt
                    nxt += 1
                done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in sorted(done, key=pending.__getitem__):
                    yield pending.pop(future), future.result()
        finally:
            if pending:  # stopped early: nothing more to compile, and nothing to wait for
                stop.set()
                for future in pending:
                    future.cancel()
                # kill until the jobs in flight are done: one may have been starting its worker
                while not all(future.done() for future in pending):
                    for runner in self._compilers:
                        runner.interrupt()
                    concurrent.futures.wait(pending, timeout=0.05)
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self.runner.close()
        for runner in self._compilers:
            runner.close()
