"""get_kernel: workload keys, the lookup chain (exact / nearest / default), the call vs the oracle."""

from __future__ import annotations

import dataclasses
import logging
import shutil

import pytest
import torch

from qflash_gen import api, checks, codegen, db, kernel, launch, quant, reference
from qflash_gen.config import DEFAULT_CONFIG, KernelConfig, default_config, fits
from qflash_gen.keys import BH_BUCKET_MAX, WorkloadKey, bh_bucket, key_distance, nearest_key, workload_key

# Kernel launches: compiled on a GPU, Triton's interpreter on CPU (tests/conftest.py sets
# TRITON_INTERPRET=1 when there is no GPU; the `device` fixture says where kernels run).
requires_launch = pytest.mark.skipif(
    not (torch.cuda.is_available() or checks.interpreter_active()),
    reason="launching the kernel needs CUDA or TRITON_INTERPRET=1 in the environment",
)

# A config far from the default, so "it ran the DB's config" is visible in the result and source.
TUNED = KernelConfig(block_m=16, block_n=32, num_warps=2, num_stages=1, exp_variant="poly2", rescale_bits=4)


def make_entry(key: WorkloadKey, config: KernelConfig = TUNED, latency: float = 10.0) -> db.Entry:
    return db.Entry(
        key=key,
        config=config,
        latency_us=latency,
        latency_spread_us=0.1,
        sqnr_db=35.0,
        trials=12,
        protocol={"method": "recorded"},
    )


@pytest.fixture
def tdb(tmp_path) -> db.TuningDB:
    kernel.clear_cache()
    return db.TuningDB([tmp_path / "shipped", tmp_path / "user"])


# -- workload keys ------------------------------------------------------------------------------
def test_bh_buckets_are_ceiling_powers_of_two():
    for bh in (1, 2, 3, 5, 12, 96, 768, 1000, 4096, 4097, BH_BUCKET_MAX, BH_BUCKET_MAX * 3):
        b = bh_bucket(bh)
        assert b & (b - 1) == 0 and b <= BH_BUCKET_MAX
        assert b == BH_BUCKET_MAX or b // 2 < bh <= b
    with pytest.raises(ValueError, match="B\\*H"):
        bh_bucket(0)


def test_workload_key_forms_and_defaults():
    by_shape = workload_key(torch.Size([8, 12, 197, 64]))
    assert by_shape == workload_key(8, 12, 197, 64)
    assert by_shape.to_str() == f"n197_d64_nomask_bh{bh_bucket(96)}_fp16-fp16"
    assert workload_key((1, 3, 49, 32), masked=True, in_dtype=torch.int8).to_str().endswith("_mask_bh4_int8-int8")
    assert workload_key(1, 1, 49, 32, in_dtype="bfloat16", out_dtype=torch.int8).out_dtype == "int8"
    for bad, arg in (((1, 1, 49), "shape"), ((1, 1, 0, 32), "shape"), ((1, 1, 49, 32.0), "shape")):
        with pytest.raises(ValueError, match=arg):
            workload_key(*bad)
    with pytest.raises(ValueError, match="in_dtype"):
        workload_key(1, 1, 49, 32, in_dtype=torch.int32)
    with pytest.raises(ValueError, match="malformed"):
        WorkloadKey.from_str("n197_d64_nomask_bh16_fp16")
    with pytest.raises(ValueError, match="bh_bucket"):
        WorkloadKey.from_str("n197_d64_nomask_bh3_fp16-fp16")


def test_key_distance_and_nearest():
    k = workload_key(1, 64, 197, 64)
    near, far = workload_key(1, 16, 197, 64), workload_key(1, 1024, 197, 64)
    assert key_distance(k, near) == 2 and key_distance(k, far) == 4
    assert key_distance(k, workload_key(1, 64, 196, 64)) == float("inf")
    assert key_distance(k, workload_key(1, 64, 197, 64, masked=True)) == float("inf")
    assert nearest_key(k, [far, near]) == near
    below, above = workload_key(1, 32, 197, 64), workload_key(1, 128, 197, 64)
    assert nearest_key(k, [above, below]) == below  # documented tie-break: the smaller bucket
    assert nearest_key(k, [workload_key(1, 64, 197, 64, out_dtype=torch.int8)]) is None


