"""The sweep measures as the compiles finish (qflash_gen/tune/ahead.py, issue 17).

``tools/sweep.py`` compiles with ``--compile-jobs`` workers while the timed worker measures each
config as soon as its compile is done, so an interrupted call keeps every row it measured and
the next call resumes.  Most tests here run the real :class:`GPUMeasurer` with a fake worker
target (no torch: compiles are sleeps, latencies are invented and say nothing about a GPU) that
appends every job it runs to an ``events`` file beside it, one JSON line each, in the order they
happen; block_n 32 fails to compile (and so to measure), like a config out of resources."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qflash_gen.config import KernelConfig
from qflash_gen.tune.ahead import in_compile_order
from qflash_gen.tune.measure import GPUMeasurer, Measurement, Measurer, Protocol, ShapeSpec
from qflash_gen.tune.setup import smem_of
from qflash_gen.tune.space import get_grid
from qflash_gen.tune.sweep import make_plan, run_plan
from qflash_gen.tune.table import TableWriter, read_table

ROOT = Path(__file__).resolve().parents[1]
GPU = "synthetic"
SHAPES = [ShapeSpec.of("vit_b", 8)]
GRID = get_grid("small")

TARGET = textwrap.dedent(
    '''
    """A fake worker (no torch): compile sleeps, measure invents; every job is noted in ``events``."""
    import json
    import os
    import time

    HERE = os.path.dirname(os.path.abspath(__file__))


    def _note(op, config):
        with open(os.path.join(HERE, "events"), "a") as f:
            f.write(json.dumps({"op": op, "pid": os.getpid(), "config": config}) + "\\n")


    def _slow():
        path = os.path.join(HERE, "slow.json")
        return json.load(open(path)) if os.path.exists(path) else []


    def job(job):
        config = job.get("config")
        if job["op"] == "environment":
            return {"device": "fake"}
        if job["op"] == "compile":
            _note("compiling", config)
            time.sleep(60.0 if config in _slow() else float(os.environ.get("FAKE_COMPILE_S", "0.05")))
            _note("compiled", config)
            if config["block_n"] == 32:
                raise RuntimeError("out of resources (fake)")
            return {"compiled": 1}
        _note("measure", config)
        if config["block_n"] == 32:
            raise RuntimeError("out of resources (fake)")
        lat = (config["block_m"] + config["block_n"]) / 10 + config["num_stages"]
        m = {"latency_us": lat, "spread_us": 0.01, "sqnr_db": 40.0, "correct": True}
        return {"measurements": [m for _ in job["shapes"]]}
    '''
)


@pytest.fixture
def fake(tmp_path):
    (tmp_path / "target.py").write_text(TARGET)
    return tmp_path


def _measurer(where: Path, compile_s: float = 0.05) -> GPUMeasurer:
    return GPUMeasurer(GPU, Protocol(), timeout_s=120, target=f"{where / 'target.py'}:job", env={"FAKE_COMPILE_S": str(compile_s)})


def _events(where: Path) -> list[tuple[str, int, KernelConfig]]:
    path = where / "events"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(e["op"], e["pid"], KernelConfig.from_dict(e["config"])) for e in map(json.loads, lines)]


def _plan(writer=None):
    return make_plan(SHAPES, GRID, GPU, writer, smem_limit=smem_of(GPU))


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _all_dead_within(pids, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not all(_dead(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_the_timed_worker_measures_each_config_as_soon_as_it_is_compiled(fake):
    record = fake / "table.csv"
    compiled = []
    with _measurer(fake, compile_s=0.1) as measurer, TableWriter(record, measurer.protocol, {}) as writer:
        plan = _plan(writer)
        written = run_plan(plan, measurer, writer, compile_jobs=2, on_compiled=lambda c, e: compiled.append((c, e)))
    configs = [c for _, c, _ in plan.todo]
    assert len(configs) >= 16 and written == plan.n_measurements
    events = _events(fake)
    order = [(op, c) for op, _, c in events if op in ("compiled", "measure")]
    first_measure = next(i for i, (op, _) in enumerate(order) if op == "measure")
    last_compile = max(i for i, (op, _) in enumerate(order) if op == "compiled")
    assert first_measure < last_compile  # measuring began long before the compiles ended
    # every config compiled once and measured once, after its own compile
    assert sorted(c.hash for op, c in order if op == "compiled") == sorted(c.hash for c in configs)
    assert sorted(c.hash for op, c in order if op == "measure") == sorted(c.hash for c in configs)
    for i, (op, c) in enumerate(order):
        if op == "measure":
            assert ("compiled", c) in order[:i], c.short()
    assert sorted(c.hash for c, _ in compiled) == sorted(c.hash for c in configs)
    assert {c.hash for c, e in compiled if e} == {c.hash for c in configs if c.block_n == 32}
    # compile failures are recorded, as failed rows
    rows = read_table(record).rows
    assert len(rows) == plan.n_measurements
    failed = [r for r in rows if not r.measurement.ok]
    assert failed and {r.config.hash for r in failed} == {c.hash for c in configs if c.block_n == 32}
    assert all("out of resources" in r.measurement.error for r in failed)
    assert all(r.measurement.latency_us is not None for r in rows if r.config.block_n != 32)


def test_an_interrupted_sweep_keeps_its_rows_stops_its_compiles_at_once_and_resumes(fake):
    record = fake / "table.csv"
    plan = _plan()
    configs = [c for _, c, _ in plan.todo]
    (fake / "slow.json").write_text(json.dumps([c.to_dict() for c in configs[8:]]))  # 60 s compiles
    seen = []

    def interrupt_at_the_third(config, shapes, results):
        seen.append(config)
        if len(seen) == 3:
            raise KeyboardInterrupt

    measurer = _measurer(fake)
    try:
        with TableWriter(record, measurer.protocol, {}) as writer:
            t0 = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                run_plan(_plan(writer), measurer, writer, compile_jobs=2, on_config=interrupt_at_the_third)
            stopped_s = time.monotonic() - t0
        compile_pids = {pid for op, pid, _ in _events(fake) if op == "compiling"}
        # killed, not waited for: gone within seconds (a SIGKILL lands asynchronously; on a loaded
        # CI machine a just-killed job was once still visible at the first look), not after 60 s
        assert compile_pids and _all_dead_within(compile_pids, 5.0)
    finally:
        measurer.close()
    assert stopped_s < 10  # the compiles in flight take 60 s each
    rows = read_table(record).rows
    assert {r.config.hash for r in rows} == {c.hash for c in seen} and len(rows) == 3 * len(SHAPES)
    # the rerun measures only what is missing, each once
    (fake / "slow.json").unlink()
    (fake / "events").unlink()
    with _measurer(fake) as measurer, TableWriter(record, measurer.protocol, {}) as writer:
        rest = _plan(writer)
        assert rest.n_configs == len(configs) - 3
        run_plan(rest, measurer, writer, compile_jobs=2)
    again = [c.hash for op, _, c in _events(fake) if op == "measure"]
    assert sorted(again) == sorted(c.hash for c in configs if c not in seen)
    rows = read_table(record).rows
    assert sorted(r.config.hash for r in rows) == sorted(c.hash for c in configs)


DRIVER = textwrap.dedent(
    """
    import sys

    from qflash_gen.tune import cli
    from qflash_gen.tune.measure import GPUMeasurer, Protocol

    target, record, jobs = sys.argv[1:4]
    cli.live = lambda args: (GPUMeasurer("synthetic", Protocol(), timeout_s=120, target=target), "fp16")
    sys.exit(cli.main(["--exhaustive", "--record", record, "--workloads", "vit_b", "--batches", "8",
                       "--grid", "small", "--compile-jobs", jobs, "--quiet"]))
    """
)


def test_sigint_stops_a_cli_sweep_within_seconds_and_keeps_its_rows(fake):
    """``timeout -s INT 570 tools/sweep.py ...``: the signal arrives while the sweep waits for
    compiles of 60 s; it exits with 130 at once, its compile workers gone, its rows kept."""
    record = fake / "table.csv"
    configs = [c for _, c, _ in _plan().todo]
    (fake / "slow.json").write_text(json.dumps([c.to_dict() for c in configs[6:]]))
    (fake / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, str(fake / "driver.py"), f"{fake / 'target.py'}:job", str(record), "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while sum(op == "compiling" for op, _, _ in _events(fake)) < 8:  # 6 done, both workers on slow ones
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.5)  # the fast ones measured
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        stopped_s = time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == 130, err
    assert stopped_s < 10, err
    assert "interrupted after" in err and "6 rows recorded into" in err and "the same command resumes" in err
    assert f"qflash-tune: interrupted; the rows measured are in {record}, rerun to resume" in err
    assert "Traceback" not in err
    pids = {pid for _, pid, _ in _events(fake)}
    assert len(pids) == 3 and all(_dead(p) for p in pids)  # two compile workers, one timed worker
    assert sorted(r.config.hash for r in read_table(record).rows) == sorted(c.hash for c in configs[:6])


class StreamingFake(Measurer):
    """In-process: ``precompile_iter`` yields items in order (noting ``compiled``), ``measure``
    notes ``measure``; ``log`` holds both in the order they happen."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.gpu = GPU
        self.log: list[tuple[str, KernelConfig]] = []
        self.fail_after = fail_after
        self.closed = False

    @property
    def protocol(self) -> dict:
        return {"fake": "invented latencies"}

    def measure(self, config: KernelConfig, shape: ShapeSpec) -> Measurement:
        self.log.append(("measure", config))
        return Measurement(latency_us=float(config.block_m), spread_us=0.0, sqnr_db=40.0, correct=True)

    def precompile(self, items, jobs, progress=None) -> dict[str, str]:
        self.log.extend(("compiled", c) for c, _ in items)
        return {}

    def precompile_iter(self, items, jobs, ahead=None):
        try:
            for i, (config, _) in enumerate(items):
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("compile worker could not start (fake)")
                self.log.append(("compiled", config))
                yield i, None
        finally:
            self.closed = True


