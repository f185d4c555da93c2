"""The YAML tuning DB contract: round trip, merge, concurrency, errors with file:line, staleness."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from qflash_gen import codegen, db
from qflash_gen.config import DEFAULT_CONFIG, KernelConfig, fits
from qflash_gen.keys import WorkloadKey, workload_key

PROTOCOL = {"method": "do_bench", "reps": 100, "warmup": 25, "l2_flush": True, "spread": "iqr"}
OLD_SOFTWARE = {"triton": "2.1.0", "template_hash": "0" * 64}


def entry(bh: int = 16, latency: float = 10.0, *, n: int = 197, d: int = 64, config=DEFAULT_CONFIG, **kw) -> db.Entry:
    kw.setdefault("protocol", PROTOCOL)
    return db.Entry(
        key=workload_key(1, bh, n, d),
        config=config,
        latency_us=latency,
        latency_spread_us=0.25,
        sqnr_db=37.5,
        trials=40,
        **kw,
    )


def line_of(path: Path, pattern: str, nth: int = 0) -> int:
    """1-based line of the nth line matching ``pattern`` (so tests never hard-code line numbers)."""
    hits = [i + 1 for i, text in enumerate(path.read_text().splitlines()) if re.search(pattern, text)]
    return hits[nth]


def edit_line(path: Path, line: int, new: str) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1] = new
    path.write_text("\n".join(lines) + "\n")


# -- round trip and merge ----------------------------------------------------------------------
def test_round_trip_keeps_every_field(tmp_path):
    cfg = KernelConfig(block_m=32, block_n=256, exp_variant="lut", lut_bits=5, rescale="idiv", rescale_bits=0)
    written = [
        entry(16, 11.5, config=cfg, measured_on_device="NVIDIA H100 80GB HBM3", energy_uj=3.5,
              baselines={"sdpa_flash": 15.0, "sdpa_cudnn": 14.2}),
        entry(128, 20.0, n=49, d=32),
    ]  # fmt: skip
    path = tmp_path / "h100.yaml"
    report = db.write_entries(path, written, search_space_hash="space-v1")
    assert sorted(report.added) == sorted(e.key.to_str() for e in written) and not report.replaced
    loaded = db.load_file(path)
    assert loaded.header.gpu == "h100" and loaded.header.search_space_hash == "space-v1"
    assert loaded.header.template_hash == codegen.template_hash()
    assert not loaded.stale
    for e in written:
        got = loaded.entries[e.key]
        expect = dataclasses.replace(e, software={**e.software, "search_space_hash": "space-v1"})
        assert got == expect
    # configs are stored as plain mappings, not str(config)
    raw = yaml.safe_load(path.read_text())
    assert raw["schema_version"] == db.SCHEMA_VERSION
    stored = {e["key"]: e["config"] for e in raw["entries"]}
    assert stored[written[0].key.to_str()] == cfg.to_dict()
    # an entry made with the header's software stores no per-entry software block
    assert all("software" not in e for e in raw["entries"])


def test_merge_keeps_the_better_entry_unless_forced(tmp_path):
    path = tmp_path / "h100.yaml"
    db.write_entries(path, [entry(16, 10.0)])
    slower = entry(16, 12.0, config=DEFAULT_CONFIG.replace(block_m=32))
    report = db.write_entries(path, [slower])
    assert report.kept == [slower.key.to_str()] and not report.replaced
    assert db.load_file(path).entries[slower.key].latency_us == 10.0
    faster = entry(16, 8.0, config=DEFAULT_CONFIG.replace(block_m=128))
    assert db.write_entries(path, [faster]).replaced == [faster.key.to_str()]
    assert db.load_file(path).entries[faster.key].config.block_m == 128
    db.write_entries(path, [slower], force=True)
    assert db.load_file(path).entries[slower.key].latency_us == 12.0


def test_energy_tuned_entries_merge_by_energy(tmp_path):
    path = tmp_path / "h100.yaml"
    proto = {**PROTOCOL, "tuner": {"objective": "energy"}}
    db.write_entries(path, [entry(16, 10.0, protocol=proto, energy_uj=500.0)])
    frugal = entry(16, 12.0, config=DEFAULT_CONFIG.replace(block_m=32), protocol=proto, energy_uj=400.0)
    assert db.write_entries(path, [frugal]).replaced == [frugal.key.to_str()]  # slower, but less energy
    hungry = entry(16, 8.0, config=DEFAULT_CONFIG.replace(block_m=128), protocol=proto, energy_uj=450.0)
    assert db.write_entries(path, [hungry]).kept == [hungry.key.to_str()]
    # A latency-tuned entry against an energy-tuned one: latency decides, as before.
    fast = entry(16, 7.0, config=DEFAULT_CONFIG.replace(block_m=16), energy_uj=900.0)
    assert db.write_entries(path, [fast]).replaced == [fast.key.to_str()]


def test_entries_of_other_software_are_kept_on_write(tmp_path):
    path = tmp_path / "h100.yaml"
    old = entry(16, 5.0, software={**db.running_software(), **OLD_SOFTWARE})
    db.write_entries(path, [old])
    db.write_entries(path, [entry(16, 50.0)])  # same key, running software: a different identity
    raw = yaml.safe_load(path.read_text())["entries"]
    assert len(raw) == 2
    kept = [e for e in raw if "software" in e]
    assert len(kept) == 1 and kept[0]["software"]["triton"] == "2.1.0" and kept[0]["latency_us"] == 5.0
    assert db.load_file(path).entries[old.key].latency_us == 50.0  # the fresh one is used
    db.write_entries(path, [], prune_stale=True)
    assert len(yaml.safe_load(path.read_text())["entries"]) == 1


def test_layers_user_overrides_shipped(tmp_path):
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    db.write_entries(shipped / "h100.yaml", [entry(16, 9.0), entry(64, 20.0)])
    layered = db.TuningDB([shipped, user])
    layered.write("h100", [entry(16, 30.0, config=DEFAULT_CONFIG.replace(block_m=16))])
    assert layered.path("h100") == user / "h100.yaml"
    got = layered.located("h100")
    k16, k64 = workload_key(1, 16, 197, 64), workload_key(1, 64, 197, 64)
    assert got[k16][0].config.block_m == 16 and got[k16][1] == user / "h100.yaml"
    assert got[k64][1] == shipped / "h100.yaml"
    assert layered.gpus() == ["h100"]
    with pytest.raises(ValueError, match="gpu="):
        layered.write("H100 PCIe", [entry()])


def test_user_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(db.ENV_DB_DIR, str(tmp_path))
    assert db.user_db_dir() == tmp_path
    assert db.TuningDB.default().write_dir == tmp_path
    monkeypatch.delenv(db.ENV_DB_DIR)
    assert db.user_db_dir().name == "tuning_db"


def test_shipped_db_files_all_load():
    """Contract for every file shipped in tuning_db/: valid, named after its GPU, nothing unsafe."""
    shipped = db.shipped_db_dir()
    assert shipped.is_dir() and shipped.name == "tuning_db"
    for path in sorted(shipped.glob("*.yaml")):
        loaded = db.load_file(path)
        assert loaded.header.gpu == path.stem
        assert not [s for s in loaded.stale if s.reason.startswith("unsafe")]


def test_entry_validation_names_the_field():
    with pytest.raises(ValueError, match="latency_us"):
        entry(latency=-1.0)
    with pytest.raises(ValueError, match="baselines"):
        entry(baselines={"sdpa_flash": float("nan")})
    with pytest.raises(ValueError, match="software"):
        entry(software={"tritonn": "3.0"})
    with pytest.raises(ValueError, match="protocol"):
        entry(protocol=["reps", 100])


def test_unstorable_values_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="protocol/baselines must be plain"):
        db.write_entries(tmp_path / "h100.yaml", [dataclasses.replace(entry(), protocol={"dtype": object()})])
    assert not (tmp_path / "h100.yaml").exists()


def test_write_refuses_a_file_of_another_gpu(tmp_path):
    with pytest.raises(ValueError, match="h100.yaml"):
        db.write_entries(tmp_path / "a100.yaml", [entry()], header=db.Header(gpu="h100"))


# -- concurrency -------------------------------------------------------------------------------
def _writer(path: str, worker: int, count: int) -> None:
    for i in range(count):
        # distinct keys per worker (bh buckets), plus one key every worker fights over
        own = entry(1 << (i % 16), 10.0 + i, n=100 + worker, d=64)
        shared = entry(8, 100.0 - 10 * worker - i * 0.01)
        db.write_entries(path, [own, shared])


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "h100.yaml"
    workers, count = 4, 16
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w, count)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * workers
    loaded = db.load_file(path)
    for w in range(workers):
        for i in range(count):
            assert workload_key(1, 1 << (i % 16), 100 + w, 64) in loaded.entries
    assert len(loaded.entries) == workers * 16 + 1
    best_shared = min(100.0 - 10 * w - i * 0.01 for w in range(workers) for i in range(count))
    assert loaded.entries[workload_key(1, 8, 197, 64)].latency_us == best_shared
    assert not list(tmp_path.glob(".h100.yaml.*.tmp"))  # no temp file left behind


# -- errors name file and line -----------------------------------------------------------------
@pytest.fixture
def good_file(tmp_path) -> Path:
    path = tmp_path / "h100.yaml"
    db.write_entries(path, [entry(16), entry(32), entry(64)])
    return path


def test_yaml_syntax_error_names_file_and_line(good_file):
    line = line_of(good_file, r"^\s+trials:", 1)
    edit_line(good_file, line, "  trials: 40: oops")
    with pytest.raises(db.DBError) as err:
        db.load_file(good_file)
    assert str(err.value).startswith(f"{good_file}:{line}:")
    assert err.value.line == line and err.value.path == good_file


@pytest.mark.parametrize(
    ("pattern", "nth", "replacement", "message"),
    [
        (r"^\s+latency_us:", 2, "  latency_us: -3.0", "latency_us"),
        (r"^\s+block_m:", 1, "    block_m: 63", "block_m"),
        (r"^- key:", 1, "- key: n197_d64_sometimes_bh16_fp16-fp16", "malformed"),
        (r"^\s+trials:", 0, "  trails: 40", "unknown field 'trails'"),
        (r"^\s+cuda:", 0, "  cuda: 12.4", "quote"),
        (r"^\s+gpu:", 0, "  gpu: a100", "foreign"),
        (r"^schema_version:", 0, "schema_version: 99", "newer"),
        (r"^\s+sqnr_db:", 1, "  sqnr_db: 37.5\n  sqnr_db: 38.0", "duplicate key 'sqnr_db'"),
    ],
)
def test_schema_errors_name_file_and_line(good_file, pattern, nth, replacement, message):
    line = line_of(good_file, pattern, nth)
    edit_line(good_file, line, replacement)
    expected_line = line + 1 if "duplicate" in message else line
    with pytest.raises(db.DBError, match=re.escape(message)) as err:
        db.load_file(good_file)
    assert str(err.value).startswith(f"{good_file}:{expected_line}:"), str(err.value)


def test_missing_field_points_at_its_entry(good_file):
    line = line_of(good_file, r"^\s+sqnr_db:", 2)
    edit_line(good_file, line, "")
    entry_line = line_of(good_file, r"^- key:", 2)
    with pytest.raises(db.DBError, match="missing field 'sqnr_db'") as err:
        db.load_file(good_file)
    assert err.value.line == entry_line


@pytest.mark.parametrize("text", ["- just\n- a list\n", "name: my-app\nversion: 3\n", "", "\x00\x01 binary"])
def test_foreign_files_are_rejected(tmp_path, text):
    path = tmp_path / "h100.yaml"
    path.write_text(text)
    with pytest.raises(db.DBError, match=re.escape(str(path)) + r":\d+:"):
        db.load_file(path)


def test_a_corrupt_file_is_never_overwritten(good_file):
    edit_line(good_file, line_of(good_file, r"^header:"), "header: [unclosed")
    before = good_file.read_bytes()
    with pytest.raises(db.DBError):
        db.write_entries(good_file, [entry(256)])
    assert good_file.read_bytes() == before


# -- staleness -----------------------------------------------------------------------------------
def test_entries_of_other_software_are_fallbacks_and_unmappable_ones_stale(tmp_path, caplog):
    path = tmp_path / "h100.yaml"
    running = db.running_software()
    other = [
        entry(16, software={**running, "triton": "2.1.0"}),  # same template, another Triton
        entry(32, software={**running, "template_hash": "f" * 64}),  # another template
        entry(64, software={**running, **OLD_SOFTWARE}),  # both
        entry(256, software={**running, "template_hash": "e" * 64}),  # another template, a field it lacks
    ]
    fresh = entry(128)
    db.write_entries(path, [*other, fresh])
    # Another template may have had other fields: one we do not know makes that entry stale (no
    # crash), one we have and it lacks takes our default.
    text = path.read_text()
    text = text.replace("  config:\n", "  config:\n    pack_heads: 2\n", 1)
    path.write_text(re.sub(r"(bh256_fp16-fp16\n  config:\n)    block_m: 64\n", r"\1", text))
    assert "pack_heads" in yaml.safe_load(path.read_text())["entries"][0]["config"]

    caplog.clear()  # the write's own note (tested below)
    with caplog.at_level(logging.INFO, logger="qflash_gen.db"):
        loaded = db.load_file(path)
        db.load_file(path)  # cached: no second line
        db.TuningDB([tmp_path]).entries("h100")
    assert list(loaded.entries) == [fresh.key]
    assert [s.key for s in loaded.stale] == [other[0].key.to_str()]
    assert "pack_heads" in loaded.stale[0].reason and "triton 2.1" in loaded.stale[0].reason
    tiers = {f.entry.key: (f.tier, f.label) for f in loaded.fallbacks}
    assert tiers == {
        other[1].key: (db.OTHER_TEMPLATE, "template-ffffffff"),
        other[2].key: (db.OTHER_TEMPLATE, "triton-2.1:template-00000000"),
        other[3].key: (db.OTHER_TEMPLATE, "template-eeeeeeee"),
    }
    assert loaded.tier(db.OTHER_TEMPLATE)[other[3].key].config.block_m == KernelConfig().block_m
    assert loaded.count(db.FRESH) == 1 and loaded.count(db.OTHER_TRITON) == 0
    records = [r for r in caplog.records if r.name == "qflash_gen.db"]
    assert [r.levelname for r in records] == ["INFO", "WARNING"]
    assert "3 entries of another Triton or template" in records[0].getMessage()
    assert "skipped 1 stale entry" in records[1].getMessage() and str(path) in records[1].getMessage()


def test_an_entry_of_another_triton_keeps_its_config(tmp_path):
    path = tmp_path / "h100.yaml"
    cfg = DEFAULT_CONFIG.replace(block_n=256)
    db.write_entries(path, [entry(16, config=cfg, software={**db.running_software(), "triton": "3.1.0"})])
    (fb,) = db.load_file(path).fallbacks
    assert fb.tier == db.OTHER_TRITON and fb.label == "triton-3.1" and fb.entry.config == cfg


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (("    block_m: 64\n", "    block_m: 63\n"), "block_m=63"),  # a value this KernelConfig refuses
        (("    acc_bits: 32\n", "    acc_bits: 32\n    block_q: 2\n"), "block_q"),  # a field it does not know
        (("  latency_us: 10.0\n", "  latency_us: -1.0\n"), "latency_us"),  # evidence that cannot be right
    ],
)
def test_entries_of_another_template_that_cannot_be_right_are_stale(tmp_path, edit, reason):
    path = tmp_path / "h100.yaml"
    db.write_entries(path, [entry(16, software={**db.running_software(), "template_hash": "f" * 64})])
    path.write_text(path.read_text().replace(*edit, 1))
    loaded = db.load_file(path)
    assert not loaded.fallbacks and not loaded.entries
    assert reason in loaded.stale[0].reason and "template" in loaded.stale[0].reason


def test_an_entry_of_another_template_that_can_overflow_is_stale(tmp_path):
    n = 1100
    assert not fits(DEFAULT_CONFIG, n, 64)
    path = tmp_path / "h100.yaml"
    db.write_entries(path, [entry(16, n=n, config=DEFAULT_CONFIG.replace(acc_bits=64))])
    text = path.read_text().replace("    acc_bits: 64\n", "    acc_bits: 32\n")
    path.write_text(text.replace(codegen.template_hash(), "f" * 64))
    loaded = db.load_file(path)
    assert not loaded.fallbacks and "unsafe for its workload" in loaded.stale[0].reason


def test_unsafe_entry_is_skipped_not_used(tmp_path, caplog):
    n = 1100  # several key tiles: the int32 default (14-bit P) can overflow here
    assert not fits(DEFAULT_CONFIG, n, 64)
    path = tmp_path / "h100.yaml"
    path.parent.mkdir(exist_ok=True)
    ok = entry(16, n=n, config=DEFAULT_CONFIG.replace(acc_bits=64))
    db.write_entries(path, [ok])
    raw = yaml.safe_load(path.read_text())
    raw["entries"].append({**raw["entries"][0], "key": workload_key(1, 32, n, 64).to_str(),
                           "config": DEFAULT_CONFIG.to_dict()})  # fmt: skip
    raw["header"]["entry_count"] = len(raw["entries"])  # a hand edit keeps the count right
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with caplog.at_level(logging.WARNING, logger="qflash_gen.db"):
        loaded = db.load_file(path)
    assert list(loaded.entries) == [ok.key]
    assert [s.reason.split(":")[0] for s in loaded.stale] == ["unsafe for its workload"]
    assert len([r for r in caplog.records if r.name == "qflash_gen.db"]) == 1


def test_triton_minor_parses_without_eval():
    assert db.triton_minor("3.6.0") == "3.6"
    assert db.triton_minor("3.10.1+git8a5b") == "3.10"
    assert db.triton_minor(None) == "None"
    assert db.stale_reason(db.running_software()) is None


def test_key_strings_round_trip():
    for key in (workload_key(8, 12, 197, 64), workload_key(1, 3, 49, 32, masked=True, in_dtype="int8")):
        assert WorkloadKey.from_str(key.to_str()) == key


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_mutated_files_load_or_raise_dberror_only(data, tmp_path_factory):
    """Any damage to a valid file gives a usable DB or a DBError, never another exception."""
    path = tmp_path_factory.mktemp("fuzz") / "h100.yaml"
    db.write_entries(path, [entry(16), entry(32, software={**db.running_software(), **OLD_SOFTWARE})])
    text = path.read_text()
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(text) - 1))
        text = (
            text[:i]
            + data.draw(st.sampled_from([":", "-", "[", "{", "'", "#", "\n", " ", "0", "x", ""]))
            + text[i + 1 :]
        )
    path.write_text(text)
    try:
        loaded = db.load_file(path)
    except db.DBError as exc:
        assert str(exc).startswith(str(path))
    else:
        assert all(isinstance(e, db.Entry) for e in loaded.entries.values())