# -- lookup chain -----------------------------------------------------------------------------
def test_exact_lookup(tdb):
    shape = (2, 6, 197, 64)
    assert fits(TUNED, 197, 64) and fits(TUNED, 40, 32)  # else the DB would (rightly) skip it
    tdb.write("h100", [make_entry(workload_key(shape))])
    kern = kernel.get_kernel(shape, gpu="h100", db=tdb)
    assert kern.why == "exact" and kern.config == TUNED and kern.gpu == "h100"
    assert kern.key == workload_key(shape) and kern.entry.latency_us == 10.0
    assert kern.origin == tdb.path("h100")
    assert kern.source == codegen.render(TUNED)
    assert kernel.get_kernel(shape, gpu="h100", db=tdb) is kern  # cached per (db, gpu, key)


def test_nearest_lookup_stays_within_n_d_mask_and_dtypes(tdb):
    other = TUNED.replace(block_m=32)
    tdb.write(
        "h100",
        [
            make_entry(workload_key(1, 16, 197, 64), TUNED),
            make_entry(workload_key(1, 1024, 197, 64), other),
            make_entry(workload_key(1, 64, 197, 64, masked=True), other),
            make_entry(workload_key(1, 64, 577, 64), DEFAULT_CONFIG.replace(acc_bits=64)),
        ],
    )
    kern = kernel.get_kernel((4, 16, 197, 64), gpu="h100", db=tdb)
    assert kern.why == f"nearest:{workload_key(1, 16, 197, 64).to_str()}"
    assert kern.config == TUNED and kern.key == workload_key(4, 16, 197, 64)
    # same N, D, but int8 output: no entry shares the dtypes -> default
    kern8 = kernel.get_kernel((4, 16, 197, 64), gpu="h100", db=tdb, out_dtype=torch.int8)
    assert kern8.why == "default"


def test_default_lookup(tdb, monkeypatch):
    kern = kernel.get_kernel((1, 12, 197, 64), gpu="h100", db=tdb)
    assert kern.why == "default" and kern.entry is None
    assert kern.config == default_config(197, 64)
    big = kernel.get_kernel((1, 12, 1100, 64), gpu="h200", db=tdb)
    assert big.config == default_config(1100, 64) and big.config.acc_bits == 64


def test_a_gpu_without_entries_takes_a_sibling_of_its_architecture(tdb):
    """An H200 (sm_90) with no usable entry of its own runs the H100's tuned config: exact key
    first, then the nearest bucket; never a card of another architecture, never a MIG slice."""
    shape = (2, 6, 197, 64)
    near_cfg = TUNED.replace(block_m=32)
    tdb.write("h100", [make_entry(workload_key(shape)), make_entry(workload_key(1, 1024, 197, 64), near_cfg)])
    tdb.write("a100", [make_entry(workload_key(1, 1, 49, 32), TUNED.replace(num_warps=4))])
    assert kernel.siblings("h200", tdb) == ["h100"] and kernel.siblings("h100", tdb) == []
    assert kernel.siblings("h100_mig_1g.10gb", tdb) == [] and kernel.siblings("a30", tdb) == ["a100"]
    kern = kernel.get_kernel(shape, gpu="h200", db=tdb)
    assert kern.why == "sibling:h100:exact" and kern.config == TUNED and kern.gpu == "h200"
    assert kern.origin == tdb.path("h100")
    far = kernel.get_kernel((64, 6, 197, 64), gpu="h200", db=tdb)  # bh 384: bucket 1024 is nearest
    assert far.why == f"sibling:h100:nearest:{workload_key(1, 1024, 197, 64).to_str()}" and far.config == near_cfg
    # b200 (sm_100) has no sibling with a file: the default
    assert kernel.get_kernel(shape, gpu="b200", db=tdb).why == "default"
    # the GPU's own nearest bucket wins over a sibling's exact entry
    tdb.write("h200", [make_entry(workload_key(1, 1, 197, 64), TUNED.replace(num_stages=2))])
    own = kernel.get_kernel(shape, gpu="h200", db=tdb)
    assert own.why == f"nearest:{workload_key(1, 1, 197, 64).to_str()}" and own.config.num_stages == 2