def _items():
    return [(c, tuple(shapes)) for _, c, shapes in _plan().todo]


def test_compile_jobs_0_compiles_nothing_ahead_and_records_the_same_rows(tmp_path):
    tables = {}
    for jobs in (0, 3):
        measurer = StreamingFake()
        record = tmp_path / f"{jobs}.csv"
        with TableWriter(record, measurer.protocol, {}) as writer:
            run_plan(_plan(writer), measurer, writer, compile_jobs=jobs)
        tables[jobs] = (measurer, read_table(record))
    off, on = tables[0][0], tables[3][0]
    configs = [c for c, _ in _items()]
    assert off.log == [("measure", c) for c in configs]  # in plan order, nothing compiled ahead
    assert on.log == [e for c in configs for e in (("compiled", c), ("measure", c))]  # interleaved
    rows = {j: sorted((r.key(), r.measurement) for r in t.rows) for j, (_, t) in tables.items()}
    assert rows[0] == rows[3]


def test_a_measurer_with_precompile_only_or_stream_false_compiles_everything_first():
    items = _items()
    for measurer, stream in ((StreamingFake(), False), (type("Batch", (StreamingFake,), {"precompile_iter": None})(), True)):
        got = []
        for config, _ in in_compile_order(measurer, items, 4, stream=stream):
            measurer.measure(config, SHAPES[0])
            got.append(config)
        assert got == [c for c, _ in items]
        assert measurer.log == [("compiled", c) for c, _ in items] + [("measure", c) for c, _ in items]


