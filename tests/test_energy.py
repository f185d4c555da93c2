"""Energy per call (qflash_gen/energy.py) and the energy objective of the tuner.

The meter is tested against a FAKE GPU: simulated time, a known idle and busy power, and an
energy counter that moves in integer millijoule steps every ``tick_s`` (optionally lagging), so
the expected µJ per call is known exactly.  The tuner's energy objective is tested on a SYNTHETIC
in-test table (made-up numbers, labelled as such, written to a temporary directory only) and, when
it is in the checkout, on the table recorded on an H100 by tools/energy_sweep.py.
"""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from qflash_gen import energy
from qflash_gen.config import KernelConfig
from qflash_gen.energy import EnergyError, EnergyMeter, EnergyUnavailable
from qflash_gen.tune import cli, devices, objective
from qflash_gen.tune.measure import Measurement, Protocol, ShapeSpec
from qflash_gen.tune.space import Grid, SearchSpace
from qflash_gen.tune.table import ENERGY_COLUMNS, TableWriter, read_table


# -- a fake GPU and its counter --------------------------------------------------------------------
class FakeGPU:
    """Simulated clock; idle power, busy power per loop; a counter stepping every ``tick_s``."""

    def __init__(self, idle_w=70.0, busy_w=400.0, tick_s=0.02, lag_s=0.0, mj_per_step=None):
        self.t = 0.0
        self.idle_w = idle_w
        self.busy_w = busy_w  # a number, or a list used round-robin per loop
        self.tick_s = tick_s
        self.lag_s = lag_s
        self.loops: list[tuple[float, float, float]] = []  # (start, end, power)
        self.description = "fake counter (tests)"
        self.reads = 0
        self.mj_per_step = mj_per_step  # a counter that adds only this many mJ per step (too coarse)

    def clock(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += dt

    def next_busy_w(self) -> float:
        if isinstance(self.busy_w, list):
            return self.busy_w[len(self.loops) % len(self.busy_w)]
        return self.busy_w

    def energy_j(self, t: float) -> float:
        extra = sum(max(0.0, min(end, t) - start) * (p - self.idle_w) for start, end, p in self.loops)
        return self.idle_w * t + extra

    def read_mj(self) -> int:
        self.reads += 1
        step = math.floor(max(0.0, self.t - self.lag_s) / self.tick_s)
        if self.mj_per_step is not None:
            return step * self.mj_per_step
        return int(self.energy_j(step * self.tick_s) * 1000)


class FakeWork:
    """``calls_per_unit`` calls of ``call_s`` each per unit; ``unit_s`` may be a wrong estimate."""

    def __init__(self, gpu: FakeGPU, call_s: float, calls_per_unit: int, unit_s=None, cap_s=None):
        self.gpu = gpu
        self.call_s = call_s
        self.calls_per_unit = calls_per_unit
        self.unit_s = call_s * calls_per_unit if unit_s is None else unit_s
        self.cap_s = cap_s  # a broken work that never runs longer than this
        self.runs: list[int] = []

    def run(self, units: int) -> float:
        self.runs.append(units)
        d = units * self.calls_per_unit * self.call_s
        if self.cap_s is not None:
            d = min(d, self.cap_s)
        start = self.gpu.t
        self.gpu.loops.append((start, start + d, self.gpu.next_busy_w()))
        self.gpu.t += d
        return d


def meter_for(gpu: FakeGPU, **kw) -> EnergyMeter:
    return EnergyMeter(gpu, clock=gpu.clock, sleep=gpu.sleep, **kw)


# -- the meter -------------------------------------------------------------------------------------
@pytest.mark.parametrize("lag_s", [0.0, 0.05])
def test_uj_per_call_total_and_above_idle(lag_s):
    gpu = FakeGPU(idle_w=70.0, busy_w=400.0, tick_s=0.02, lag_s=lag_s)
    work = FakeWork(gpu, call_s=50e-6, calls_per_unit=40)
    r = meter_for(gpu).measure(work)
    # 400 W for 50 µs = 20,000 µJ per call in all; 330 W above the 70 W idle floor = 16,500 µJ
    assert r.uj_per_call == pytest.approx(20_000.0, rel=1e-3)
    assert r.above_idle_uj == pytest.approx(16_500.0, rel=1e-3)
    assert r.idle_w == pytest.approx(70.0, rel=1e-3)
    assert r.busy_w == pytest.approx(400.0, rel=1e-3)
    assert r.us_per_call == pytest.approx(50.0)
    assert r.repeats == 3 and len(r.rounds) == 3
    assert r.busy_s >= 1.0  # the default loop is >= 1 s of work
    assert r.span_s > r.busy_s  # the span holds idle tails, which the total removes
    assert r.tick_s == pytest.approx(0.02, rel=0.05)
    # the raw counter energy per call is higher by the idle tails: idle power x (span - busy)
    for x in r.rounds:
        tails_uj = 70.0 * (x["span_s"] - x["busy_s"]) * 1e6 / x["calls"]
        assert tails_uj > 0.01 * x["uj_per_call"]
        assert x["energy_j"] * 1e6 / x["calls"] == pytest.approx(x["uj_per_call"] + tails_uj, rel=1e-4)


def test_idle_is_measured_in_every_round_and_subtracted():
    gpu = FakeGPU(idle_w=100.0, busy_w=300.0, tick_s=0.01)
    work = FakeWork(gpu, call_s=10e-6, calls_per_unit=100)
    r = meter_for(gpu, repeats=2).measure(work)
    for x in r.rounds:
        assert x["idle_w"] == pytest.approx(100.0, rel=1e-3)
        assert x["idle_span_s"] >= 1.0  # idle over a span as long as the loop
        # above idle = counter energy minus idle power over the whole span
        assert x["above_idle_uj"] == pytest.approx((x["energy_j"] - 100.0 * x["span_s"]) * 1e6 / x["calls"], rel=1e-6)
    assert r.above_idle_uj == pytest.approx(200.0 * 10.0, rel=1e-3)  # (300 - 100) W x 10 µs
    assert r.uj_per_call == pytest.approx(300.0 * 10.0, rel=1e-3)


def test_repeats_report_median_and_min_max_spread():
    gpu = FakeGPU(idle_w=50.0, busy_w=[380.0, 420.0, 400.0], tick_s=0.02)
    work = FakeWork(gpu, call_s=20e-6, calls_per_unit=50)
    r = meter_for(gpu, repeats=3).measure(work)
    per_w = 20e-6 * 1e6  # µJ per call per watt
    assert r.uj_per_call == pytest.approx(400.0 * per_w, rel=1e-3)
    assert r.uj_min == pytest.approx(380.0 * per_w, rel=1e-3)
    assert r.uj_max == pytest.approx(420.0 * per_w, rel=1e-3)
    assert r.spread_uj == pytest.approx(40.0 * per_w, rel=1e-2)
    assert r.above_idle_min_uj == pytest.approx(330.0 * per_w, rel=1e-3)
    d = r.to_dict()
    assert d["repeats"] == 3 and len(d["rounds"]) == 3 and "rounds" not in r.to_dict(rounds=False)


def test_interleaved_works_share_one_idle_span_per_round():
    gpu = FakeGPU(idle_w=60.0, busy_w=[300.0, 500.0], tick_s=0.02)
    a = FakeWork(gpu, call_s=10e-6, calls_per_unit=100)
    b = FakeWork(gpu, call_s=40e-6, calls_per_unit=25)
    got = meter_for(gpu, repeats=2).measure_many({"a": a, "b": b})
    assert got["a"].uj_per_call == pytest.approx(300.0 * 10.0, rel=1e-3)
    assert got["b"].uj_per_call == pytest.approx(500.0 * 40.0, rel=1e-3)
    assert [x["idle_w"] for x in got["a"].rounds] == [x["idle_w"] for x in got["b"].rounds]
    assert len(a.runs) == len(b.runs) == 2  # one loop each per round


def test_a_loop_shorter_than_the_required_span_is_extended():
    gpu = FakeGPU(tick_s=0.02)
    # the work claims 10 ms per unit but runs 1 ms: the first loop is 0.1 s, not 1 s
    work = FakeWork(gpu, call_s=1e-5, calls_per_unit=100, unit_s=1e-2)
    r = meter_for(gpu, repeats=1).measure(work)
    assert work.runs[0] * 1e-3 < 1.0 <= work.runs[1] * 1e-3  # re-run longer
    assert r.busy_s >= 1.0 and r.calls == work.runs[-1] * 100
    assert r.uj_per_call == pytest.approx(400.0 * 10.0, rel=1e-3)


def test_a_loop_that_stays_short_is_refused():
    gpu = FakeGPU(tick_s=0.02)
    work = FakeWork(gpu, call_s=1e-5, calls_per_unit=100, cap_s=0.3)  # never more than 0.3 s
    with pytest.raises(EnergyError, match="shorter than the required 1 s"):
        meter_for(gpu, repeats=1, max_extend=2).measure(work)
    assert len(work.runs) == 3  # tried, extended twice, refused


def test_a_coarse_counter_lengthens_the_loop():
    gpu = FakeGPU(tick_s=0.5)  # a step every 0.5 s: 1 s would be only 2 steps
    work = FakeWork(gpu, call_s=1e-4, calls_per_unit=10)
    meter = meter_for(gpu, repeats=1, min_steps=5)
    r = meter.measure(work)
    assert meter.required_s == pytest.approx(2.5, rel=0.05)
    assert r.busy_s >= 2.5 and r.min_seconds == pytest.approx(meter.required_s)
    assert r.uj_per_call == pytest.approx(400.0 * 100.0, rel=2e-3)


def test_a_stuck_or_too_coarse_counter_is_an_error_not_a_number():
    gpu = FakeGPU(tick_s=10.0)  # never changes within the 2 s wait
    with pytest.raises(EnergyError, match="did not change"):
        meter_for(gpu).measure(FakeWork(gpu, call_s=1e-5, calls_per_unit=100))
    gpu = FakeGPU(tick_s=0.02, mj_per_step=1)  # 1 mJ per step: ~50 mJ over a second
    with pytest.raises(EnergyError, match="advanced only"):
        meter_for(gpu).measure(FakeWork(gpu, call_s=1e-5, calls_per_unit=100))


def test_meter_arguments_are_checked():
    gpu = FakeGPU()
    with pytest.raises(ValueError, match="min_seconds"):
        meter_for(gpu, min_seconds=0)
    with pytest.raises(ValueError, match="repeats"):
        meter_for(gpu, repeats=0)


# -- no NVML: a clear message, never a number ------------------------------------------------------
def test_real_nvml_path_on_this_machine():
    """On a machine without an NVIDIA driver (CI, this CPU box) opening the counter fails with a
    message naming the cause; on a GPU machine with NVML it reads a counter."""
    if torch.cuda.is_available():
        try:
            counter = energy.open_counter()
        except EnergyUnavailable as exc:  # a GPU without the counter: still a clear message
            assert energy.UNAVAILABLE in str(exc)
            return
        a = counter.read_mj()
        assert isinstance(a, int) and a >= 0 and "NVML" in counter.description
        counter.close()
        return
    with pytest.raises(EnergyUnavailable) as info:
        energy.open_counter()
    msg = str(info.value)
    assert msg.startswith(energy.UNAVAILABLE)
    assert "pynvml" in msg or "NVML could not start" in msg  # not installed, or no driver
    assert "No energy is measured or estimated" in msg


def test_missing_pynvml_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    with pytest.raises(EnergyUnavailable, match=r"pip install nvidia-ml-py"):
        energy.open_counter()
    with pytest.raises(EnergyUnavailable, match="pynvml is not installed"):
        energy.probe()


def test_gpu_without_the_energy_counter(monkeypatch):
    class NotSupported(Exception):
        pass

    def unsupported(handle):
        raise NotSupported("Not Supported")

    calls = []
    fake = types.SimpleNamespace(
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetHandleByIndex=lambda i: f"handle{i}",
        nvmlDeviceGetName=lambda h: b"Tesla P100-PCIE-16GB",
        nvmlDeviceGetTotalEnergyConsumption=unsupported,
    )
    monkeypatch.setattr(energy.counter, "torch_identity", lambda device: (None, None, ""))
    with pytest.raises(EnergyUnavailable, match=r"on Tesla P100-PCIE-16GB: nvmlDeviceGetTotalEnergyConsumption failed"):
        energy.open_counter(nvml=fake)
    assert calls == ["init", "shutdown"]


def test_nvml_counter_reads_the_device_found_by_uuid(monkeypatch):
    readings = iter([1000, 1000, 1234])
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda u: ("h", u),
        nvmlDeviceGetName=lambda h: "NVIDIA H100 80GB HBM3",
        nvmlDeviceGetTotalEnergyConsumption=lambda h: next(readings),
        nvmlSystemGetDriverVersion=lambda: "580.159.04",
    )
    monkeypatch.setattr(energy.counter, "torch_identity", lambda device: ("GPU-1234", None, "NVIDIA H100 80GB HBM3"))
    counter = energy.open_counter(nvml=fake)
    assert counter.read_mj() == 1000 and counter.read_mj() == 1234
    assert "H100" in counter.description and "uuid GPU-1234" in counter.description