def test_a_stale_own_file_falls_back_to_the_sibling(tdb, tmp_path):
    shape = (1, 12, 197, 64)
    tdb.write("h100", [make_entry(workload_key(shape))])
    tdb.write("h200", [make_entry(workload_key(shape), TUNED.replace(num_stages=2))])
    path = tdb.path("h200")
    path.write_text(path.read_text().replace(codegen.template_hash(), "f" * 64))  # another template
    kernel.clear_cache()
    assert not tdb.located("h200")  # skipped as stale
    kern = kernel.get_kernel(shape, gpu="h200", db=tdb)
    assert kern.why == "sibling:h100:exact" and kern.config == TUNED


# -- the ladder: fresh, then another Triton, then another template (issue 20) ----------------------
OTHER_TRITON = {"triton": "3.6.0"}
OTHER_TEMPLATE = {"template_hash": "f" * 64}


def other_entry(key: WorkloadKey, config: KernelConfig = TUNED, latency: float = 10.0, **software) -> db.Entry:
    e = make_entry(key, config, latency)
    running = db.running_software()
    assert db.triton_minor(running["triton"]) != "3.6"  # else "another Triton" would be this one
    return dataclasses.replace(e, software={**running, **software})


def test_an_entry_of_another_triton_is_used_and_named(tdb):
    shape = (2, 6, 197, 64)
    tdb.write("h100", [other_entry(workload_key(shape), **OTHER_TRITON)])
    kern = kernel.get_kernel(shape, gpu="h100", db=tdb)
    assert kern.why == "exact:triton-3.6" and kern.config == TUNED and kern.origin == tdb.path("h100")
    far = kernel.get_kernel((64, 6, 197, 64), gpu="h100", db=tdb)
    assert far.why == f"nearest:{workload_key(shape).to_str()}:triton-3.6" and far.config == TUNED


def test_an_entry_of_another_template_is_mapped_and_named(tdb):
    shape = (2, 6, 197, 64)
    tdb.write("h100", [other_entry(workload_key(shape), **OTHER_TEMPLATE)])
    kern = kernel.get_kernel(shape, gpu="h100", db=tdb)
    assert kern.why == "exact:template-ffffffff" and kern.config == TUNED
    kernel.clear_cache()
    tdb.write("h100", [other_entry(workload_key(shape), **OTHER_TEMPLATE, **OTHER_TRITON)])
    assert kernel.get_kernel(shape, gpu="h100", db=tdb).why == "exact:triton-3.6:template-ffffffff"


def test_a_field_the_config_lacks_takes_its_default_and_what_cannot_be_right_is_refused(tdb):
    shape = (2, 6, 197, 64)
    tdb.write("h100", [other_entry(workload_key(shape), **OTHER_TEMPLATE)])
    path = tdb.path("h100")
    text = path.read_text()
    path.write_text(text.replace("    rescale_bits: 4\n", ""))  # a template before the field existed
    kernel.clear_cache()
    kern = kernel.get_kernel(shape, gpu="h100", db=tdb)
    assert kern.why == "exact:template-ffffffff" and kern.config == TUNED.replace(rescale_bits=8)
    for bad in ("    block_m: 16\n    pack_heads: 2\n", "    block_m: 17\n"):  # unknown field; invalid value
        path.write_text(text.replace("    block_m: 16\n", bad))
        kernel.clear_cache()
        assert kernel.get_kernel(shape, gpu="h100", db=tdb).why == "default"


def test_an_entry_of_another_template_that_cannot_run_the_shape_is_refused(tdb):
    n = 1100  # the int32 default can overflow here (test_db.py: unsafe entries)
    assert not fits(DEFAULT_CONFIG, n, 64)
    tdb.write("h100", [other_entry(workload_key(1, 1, n, 64), DEFAULT_CONFIG.replace(acc_bits=64), **OTHER_TEMPLATE)])
    path = tdb.path("h100")
    path.write_text(path.read_text().replace("    acc_bits: 64\n", "    acc_bits: 32\n"))
    kernel.clear_cache()
    kern = kernel.get_kernel((1, 1, n, 64), gpu="h100", db=tdb)
    assert kern.why == "default" and kern.config == default_config(n, 64)


