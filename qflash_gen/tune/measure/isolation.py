"""Run candidates in a worker subprocess, so a bad kernel fails its own trial and nothing else.

A candidate kernel can take the process down with it: an illegal memory access poisons the CUDA
context for the rest of the process, a miscompiled loop can hang, a compile can abort.  So every
candidate runs in a worker process (``python qflash_gen/tune/measure/worker_main.py TARGET``) that the parent
talks to over a pipe with one JSON object per line:

* parent → worker: ``{"id": 7, "job": {...}}``
* worker → parent: ``{"ready": true, "pid": 123}`` once, then ``{"id": 7, "ok": true, "result":
  {...}}`` or ``{"id": 7, "ok": false, "error": "...", "fatal": bool}``.

The worker is reused between candidates (starting Python with torch and Triton costs seconds, a
candidate often less) and replaced when it dies, times out, or reports a fatal (CUDA context)
error.  ``TARGET`` is ``module:function`` or ``/path/file.py:function``; the function takes the
job mapping and returns a JSON-serializable mapping.  Tests pass fake targets that abort or hang.
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STDERR_TAIL = 2000  # characters of a dead worker's stderr quoted in the error
WORKER_SCRIPT = Path(__file__).with_name("worker_main.py")
PACKAGE_ROOT = Path(__file__).resolve().parents[3]  # the directory holding qflash_gen/


@dataclasses.dataclass(frozen=True)
class JobResult:
    """What became of one job: a result, or why there is none."""

    ok: bool
    result: dict[str, Any] | None = None
    error: str | None = None
    crashed: bool = False  # the worker died (signal, exit) while running the job
    timed_out: bool = False
    seconds: float = 0.0


class WorkerError(RuntimeError):
    """The worker could not be started (bad target, import error, startup timeout)."""


class IsolatedRunner:
    """One worker subprocess, restarted as needed; :meth:`run` never raises for a bad candidate.

    Args:
        target: ``module:function`` or ``/path/file.py:function`` run in the worker for each job.
        timeout_s: wall-clock limit of one job (compile + run); past it the worker is killed.
        startup_timeout_s: limit for the worker to import the target and say it is ready.
        env: extra environment variables for the worker (e.g. ``CUDA_VISIBLE_DEVICES``).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 120.0,
        startup_timeout_s: float = 300.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if ":" not in target:
            raise ValueError(f"target={target!r} must be 'module:function' or '/path/file.py:function'")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s!r} must be > 0")
        self.target = target
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self._buf = b""
        self._next_id = 0
        self.starts = 0

    # -- process management ---------------------------------------------------------------
    @property
    def restarts(self) -> int:
        """Workers started to replace one that died, hung or lost its CUDA context."""
        return max(0, self.starts - 1)

    def _start(self) -> None:
        self.starts += 1
        env = {**os.environ, **self.env}
        # The worker runs as a script; make sure it imports this very qflash_gen (even uninstalled).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
        if self._stderr is not None:
            self._stderr.close()
        self._stderr = tempfile.TemporaryFile(mode="w+b")
        self._buf = b""
        self._proc = subprocess.Popen(
            [sys.executable, str(WORKER_SCRIPT), self.target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            start_new_session=True,  # its own process group: a kill also ends compiler children
        )
        msg = self._read_message(self.startup_timeout_s)
        if msg is None or not msg.get("ready"):
            why = "timed out" if msg is None and self._proc.poll() is None else "died"
            tail = self._stderr_tail()
            self._kill()
            raise WorkerError(f"worker for {self.target!r} {why} during startup: {tail or msg}")

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group we created with start_new_session
            except (ProcessLookupError, PermissionError):
                proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not hang
            pass
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.flush()
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - STDERR_TAIL))
            return self._stderr.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def interrupt(self) -> None:
        """Kill the worker now, from any thread: the job in flight (if any) fails as crashed in
        the thread running it, and the next job starts a fresh worker.  For stopping a pool of
        compile workers at once (:meth:`GPUMeasurer.precompile_iter`); the runner's own state is
        left to the thread that runs it."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        """Stop the worker (idempotent)."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.close()  # EOF: the worker exits by itself
                self._proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._kill()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> IsolatedRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- protocol -------------------------------------------------------------------------
    def _read_message(self, timeout_s: float) -> dict[str, Any] | None:
        """The next JSON line from the worker; None on EOF (it died) or timeout."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(timeout=left):
                    return None
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return None
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return {"ok": False, "error": f"worker sent a malformed reply: {line[:200]!r}", "fatal": True}

    def _describe_death(self) -> str:
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            what = "stopped answering"
        elif code < 0:
            try:
                what = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                what = f"was killed by signal {-code}"
        else:
            what = f"exited with status {code}"
        tail = self._stderr_tail()
        return f"worker {what}" + (f"; stderr tail: {tail[-500:]}" if tail else "")

    def run(self, job: Mapping[str, Any]) -> JobResult:
        """Run one job in the worker; a crash, a hang or an exception fails this job only.

        Raises WorkerError only when a fresh worker cannot even start (a broken target or
        environment: every later job would fail the same way)."""
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            self._start()
        assert self._proc is not None and self._proc.stdin is not None
        self._next_id += 1
        job_id = self._next_id
        t0 = time.monotonic()
        try:
            self._proc.stdin.write((json.dumps({"id": job_id, "job": dict(job)}) + "\n").encode())
            self._proc.stdin.flush()
        except BrokenPipeError:
            error = self._describe_death()
            self._kill()
            return JobResult(ok=False, error=error, crashed=True, seconds=time.monotonic() - t0)
        try:
            return self._await(job_id, t0)
        except BaseException:  # KeyboardInterrupt mid-job: no half-done job left behind, no wait on it
            self._kill()
            raise

    def _await(self, job_id: int, t0: float) -> JobResult:
        assert self._proc is not None
        while True:
            left = self.timeout_s - (time.monotonic() - t0)
            msg = self._read_message(max(0.0, left))
            elapsed = time.monotonic() - t0
            if msg is None:
                if self._proc.poll() is None and elapsed >= self.timeout_s:
                    self._kill()
                    return JobResult(
                        ok=False,
                        error=f"timed out after {self.timeout_s:g} s (worker killed)",
                        timed_out=True,
                        seconds=elapsed,
                    )
                error = self._describe_death()
                self._kill()
                return JobResult(ok=False, error=error, crashed=True, seconds=elapsed)
            if msg.get("id") != job_id:
                continue  # a stale reply (cannot happen with one job in flight; be safe)
            if msg.get("ok"):
                return JobResult(ok=True, result=msg.get("result") or {}, seconds=elapsed)
            if msg.get("fatal"):
                self._kill()  # its CUDA context is gone: the next job gets a fresh worker
            return JobResult(ok=False, error=str(msg.get("error")), seconds=elapsed)