def test_worker_fails_the_candidate_when_energy_cannot_be_measured(monkeypatch):
    """The GPU worker's energy step on a machine without the counter: the trial fails with the
    reason; latency and SQNR stay for the record, no energy value is made up."""
    from qflash_gen.tune.measure import gpu_jobs

    monkeypatch.setitem(sys.modules, "pynvml", None)
    gpu_jobs.forget_energy_meters()
    shape = ShapeSpec.of("swin_t_s4", 1)
    ok = Measurement(latency_us=12.0, spread_us=0.1, sqnr_db=35.0, correct=True)
    bad = Measurement.failed("mismatch")
    got = gpu_jobs.add_energy(KernelConfig(), [shape, shape], Protocol(energy=True), [ok, bad])
    assert got[1] == bad
    assert not got[0].ok and got[0].energy_uj is None and got[0].latency_us == 12.0
    assert got[0].error.startswith("energy: " + energy.UNAVAILABLE)


def test_cli_energy_objective_without_nvml_is_a_usage_error(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the probe may find a real counter (checked on CPU machines)")

    monkeypatch.setattr(devices, "present_gpu", lambda: ("h100", "h100 (pretend, for this test)"))
    code = cli.main(["--gpu", "h100", "--workloads", "vit_b", "--batches", "64", "--objective", "energy", "--no-db"])
    err = capsys.readouterr().err
    assert code == 2
    assert "qflash-tune: error: --objective energy measures energy, but " + energy.UNAVAILABLE in err
    assert "Traceback" not in err


# -- the objective in the study --------------------------------------------------------------------
def test_objective_names():
    assert objective.objective_for("latency") == "latency"
    assert objective.objective_for("energy") == "energy"
    assert objective.objective_for("pareto") == "pareto"
    assert objective.objective_for("pareto", "latency,sqnr") == "pareto"
    assert objective.objective_for("pareto", "sqnr,energy,latency") == "pareto-energy"
    assert objective.needs_energy("energy") and objective.needs_energy("pareto-energy")
    assert not objective.needs_energy("pareto") and not objective.needs_energy("latency")
    with pytest.raises(ValueError, match="not supported"):
        objective.objective_for("pareto", "energy,sqnr")
    with pytest.raises(ValueError, match="needs --objective pareto"):
        objective.objective_for("energy", "latency,energy,sqnr")


# -- simulation with a SYNTHETIC energy table ------------------------------------------------------
SYNTHETIC_GPU = "synthetic"
SYNTHETIC_NOTE = "SYNTHETIC: invented numbers for tests of the energy objective; not measured on any GPU"
SYN_GRID = Grid(
    block_m=(32, 64),
    block_n=(64, 256),
    num_warps=(4, 8),
    num_stages=(1, 2),
    exp=("shift", "poly2"),
    rescale=("shift8",),
)
SYN_SHAPE = ShapeSpec.of("vit_b", 64)


def _syn(config: KernelConfig) -> Measurement:
    """Made up so that the fastest config is not the most frugal one: 8 warps are faster here but
    draw more power, and shift is below the 30 dB floor."""
    latency = 100.0 - 20.0 * (config.block_n == 256) - 10.0 * (config.num_warps == 8) - 3.0 * (config.block_m == 32)
    latency += 2.0 * (config.num_stages == 2) + 5.0 * (config.exp_variant == "poly2")
    power = 300.0 + 150.0 * (config.num_warps == 8) - 20.0 * (config.num_stages == 2)
    sqnr = 29.0 if config.exp_variant == "shift" else 37.0
    e = latency * power  # µs x W = µJ
    return Measurement(
        latency_us=latency,
        spread_us=0.002 * latency,
        sqnr_db=sqnr,
        correct=True,
        energy_uj=e,
        energy_spread_uj=0.004 * e,
        above_idle_uj=latency * (power - 70.0),
        idle_w=70.0,
    )


@pytest.fixture(scope="module")
def energy_table(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic_energy") / "synthetic_energy.csv"
    env = {"synthetic": SYNTHETIC_NOTE, "device": "none (synthetic)"}
    space = SearchSpace(SYN_GRID, SYN_SHAPE.n, SYN_SHAPE.d)
    with TableWriter(path, Protocol(energy=True).to_dict(), env) as w:
        for c in space.configs():
            w.write(SYNTHETIC_GPU, SYN_SHAPE, c, _syn(c))
    return path


def _tune(capsys, table, tmp_path, *extra):
    code = cli.main(
        [
            "--simulate", str(table), "--workloads", "vit_b", "--batches", "64", "--sampler", "random",
            "--trials", "100", "--storage", str(tmp_path / "studies.journal"), "--db", str(tmp_path / "db"),
            *extra,
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, yaml.safe_load((tmp_path / "db" / f"{SYNTHETIC_GPU}.yaml").read_text())["entries"]


def test_energy_table_round_trips(energy_table):
    table = read_table(energy_table)
    assert table.has_energy and table.environment["synthetic"] == SYNTHETIC_NOTE
    assert table.protocol["energy"] is True and table.protocol["energy_repeats"] == 3
    row = table.rows[0]
    assert row.measurement == _syn(row.config)
    header = [line for line in energy_table.read_text().splitlines() if not line.startswith("#")][0]
    assert header.endswith(",error," + ",".join(ENERGY_COLUMNS))


def test_simulated_energy_objective_picks_the_least_energy(energy_table, tmp_path, capsys):
    table = read_table(energy_table)
    fastest = table.best(SYNTHETIC_GPU, SYN_SHAPE, 30.0)
    frugal = table.best(SYNTHETIC_GPU, SYN_SHAPE, 30.0, metric="energy_uj")
    assert fastest.config != frugal.config  # the synthetic table separates the two objectives
    out, entries = _tune(capsys, energy_table, tmp_path, "--objective", "energy")
    (e,) = entries
    assert KernelConfig.from_dict(e["config"]) == frugal.config
    assert e["energy_uj"] == pytest.approx(frugal.measurement.energy_uj, rel=1e-4)
    assert e["latency_us"] == pytest.approx(frugal.measurement.latency_us, rel=1e-4)
    assert e["sqnr_db"] >= 30.0
    assert e["protocol"]["tuner"]["objective"] == "energy" and e["protocol"]["energy"] is True
    assert e["protocol"]["tuner"]["tie_rule"].startswith("least energy")
    assert "energy vit_b b64" in out and "uJ/call" in out


def test_simulated_latency_objective_still_records_energy(energy_table, tmp_path, capsys):
    table = read_table(energy_table)
    fastest = table.best(SYNTHETIC_GPU, SYN_SHAPE, 30.0)
    _, (e,) = _tune(capsys, energy_table, tmp_path, "--objective", "latency")
    assert KernelConfig.from_dict(e["config"]) == fastest.config
    assert e["energy_uj"] == pytest.approx(fastest.measurement.energy_uj, rel=1e-4)


def test_energy_picks_do_not_silently_replace_faster_db_entries(energy_table, tmp_path, capsys):
    _, (fast,) = _tune(capsys, energy_table, tmp_path, "--objective", "latency")
    out, (kept,) = _tune(capsys, energy_table, tmp_path, "--objective", "energy")
    assert kept == fast  # the DB's merge rule keeps the lower latency ...
    assert "kept better stored 1" in out and "give energy tuning its own --db" in out  # ... and says so


def test_simulated_three_axis_pareto_front(energy_table, tmp_path, capsys):
    table = read_table(energy_table)
    out, _ = _tune(capsys, energy_table, tmp_path, "--objective", "pareto", "--pareto-axes", "latency,energy,sqnr")
    fronts = list((tmp_path / "db" / "fronts" / SYNTHETIC_GPU).glob("*.yaml"))
    assert len(fronts) == 1
    front = yaml.safe_load(fronts[0].read_text())["front"]
    got = {KernelConfig.from_dict(p["config"]).hash for p in front}
    # brute force over the whole table: not dominated in (latency min, energy min, SQNR max)
    rows = [r.measurement for r in table.rows]
    want = set()
    for r in table.rows:
        m = r.measurement
        if not any(
            o.latency_us <= m.latency_us
            and o.energy_uj <= m.energy_uj
            and o.sqnr_db >= m.sqnr_db
            and (o.latency_us, o.energy_uj, o.sqnr_db) != (m.latency_us, m.energy_uj, m.sqnr_db)
            for o in rows
        ):
            want.add(r.config.hash)
    assert got == want and all("energy_uj" in p for p in front)
    assert "uJ/" in out


def test_energy_objective_on_a_table_without_energy_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "latency_only.csv"
    with TableWriter(path, Protocol().to_dict(), {"synthetic": SYNTHETIC_NOTE}) as w:
        w.write(SYNTHETIC_GPU, SYN_SHAPE, KernelConfig(), _syn(KernelConfig()))
    assert not read_table(path).has_energy
    code = cli.main(["--simulate", str(path), "--workloads", "vit_b", "--batches", "64", "--objective", "energy"])
    err = capsys.readouterr().err
    assert code == 2 and "has no energy_uj column" in err and "tools/energy_sweep.py" in err


def test_writer_refuses_to_mix_energy_and_latency_tables(energy_table, tmp_path):
    with pytest.raises(ValueError, match="with energy columns"):
        TableWriter(energy_table, Protocol(energy=True).to_dict(), {}, energy=False)


# -- the recorded H100 energy table ----------------------------------------------------------------
RECORDED = Path(__file__).parent / "data" / "h100_energy.csv"


@pytest.mark.skipif(
    not RECORDED.is_file(),
    reason="tests/data/h100_energy.csv (recorded on an H100 by tools/energy_sweep.py) is not in this checkout yet",
)
def test_simulated_energy_tuning_on_the_recorded_h100_table(tmp_path, capsys):
    table = read_table(RECORDED)
    assert table.has_energy and not table.environment.get("synthetic")
    assert str(table.environment.get("device", "")).startswith("NVIDIA H100")
    assert table.protocol.get("energy") is True
    for row in table.rows:
        m = row.measurement
        if m.ok:
            assert m.energy_uj > 0 and m.idle_w > 0 and m.above_idle_uj <= m.energy_uj
        else:
            assert m.error  # every failure says why
    checked = 0
    for shape in table.shapes("h100"):
        frugal = table.best("h100", shape, 30.0, metric="energy_uj")
        if frugal is None:
            continue
        space = SearchSpace(Grid.from_configs(table.configs("h100")), shape.n, shape.d)
        run = tmp_path / f"{shape.workload}_{shape.batch}"
        code = cli.main(
            [
                "--simulate", str(RECORDED), "--workloads", shape.workload, "--batches", str(shape.batch),
                "--objective", "energy", "--sampler", "random", "--trials", str(space.size),
                "--storage", str(run / "j.log"), "--db", str(run / "db"),
            ]
        )  # fmt: skip
        assert code == 0, capsys.readouterr().err
        (e,) = yaml.safe_load((run / "db" / "h100.yaml").read_text())["entries"]
        # exhaustive over the recorded grid: the pick is the least energy, or a simpler config within 2 %
        assert e["energy_uj"] <= frugal.measurement.energy_uj * 1.02
        checked += 1
    assert checked >= 1


# -- the benchmark's energy section ----------------------------------------------------------------
def test_bench_energy_markdown_compares_with_the_best_sdpa_backend():
    """tools/bench.py's energy table on SYNTHETIC rows: saving vs the best (least-energy) backend."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", Path(__file__).parents[1] / "tools" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def row(wl, impl, uj, above):
        return {
            "workload": wl, "batch": 64, "mode": "energy", "impl": impl, "us": uj / 400.0,
            "energy_uj": uj, "energy_min_uj": uj * 0.99, "energy_max_uj": uj * 1.01,
            "above_idle_uj": above, "above_idle_min_uj": above, "above_idle_max_uj": above,
            "idle_w": 70.0, "busy_w": 400.0, "counter_step_ms": 20.0,
        }  # fmt: skip

    rows = [
        row("A4", "qflash_gen", 80.0, 60.0),
        row("A4", "sdpa_flash", 120.0, 90.0),
        row("A4", "sdpa_cudnn", 100.0, 75.0),  # the best backend: saving 20 % >= 18.8 %
        row("A3", "qflash_gen", 90.0, 70.0),
        row("A3", "sdpa_cudnn", 100.0, 80.0),  # saving 10 %: the goal is missed
        {"workload": "A3", "batch": 64, "mode": "graph", "impl": "qflash_gen", "us": 1.0},  # ignored
    ]
    md = bench.energy_markdown(rows, "fake counter", 1.0, 3)
    lines = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| A")}
    assert "100.0 (99.0–101.0) (sdpa_cudnn)" in lines["A4"] and "| 20.0% | 20.0% | yes |" in lines["A4"]
    assert "| 10.0% | 12.5% | no |" in lines["A3"] and "| n/a |" in lines["A3"]  # flash not measured there
    assert "3 rounds" in md and "fake counter" in md