def test_the_ladder_climbs_tier_by_tier(tdb):
    """Fresh (exact, nearest, sibling) before another Triton, before another template."""
    shape, near = (2, 6, 197, 64), workload_key(1, 1, 197, 64)
    a, b, c = TUNED.replace(num_stages=2), TUNED.replace(num_warps=4), TUNED.replace(block_n=64)
    tdb.write("h100", [other_entry(workload_key(shape), c, **OTHER_TEMPLATE)])
    tdb.write("h200", [other_entry(workload_key(shape), b, **OTHER_TRITON)])
    kern = kernel.get_kernel(shape, gpu="h200", db=tdb)
    assert kern.why == "exact:triton-3.6" and kern.config == b  # own other-Triton before sibling's other-template
    kernel.clear_cache()
    tdb.write("h100", [make_entry(near, a)])  # a fresh entry on the sibling, at another bucket
    kern = kernel.get_kernel(shape, gpu="h200", db=tdb)
    assert kern.why == f"sibling:h100:nearest:{near.to_str()}" and kern.config == a
    assert kern.gpu == "h200" and kern.origin == tdb.path("h100")
    kernel.clear_cache()
    tdb.write("h200", [make_entry(near, TUNED)])  # ... and one of its own
    assert kernel.get_kernel(shape, gpu="h200", db=tdb).why == f"nearest:{near.to_str()}"
    # with no fresh entry anywhere, a sibling's other-template entry beats the default
    kernel.clear_cache()
    assert kernel.get_kernel(shape, gpu="h200", db=db.TuningDB([tdb.dirs[0]])).why == "default"
    sib = db.TuningDB([tdb.dirs[0] / "sib"])
    sib.write("h100", [other_entry(workload_key(shape), c, **OTHER_TEMPLATE)])
    kern = kernel.get_kernel(shape, gpu="h200", db=sib)
    assert kern.why == "sibling:h100:exact:template-ffffffff" and kern.config == c


def test_the_shipped_db_serves_this_triton(tmp_path):
    """issue 20: the shipped H100 entries (tuned under another Triton and template) are used on
    the H100 (its file alone here: with the H200's file beside it, whose entries are of the
    current template, the ladder serves those first); the H200 reads its own shipped file, or
    the H100's through the sibling step; .why names the Triton."""
    kernel.clear_cache()
    shipped_dir = db.shipped_db_dir()
    shutil.copy(shipped_dir / "h100.yaml", tmp_path / "h100.yaml")
    kern = kernel.get_kernel((64, 12, 197, 64), gpu="h100", db=db.TuningDB([tmp_path]))
    assert kern.why != "default" and kern.entry is not None and kern.origin == tmp_path / "h100.yaml"
    label = db.software_label(kern.entry.software)
    assert kern.why == ("exact" if not label else f"exact:{label}")
    if db.triton_minor(kern.entry.software["triton"]) != db.triton_minor(db.running_software()["triton"]):
        assert f"triton-{db.triton_minor(kern.entry.software['triton'])}" in kern.why
    kernel.clear_cache()
    h200 = kernel.get_kernel((64, 12, 197, 64), gpu="h200", db=db.TuningDB([shipped_dir]))
    assert h200.why != "default" and h200.entry is not None
    if (shipped_dir / "h200.yaml").is_file():
        label = db.software_label(h200.entry.software)
        assert h200.origin == shipped_dir / "h200.yaml" and h200.why == ("exact" if not label else f"exact:{label}")
    else:
        assert h200.why.startswith("sibling:h100:")


def test_a_fallback_step_is_logged_once(tdb, caplog):
    kernel.clear_cache(log_again=True)
    tdb.write("h100", [other_entry(workload_key(1, 12, 197, 64), **OTHER_TRITON)])
    with caplog.at_level(logging.INFO, logger="qflash_gen.kernel"):
        for _ in range(3):
            kernel.get_kernel((1, 12, 197, 64), gpu="h100", db=tdb)
            kernel.clear_cache()
    lines = [r.getMessage() for r in caplog.records if r.name == "qflash_gen.kernel"]
    assert len(lines) == 1 and "exact:triton-3.6" in lines[0]


