"""The tuner on a table recorded by tools/sweep.py (real measurements, replayed on CPU).

Every recorded table in tests/data runs: the H200 table (tests/data/h200_sweep.csv, 14-bit P, the
tune grid's axes, recorded in the eighth session by the command in docs/tuner-efficiency.md) and
the H100 table recorded with::

    python tools/sweep.py --gpu h100 --workloads vit_b,swin_t --batches 8,64 --record tests/data/h100_sweep.csv

On the H200 table most starts are already within 3 % of the best (the default 64x64 4-warp tile
is on every Swin-S stage, the shipped entries on every shape), so the H100 table, where the
defaults are far from the optimum, is the one that keeps the search itself judged.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from helpers import shipped_db_of

from qflash_gen import db, workloads
from qflash_gen.config import KernelConfig
from qflash_gen.tune import cli, setup
from qflash_gen.tune.measure import ShapeSpec
from qflash_gen.tune.plan import StudyPlan, make_plans
from qflash_gen.tune.table import Table, read_table
from qflash_gen.tune.trials import record_from_trial

DATA = Path(__file__).parent / "data"
TABLES = [p for p in (DATA / "h200_sweep.csv", DATA / "h100_sweep.csv") if p.is_file()]
# the shapes each table was recorded for (issue 4: vit_b, swin_t at b=8, 64; issue 17: vit_b, swin_s)
ISSUE_SHAPES = {"h100": ("vit_b,swin_t", (8, 64)), "h200": ("vit_b,swin_s", (64,))}
pytestmark = pytest.mark.skipif(not TABLES, reason="no table recorded by tools/sweep.py in tests/data")
FLOOR = 30.0
BUDGET_FRACTION = 0.2  # issue 17: within 3 % of the optimum measuring 20 % of the table's configs
WITHIN = 1.03  # "within 3 % of the table's best"
# Shapes of the H100 table whose starting point (every config a study measures before it searches)
# is NOT already within 3 % of the best, per --warm-start mode ("db": what --simulate uses by
# default; "none": a cold start).  Only these judge the search; fewer of them than this is a
# failure (the check would have become trivial), not a silent pass.
# The H200 table (measured): from the shipped DBs every shape starts within 3 %; from a cold start
# only vit_b b=64 does not (the default 64x64 tile is 1.36x the best there).
MIN_HARD = {"h100": {"db": 3, "none": 5}, "h200": {"db": 0, "none": 1}}
MIN_HARD_OTHER_TABLE = 2


@pytest.fixture(scope="module", params=TABLES, ids=[p.name.split("_")[0] for p in TABLES])
def table(request):
    return read_table(request.param)


def gpu_of(table: Table) -> str:
    (gpu,) = table.gpus()
    return gpu


def plans_for(argv: list[str]) -> list[StudyPlan]:
    """The studies ``qflash-tune argv`` runs, each with the configs it measures first (its warm
    starts), computed as the CLI computes them: call it BEFORE the run, which writes the DB the
    warm starts read."""
    args = cli.build_parser().parse_args([str(a) for a in argv])
    measurer, dtype = setup.simulated(args)
    try:
        grid = setup.grid_for(args, measurer)
        return make_plans(args, measurer.gpu, dtype, setup.shapes_from(args), grid, enqueue_db=True)
    finally:
        measurer.close()


def start_latency(table: Table, gpu: str, shape: ShapeSpec, configs: list[KernelConfig], floor: float) -> float | None:
    """The best latency, in the table, of ``configs`` that meet the floor (None: none does)."""
    found = [table.lookup(gpu, shape, c) for c in configs]
    ok = [m.latency_us for m in found if m is not None and m.feasible(floor)]
    return min(ok) if ok else None


def is_hard(start_us: float | None, best_us: float) -> bool:
    """True where a search has something to find: the start is not already within 3 % of the best."""
    return start_us is None or start_us > WITHIN * best_us


def measured_configs(storage: Path | str, name: str) -> list[KernelConfig]:
    """The configs the study ``name`` measured, in trial order (duplicates and skips left out)."""
    import optuna

    backend = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(storage)))
    trials = sorted(optuna.load_study(study_name=name, storage=backend).trials, key=lambda t: t.number)
    return [r.config for r in map(record_from_trial, trials) if r is not None]


def test_table_covers_the_issue_shapes(table):
    GPU = gpu_of(table)
    assert not table.environment.get("synthetic")
    assert str(table.environment.get("device", "")).startswith(f"NVIDIA {GPU.upper()}")
    have = {s.match_key() for s in table.shapes(GPU)}
    names, batches = ISSUE_SHAPES[GPU]
    for w in workloads.resolve(names):
        for batch in batches:
            assert ShapeSpec.of(w, batch).match_key() in have, (w.name, batch)
    for row in table.rows:
        if row.measurement.correct:
            assert row.measurement.latency_us > 0 and row.measurement.sqnr_db is not None
        else:
            assert row.measurement.error  # every failure says why


@pytest.mark.parametrize("warm_start", ["db", "none"])
def test_simulated_tuning_reaches_the_recorded_best(table, tmp_path, capsys, warm_start, monkeypatch):
    """``qflash-tune --simulate`` as a user runs it (default options, an empty --db: ``db``) and
    from a cold start (``--warm-start none``), with a budget of 20 % of each shape's configs.

    The search is judged only on shapes whose starting point (every warm start, looked up in the
    table) is not already within 3 % of the table's best: elsewhere the first trial passes.  The
    default run still tunes every shape (its entry must be as good); the cold run only the hard ones.
    The runtime's pick comes from the table's own card's shipped file (``shipped_db_of``)."""
    GPU, TABLE = gpu_of(table), table.path
    own = [GPU] if (db.shipped_db_dir() / db.file_name(GPU)).is_file() else []
    shipped_db_of(monkeypatch, tmp_path / "shipped", *own)
    checked, trivial = [], []
    for shape in table.shapes(GPU):
        best = table.best(GPU, shape, FLOOR)
        if best is None:
            continue
        best_us = best.measurement.latency_us
        db_dir = tmp_path / f"db-{shape.workload}-b{shape.batch}"  # one DB per shape: buckets can collide
        storage = tmp_path / "s.journal"
        argv = ["--simulate", str(TABLE), "--workloads", shape.workload, "--batches", str(shape.batch),
                "--storage", str(storage), "--db", str(db_dir), "--quiet"]  # fmt: skip
        if warm_start != "db":
            argv += ["--warm-start", warm_start]
        (plan,) = plans_for(argv)
        start_us = start_latency(table, GPU, shape, plan.enqueue, FLOOR)
        hard = is_hard(start_us, best_us)
        if not hard:
            trivial.append(shape.label())
            if warm_start != "db":
                continue  # nothing to judge, and the default run below already tunes it
        # 20 % of the table, at most 150 trials: the H200 table's 2,016-config shape would take
        # ~20 s of TPE at 403 (the median over 10 seeds is tests/test_tune_efficiency.py's)
        budget = max(5, min(150, math.ceil(BUDGET_FRACTION * plan.space.size)))
        code = cli.main([*argv, "--trials", str(budget)])
        assert code == 0, capsys.readouterr().err
        doc = yaml.safe_load((db_dir / f"{GPU}.yaml").read_text())
        entry = next(
            e
            for e in doc["entries"]
            if e["protocol"]["workload"] == shape.workload and e["protocol"]["batch"] == shape.batch
        )
        assert entry["latency_us"] <= WITHIN * best_us, (shape.label(), entry["config"])
        assert entry["protocol"]["source"] == "simulated" and entry["protocol"]["table_sha256"] == table.sha256
        config = KernelConfig.from_dict(entry["config"])
        assert table.lookup(GPU, shape, config).feasible(FLOOR)
        if hard:
            measured = measured_configs(storage, plan.name)
            # the start judged above is what the study measured first, and the search went past it
            assert measured[: len(plan.enqueue)] == plan.enqueue, shape.label()
            assert len(plan.enqueue) < len(measured) <= budget
            assert config not in plan.enqueue and config in measured[len(plan.enqueue) :]
            checked.append(shape.label())
    want = MIN_HARD.get(GPU, {}).get(warm_start, MIN_HARD_OTHER_TABLE)
    assert len(checked) >= want, (
        f"{TABLE.name}, --warm-start {warm_start}: only {len(checked)} shapes ({checked}) start more than 3 % "
        f"from the table's best (already within: {trivial}); the search is judged on too few"
    )