def test_a_broken_streaming_precompile_is_reported_and_the_rest_follow_in_order(capsys):
    items = _items()
    measurer = StreamingFake(fail_after=5)
    got = [c for c, _ in in_compile_order(measurer, items, 4)]
    assert got == [c for c, _ in items]  # every item once, the first 5 compiled ahead, the rest as measured
    assert measurer.closed and "precompile stopped (RuntimeError: compile worker could not start" in capsys.readouterr().err


def test_closing_the_stream_early_closes_the_measurers_iterator():
    measurer = StreamingFake()
    with contextlib.closing(in_compile_order(measurer, _items(), 4)) as ready:
        next(ready)
        assert not measurer.closed
    assert measurer.closed


def test_an_interrupted_batch_precompile_returns_at_once(fake):
    """A study's batch (GPUMeasurer.precompile, all compiled before measuring): Ctrl-C in it used
    to wait for every queued compile."""
    configs = [c for _, c, _ in _plan().todo]
    (fake / "slow.json").write_text(json.dumps([c.to_dict() for c in configs[2:]]))
    done = []

    def progress(config, error):
        done.append(config)
        if len(done) == 2:
            raise KeyboardInterrupt

    measurer = _measurer(fake)
    try:
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            measurer.precompile([(c, tuple(SHAPES)) for c in configs], 2, progress)
        stopped_s = time.monotonic() - t0
        pids = {pid for op, pid, _ in _events(fake) if op == "compiling"}
        assert pids and all(_dead(p) for p in pids)
        started = [c for op, _, c in _events(fake) if op == "compiling"]
        assert len(started) <= 4  # the two fast ones, then one slow one per worker; the rest cancelled
    finally:
        measurer.close()
    assert stopped_s < 10


def test_ctrl_c_during_a_timed_job_kills_its_worker_and_the_runner_goes_on(tmp_path):
    """The timed worker mid-measurement when SIGINT comes: no half-done job is left to wait for."""
    from qflash_gen.tune.measure.isolation import IsolatedRunner

    (tmp_path / "target.py").write_text("import os, time\n\ndef job(j):\n    time.sleep(j['s'])\n    return {'pid': os.getpid()}\n")

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    with IsolatedRunner(f"{tmp_path / 'target.py'}:job", timeout_s=120) as runner:
        pid = runner.run({"s": 0}).result["pid"]
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            t0 = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                runner.run({"s": 60})
            assert time.monotonic() - t0 < 5
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        assert _dead(pid)
        again = runner.run({"s": 0})
        assert again.ok and again.result["pid"] != pid