def test_fallback_logged_once_per_key(tdb, caplog):
    kernel.clear_cache(log_again=True)
    with caplog.at_level(logging.INFO, logger="qflash_gen.kernel"):
        for _ in range(3):
            kernel.get_kernel((1, 12, 197, 64), gpu="h100", db=tdb)
        kernel.clear_cache()
        kernel.get_kernel((1, 12, 197, 64), gpu="h100", db=tdb)
        kernel.get_kernel((1, 3, 197, 64), gpu="h100", db=tdb)
    lines = [r.getMessage() for r in caplog.records if r.name == "qflash_gen.kernel"]
    assert len(lines) == 2 and all("default" in line for line in lines)


def test_a_write_in_this_process_refreshes_the_choice(tdb):
    shape = (1, 12, 197, 64)
    assert kernel.get_kernel(shape, gpu="h100", db=tdb).why == "default"
    tdb.write("h100", [make_entry(workload_key(shape))])
    assert kernel.get_kernel(shape, gpu="h100", db=tdb).why == "exact"


def test_user_layer_wins_over_shipped(tdb, tmp_path):
    key = workload_key(1, 12, 197, 64)
    db.write_entries(tmp_path / "shipped" / "h100.yaml", [make_entry(key, TUNED, latency=1.0)])
    assert kernel.get_kernel((1, 12, 197, 64), gpu="h100", db=tdb).config == TUNED
    tdb.write("h100", [make_entry(key, TUNED.replace(block_m=64), latency=50.0)])
    kern = kernel.get_kernel((1, 12, 197, 64), gpu="h100", db=tdb)
    assert kern.config.block_m == 64 and kern.origin == tmp_path / "user" / "h100.yaml"


def test_gpu_names(tdb):
    with pytest.raises(ValueError, match=r"gpu='h1000' is not a known GPU.*'h100'"):
        kernel.get_kernel((1, 1, 49, 32), gpu="h1000", db=tdb)
    # an unknown card with its own DB file is accepted
    key = workload_key(1, 1, 49, 32)
    tdb.write("amd_instinct_mi300x", [make_entry(key)])
    assert kernel.get_kernel((1, 1, 49, 32), gpu="amd_instinct_mi300x", db=tdb).why == "exact"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_and_without_gpu_the_default_runs(tdb):
    kern = kernel.get_kernel((1, 2, 49, 32), db=tdb)
    assert kern.gpu == kernel.CPU and kern.why == "default"


def test_bad_shapes(tdb):
    with pytest.raises(ValueError, match="head_dim D=48"):
        kernel.get_kernel((1, 1, 49, 48), gpu="h100", db=tdb)
    with pytest.raises(ValueError, match="shape"):
        kernel.get_kernel(torch.zeros(1, 1, 49, 32), gpu="h100", db=tdb)
    with pytest.raises(ValueError, match="N=0"):
        kernel.get_kernel((1, 1, 0, 32), gpu="h100", db=tdb)
    assert kernel.get_kernel((0, 12, 49, 32), gpu="h100", db=tdb).key.bh_bucket == 1


def test_corrupt_db_is_an_error_naming_the_file(tdb):
    path = tdb.path("h100")
    path.parent.mkdir(parents=True)
    path.write_text("schema_version: 1\nheader: {gpu: h100}\nentries:\n- key: [\n")
    with pytest.raises(db.DBError, match=str(path) + r":\d+:"):
        kernel.get_kernel((1, 1, 49, 32), gpu="h100", db=tdb)


def test_runtime_on_cpu_keeps_the_default():
    q = torch.zeros(1, 2, 49, 32, dtype=torch.int8)
    assert api.resolve_config(None, 49, 32, q=q) == default_config(49, 32)
    assert api.resolve_config(None, 577, 64) == default_config(577, 64)


# -- the call -----------------------------------------------------------------------------------
def _inputs(shape, seed, device):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(-127, 128, shape, dtype=torch.int8, generator=g).to(device) for _ in range(3)]


@pytest.mark.gpu
@requires_launch
def test_call_equals_the_oracle_without_per_call_config_work(tdb, monkeypatch, device):
    shape = (1, 2, 40, 32)  # N=40: two key tiles of the tuned block_n=32, so the rescale path runs
    tdb.write("h100", [make_entry(workload_key(shape, in_dtype=torch.int8))])
    kern = kernel.get_kernel(shape, dtype=torch.int8, gpu="h100", db=tdb)
    assert kern.why == "exact" and kern.config == TUNED
    scales = (0.021, 0.017, 0.011)
    q8, k8, v8 = _inputs(shape, 0, device)
    out = kern(q8, k8, v8, scales)
    params = quant.make_params(*scales, head_dim=32, device=device)
    assert out.dtype == torch.int8
    assert torch.equal(out, reference.reference_int8(q8, k8, v8, params, TUNED))

    # Second call: no config hashing, no module loading, no DB reading on the call path.
    def forbidden(*args, **kwargs):
        raise AssertionError("per-call work on the hot path")

    monkeypatch.setattr(codegen, "load", forbidden)
    monkeypatch.setattr(KernelConfig, "hash", property(forbidden))
    monkeypatch.setattr(db, "load_file", forbidden)
    mask = torch.rand(1, 1, 40, 40, generator=torch.Generator().manual_seed(1)).to(device) > 0.3
    q8, k8, v8 = _inputs(shape, 2, device)
    out16 = kern(q8, k8, v8, scales, mask, out_dtype=torch.float16)
    bias = quant.bias_to_int(mask, params)
    expect = reference.reference_int8(q8, k8, v8, params, TUNED, bias=bias, out_dtype=torch.float16)
    assert torch.equal(out16, expect)


@pytest.mark.gpu
@requires_launch
def test_call_with_device_scales_and_out_buffer(tdb, device):
    shape = (2, 1, 24, 32)
    kern = kernel.get_kernel(shape, dtype=torch.int8, gpu="h100", db=tdb)
    assert kern.why == "default"
    scales = tuple(torch.tensor(s, device=device) for s in (0.02, 0.02, 0.015))
    q8, k8, v8 = _inputs(shape, 3, device)
    out = torch.empty(shape, dtype=torch.int8, device=device)
    got = kern(q8, k8, v8, scales, out=out)
    params = quant.make_params(*scales, head_dim=32, device=device)
    assert got is out
    assert torch.equal(out, reference.reference_int8(q8, k8, v8, params, kern.config))


def test_call_rejects_what_the_kernel_was_not_looked_up_for(tdb):
    kern = kernel.get_kernel((1, 2, 40, 32), dtype=torch.int8, gpu="h100", db=tdb)
    q8 = torch.zeros(1, 2, 41, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match="N=41, D=32 but this kernel is for N=40"):
        kern(q8, q8, q8, (0.1, 0.1, 0.1))
    i16 = torch.zeros(1, 2, 40, 32, dtype=torch.int16)
    with pytest.raises(ValueError, match="q has dtype torch.int16"):
        kern(i16, i16, i16, (0.1, 0.1, 0.1))
    f = torch.zeros(1, 2, 40, 32)  # float inputs are taken (static scales), but not mixed with int8
    with pytest.raises(ValueError, match="one dtype"):
        kern(f, q8[:, :, :40], f, (0.1, 0.1, 0.1))
    ok = torch.zeros(1, 2, 40, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match="scales"):
        kern(ok, ok, ok, (0.1, 0.1))
    with pytest.raises(ValueError, match="out_dtype"):
        kern(ok, ok, ok, (0.1, 0.1, 0.1), out_dtype=torch.int32)
    with pytest.raises(ValueError, match="out must be"):
        kern(ok, ok, ok, (0.1, 0.1, 0.1), out=torch.empty(1, 2, 40, 32))


# -- on a GPU (pytest -m gpu on the device machine) -------------------------------------------
@pytest.mark.cuda_only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_attention_uses_the_db_on_cuda_and_graph_replay_matches(tmp_path, monkeypatch):
    from qflash_gen.gpu import current_gpu

    monkeypatch.setenv(db.ENV_DB_DIR, str(tmp_path))
    kernel.clear_cache()
    shape = (1, 3, 197, 64)
    db.TuningDB.default().write(current_gpu(), [make_entry(workload_key(shape), TUNED.replace(block_n=64))])
    q = torch.randn(shape, device="cuda", dtype=torch.float16)
    # attention() looks up the fp16-in, fp16-out key
    assert api.resolve_config(None, 197, 64, q=q, out_dtype=torch.float16) == TUNED.replace(block_n=64)
    out = api.attention(q, q, q)
    assert torch.equal(out, api.attention(q, q, q, backend="reference"))

    kern = kernel.get_kernel(shape, dtype=torch.int8)
    q8 = torch.randint(-127, 128, shape, dtype=torch.int8, device="cuda")
    static_out = torch.empty(shape, dtype=torch.int8, device="cuda")
    kern(q8, q8, q8, (0.02, 0.02, 0.02), out=static_out)  # warm-up: compile, cache constants
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kern(q8, q8, q8, (0.02, 0.02, 0.02), out=static_out)
    expect = kern(q8, q8, q8, (0.02, 0.02, 0.02)).clone()
    static_out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, expect)


@pytest.mark.cuda_only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_direct_launch_equals_the_normal_launch():
    """Kernel's CUDA hot path (launch.launch_fast: cached CompiledKernel) == launch.launch_module."""
    for shape, out_dtype in [
        ((2, 3, 197, 64), torch.float16),
        ((1, 1, 49, 32), torch.int8),
        ((4, 16, 64, 64), torch.bfloat16),
    ]:
        kern = kernel.get_kernel(shape, dtype=torch.int8, out_dtype=out_dtype)
        for seed in range(3):  # the first call compiles and caches, the next ones take the direct path
            g = torch.Generator(device="cuda").manual_seed(seed)
            q8, k8, v8 = (
                torch.randint(-128, 128, shape, generator=g, device="cuda", dtype=torch.int8) for _ in range(3)
            )
            scales = (0.02 + 0.01 * seed, 0.03, 0.05)
            got = kern(q8, k8, v8, scales, out_dtype=out_dtype)
            params = kern.params_for(scales, None, q8.device)
            want = launch.launch_module(kern.module, kern.config, q8, k8, v8, params, None, None, out_dtype)
            assert torch.equal(got.view(torch.int8), want.view(torch.int8)), (shape, seed)
            ref = reference.reference_int8(q8, k8, v8, params, kern.config, out_dtype=out_dtype)
            assert torch.equal(got.view(torch.int8), ref.view(torch.int8)), (shape, seed)


@pytest.mark.gpu
@requires_launch
def test_bound_launcher_reads_its_buffers_at_each_call_and_equals_the_oracle(device):
    """launch.launcher (the tuner's timed call): bound once, it launches the same kernel on the
    buffers' contents at each call (new data in the same tensors gives the new result); on CUDA
    it also replays inside a CUDA graph captured on a side stream, as do_bench_cudagraph does."""
    shape, out_dtype = (1, 2, 49, 32), torch.float16
    cfg = KernelConfig(block_m=16, block_n=32, num_warps=2, num_stages=1)
    module = codegen.load(cfg)
    q8, k8, v8 = (torch.empty(shape, dtype=torch.int8, device=device) for _ in range(3))
    out = torch.empty(shape, dtype=out_dtype, device=device)
    params = quant.make_params(0.02, 0.03, 0.05, head_dim=shape[3], device=device)
    go = launch.launcher(module, cfg, q8, k8, v8, params, None, out, out_dtype)
    for seed in range(2):
        g = torch.Generator(device=device).manual_seed(seed)
        for t in (q8, k8, v8):
            t.copy_(torch.randint(-128, 128, shape, generator=g, device=device, dtype=torch.int8))
        out.zero_()
        go()
        want = reference.reference_int8(q8, k8, v8, params, cfg, out_dtype=out_dtype)
        assert torch.equal(out.view(torch.int8), want.view(torch.int8)), seed
    if device == "cuda":
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.stream(side):
            with torch.cuda.graph(graph, stream=side):
                go()
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.view(torch.int8), want.view(torch.int8))
