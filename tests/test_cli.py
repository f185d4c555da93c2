"""`qflash-show` and `qflash-db` on CPU: what a kernel engineer reads must be right and readable.

Each command is called through its entry function (``show_main(argv)`` / ``db_main(argv)``), as
the console scripts do, with pytest capturing stdout: a captured stream is not a terminal, which
is exactly the piped case the tools must keep plain.
"""

from __future__ import annotations

import ast
import dataclasses
import re

import pytest

from qflash_gen import codegen
from qflash_gen.cli import parse_arch, parse_config, show_main
from qflash_gen.config import DEFAULT_CONFIG, KernelConfig

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_show(capsys, *argv: str) -> tuple[int, str, str]:
    code = show_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- --config rendering ----------------------------------------------------------------------
def test_config_renders_parseable_source_with_header(capsys):
    code, out, err = run_show(capsys, "--config", "block_m=64,block_n=256,exp_variant=poly2")
    assert code == 0, err
    want = DEFAULT_CONFIG.replace(block_m=64, block_n=256, exp_variant="poly2")
    # stdout is the rendered file byte for byte: the cache names it by this sha256.
    assert out == codegen.render(want)
    tree = ast.parse(out)
    doc = ast.get_docstring(tree)
    assert doc is not None and f"config sha256: {want.hash}" in doc
    assert "template: qflash_fwd.py.jinja" in doc and "block_n: 256" in doc
    assert any(isinstance(n, ast.FunctionDef) and n.name == codegen.KERNEL_NAME for n in tree.body)
    assert "lookup explicit" in err  # the story goes to stderr, not into the file


def test_piped_output_is_plain_and_color_always_is_not(capsys):
    code, plain, _ = run_show(capsys, "--config", "block_n=128")
    assert code == 0 and not ANSI.search(plain)
    code, colored, _ = run_show(capsys, "--config", "block_n=128", "--color", "always")
    assert code == 0 and ANSI.search(colored)
    # Highlighting changes only the presentation: stripping the escapes gives the source back.
    assert [ln.rstrip() for ln in ANSI.sub("", colored).splitlines()] == [ln.rstrip() for ln in plain.splitlines()]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("block_m=63", "KernelConfig.block_m=63 is not supported"),
        ("block_n=abc", "KernelConfig.block_n='abc' is not supported: expected an int"),
        ("exp_variant=cubic", "KernelConfig.exp_variant='cubic' is not supported"),
        ("rescale=idiv,rescale_bits=8", "KernelConfig.rescale_bits=8 is not supported"),
        ("bogus=1", "unknown KernelConfig field 'bogus'"),
        ("block_m", "is not NAME=VALUE"),
    ],
)
def test_invalid_config_is_a_clean_usage_error(capsys, text, message):
    code, out, err = run_show(capsys, "--config", text)
    assert code == 2
    assert out == ""
    assert message in err and "Traceback" not in err


def test_parse_config_types_and_dependent_fields():
    cfg = parse_config("block_m=32, num_warps=8, exp_variant=lut")
    assert cfg == DEFAULT_CONFIG.replace(block_m=32, num_warps=8, exp_variant="lut", lut_bits=5)
    # Switching rescale to idiv keeps rescale_bits at 0; to shift, it starts at 8 unless given.
    assert parse_config("rescale=idiv") == DEFAULT_CONFIG.replace(rescale="idiv", rescale_bits=0)
    assert parse_config("rescale=shift") == DEFAULT_CONFIG.replace(rescale="shift", rescale_bits=8)
    assert parse_config("rescale=shift,rescale_bits=6").rescale_bits == 6
    assert parse_config("") == DEFAULT_CONFIG


def test_usage_errors_exit_2(capsys):
    assert run_show(capsys)[0] == 2  # nothing to show
    assert run_show(capsys, "--config", "block_n=64", "--arch", "sm90")[0] == 2  # --arch without --asm
    code, _, err = run_show(capsys, "--config", "block_n=64", "--asm", "ptx", "--arch", "sm90")
    assert code == 2 and "--asm compiles for a shape" in err
    assert run_show(capsys, "--bogus-flag")[0] == 2  # argparse's own usage error, as a return value


# -- --diff ---------------------------------------------------------------------------------
def _changed(diff: str) -> tuple[list[str], list[str], list[str]]:
    minus, plus, other = [], [], []
    for line in diff.splitlines():
        if line.startswith(("---", "+++", "@@")):
            continue
        (minus if line.startswith("-") else plus if line.startswith("+") else other).append(line[1:])
    return minus, plus, other


def test_diff_of_two_configs_shows_the_changed_lines_and_nothing_else(capsys):
    a = DEFAULT_CONFIG.replace(block_n=128)
    b = DEFAULT_CONFIG.replace(block_n=256, exp_variant="poly2")
    code, out, err = run_show(capsys, "--diff", "config:block_n=128", "config:block_n=256,exp_variant=poly2")
    assert code == 0, err
    assert not ANSI.search(out)
    minus, plus, other = _changed(out)
    assert other == []  # no context lines at all
    # Exactly the lines that differ, in the config YAML and in the rendered source.
    for old, new in (
        (codegen.render(a), codegen.render(b)),
        (parse_yaml_lines(a), parse_yaml_lines(b)),
    ):
        gone = [ln for ln in old.splitlines() if ln not in new.splitlines()]
        came = [ln for ln in new.splitlines() if ln not in old.splitlines()]
        assert set(gone) <= set(minus) and set(came) <= set(plus)
    assert sorted(minus) == sorted(_all_removed(a, b)) and sorted(plus) == sorted(_all_removed(b, a))
    assert "-block_n: 128" in out and "+block_n: 256" in out
    assert "-exp_variant: shift" in out and "+exp_variant: poly2" in out
    assert out.count("\n--- ") + out.startswith("--- ") == 2  # one diff for the config, one for the source


def parse_yaml_lines(cfg: KernelConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=True)


def _all_removed(a: KernelConfig, b: KernelConfig) -> list[str]:
    """Lines of A's config YAML and source that B lacks (what a minimal diff must remove)."""
    import difflib

    out = []
    for old, new in ((parse_yaml_lines(a), parse_yaml_lines(b)), (codegen.render(a), codegen.render(b))):
        for line in difflib.unified_diff(old.splitlines(), new.splitlines(), n=0, lineterm=""):
            if line.startswith("-") and not line.startswith("---"):
                out.append(line[1:])
    return out


def test_diff_of_identical_configs_is_empty(capsys):
    code, out, err = run_show(capsys, "--diff", "config:block_n=64", "config:")
    assert code == 0 and out == "" and "identical" in err


def test_diff_context_option_adds_context(capsys):
    code, out, _ = run_show(capsys, "--diff", "config:block_n=128", "config:block_n=256", "-U", "2")
    assert code == 0
    assert _changed(out)[2]  # now there are context lines


# -- --asm (Triton cross-compiles with its bundled ptxas; no GPU needed) -----------------------
def test_parse_arch():
    assert parse_arch("sm90") == parse_arch("sm_90a") == parse_arch("90") == parse_arch("9.0") == 90
    assert parse_arch("sm_100") == 100
    with pytest.raises(Exception, match="sm70 or newer"):
        parse_arch("sm60")


@pytest.fixture
def triton_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))


def test_asm_ptx_for_sm90_on_cpu(capsys, triton_cache):
    code, out, err = run_show(
        capsys, "--config", "block_m=64,block_n=256", "--shape", "1,12,197,64", "--asm", "ptx", "--arch", "sm90"
    )
    assert code == 0, err
    assert ".visible .entry _qflash_fwd(" in out and ".target sm_90a" in out
    m = re.search(
        r"// sm_90a: registers (\d+)/thread, spills (\d+) B stores / (\d+) B loads, stack \d+ B, shared (\d+) B", out
    )
    assert m, out[:400]
    regs, stores, loads, shared = map(int, m.groups())
    assert 16 <= regs <= 255 and stores >= 0 and loads >= 0 and shared > 0
    # int8 x int8 -> int32 tensor-core dots are in the PTX (mma or Hopper's wgmma).
    assert re.search(r"(w?gmma|mma)\.\S*s8", out)


@pytest.mark.parametrize("masked", [False, True])
def test_asm_compiles_the_arguments_the_runtime_launches(masked):
    """--asm and launch.launch_module build their arguments alike (codegen.signature); this pins it."""
    import types

    import torch

    from qflash_gen import launch, quant
    from qflash_gen.codegen.asm import kernel_arguments

    class Recorder:
        def __getitem__(self, grid):
            return self

        def __call__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    rec = Recorder()
    cfg = KernelConfig(block_m=32, block_n=128, num_warps=8, num_stages=3)
    shape = (2, 12, 197, 64)
    q8 = torch.zeros(shape, dtype=torch.int8)
    params = quant.make_params(0.05, 0.05, 0.05, head_dim=64)
    bias = torch.zeros((1, 12, 197, 197), dtype=torch.float32) if masked else None  # the float additive bias
    module = types.SimpleNamespace(_qflash_fwd=rec)
    launch.launch_module(module, cfg, q8, q8, q8, params, bias, None, torch.float16)
    args, kwargs = kernel_arguments(cfg, shape, masked=masked, out_dtype="fp16")
    assert kwargs == rec.kwargs
    assert len(args) == len(rec.args)
    for i, (mine, real) in enumerate(zip(args, rec.args, strict=True)):
        if isinstance(real, torch.Tensor):
            assert mine.dtype == real.dtype, i
        else:
            assert mine == real, (i, mine, real)


def test_asm_under_the_interpreter_env_compiles_in_a_child(capsys, triton_cache, monkeypatch):
    # The CPU test setup sets TRITON_INTERPRET=1, which makes Triton's own helpers uncompilable
    # in this process; --asm must still work (it compiles in a child without the variable).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    code, out, err = run_show(capsys, "--shape", "1,3,49,32", "--masked", "--asm", "ttgir", "--arch", "sm80")
    assert code == 0, err
    assert "tt.func public @_qflash_fwd" in out and "sm_80" in out.splitlines()[1]


def test_asm_without_gpu_or_arch_names_what_is_needed(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_show(capsys, "--config", "block_n=64", "--shape", "1,12,197,64", "--asm", "sass")
    assert code == 2 and out == ""
    assert "none is present" in err and "--arch" in err and "--gpu" in err


# -- lookup: workload + GPU -> the config the runtime picks ------------------------------------
PROTOCOL = {"method": "do_bench", "reps": 100, "warmup": 25, "l2_flush": True, "spread": "iqr"}


def _entry(shape, config, latency=11.8, *, masked=False, sqnr=33.6, baselines=None, **kw):
    from qflash_gen import db
    from qflash_gen.keys import workload_key

    return db.Entry(
        key=workload_key(shape, masked=masked),
        config=config,
        latency_us=latency,
        latency_spread_us=0.2,
        sqnr_db=sqnr,
        trials=40,
        protocol=PROTOCOL,
        baselines=baselines or {},
        **kw,
    )


VIT_B_CFG = KernelConfig(block_m=64, block_n=256)
SWIN_CFG = KernelConfig(block_m=32, block_n=64, exp_variant="poly2")


@pytest.fixture
def db_dir(tmp_path):
    """A DB folder with an h100 file (ViT-B b1 and Swin-T stage 1 b1) and an h200 file (ViT-B b1)."""
    from qflash_gen import db

    d = tmp_path / "tuning_db"
    db.write_entries(
        d / "h100.yaml",
        [
            _entry((1, 12, 197, 64), VIT_B_CFG, baselines={"sdpa_flash": 16.2, "sdpa_cudnn": 15.9}),
            _entry((64, 3, 49, 32), SWIN_CFG, 20.0, masked=True, baselines={"sdpa_efficient": 31.1}),
        ],
        gpu="h100",
    )
    db.write_entries(d / "h200.yaml", [_entry((1, 12, 197, 64), KernelConfig(block_n=128), 10.5)], gpu="h200")
    return d


def test_show_workload_prints_the_source_of_the_db_pick(capsys, db_dir):
    code, out, err = run_show(capsys, "vit_b", "--gpu", "h100", "--db", str(db_dir))
    assert code == 0, err
    assert out == codegen.render(VIT_B_CFG)
    ast.parse(out)
    assert "lookup exact for key n197_d64_nomask_bh16_fp16-fp16" in err and "h100.yaml" in err
    # batch 64 has no entry of its own: the nearest bucket answers, and says so.
    code, out, err = run_show(capsys, "vit_b", "--gpu", "h100", "--batch", "64", "--db", str(db_dir))
    assert code == 0 and out == codegen.render(VIT_B_CFG)
    assert "lookup nearest:n197_d64_nomask_bh16_fp16-fp16 for key n197_d64_nomask_bh1024_fp16-fp16" in err
    # no entry for this N/D: the safe default
    code, out, err = run_show(capsys, "vit_b_384", "--gpu", "h100", "--db", str(db_dir))
    assert code == 0 and "lookup default" in err and ast.parse(out)


def test_show_group_prints_one_source_per_launch(capsys, db_dir):
    code, out, err = run_show(capsys, "swin_t", "--gpu", "h100", "--db", str(db_dir))
    assert code == 0, err
    assert out.count("# ==== qflash-show: swin_t_s") == 4
    ast.parse(out)  # still one valid Python stream
    assert "swin_t_s1 | B=64 H=3 N=49 D=32 masked" in err and "lookup exact" in err


def test_show_unknown_names_are_usage_errors(capsys, db_dir):
    code, _, err = run_show(capsys, "vit_q", "--gpu", "h100", "--db", str(db_dir))
    assert code == 2 and "unknown workload 'vit_q'" in err and "vit_b" in err
    code, _, err = run_show(capsys, "vit_b", "--gpu", "h1000", "--db", str(db_dir))
    assert code == 2 and "is not a known GPU" in err and "h100" in err


def test_diff_one_workload_on_two_gpus(capsys, db_dir):
    code, out, err = run_show(capsys, "--diff", "vit_b@h100", "vit_b@h200", "--db", str(db_dir))
    assert code == 0, err
    assert "--- vit_b@h100 (config; exact)" in out and "+++ vit_b@h200 (config; exact)" in out
    minus, plus, other = _changed(out)
    assert other == [] and "block_n: 256" in minus and "block_n: 128" in plus


# -- qflash-db ----------------------------------------------------------------------------------
def run_db(capsys, *argv: str) -> tuple[int, str, str]:
    from qflash_gen.cli import db_main

    code = db_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_db_ls_lists_gpus_and_entries(capsys, db_dir):
    code, out, err = run_db(capsys, "ls", "--db", str(db_dir))
    assert code == 0, err
    assert not ANSI.search(out)
    assert re.search(r"\| h100 .*\| 2 +\| 0 +\| 0 +\| 0 +\|", out) and re.search(r"\| h200 .*\| 1 +\| 0 +\|", out)
    row = next(line for line in out.splitlines() if "n197_d64_nomask_bh16_fp16-fp16" in line and "A3 b1" in line)
    assert "m64n256w4s2" in row and "15.90 (sdpa_cudnn)" in row and "1.35x" in row


def test_db_show_key_and_workload(capsys, db_dir):
    import yaml

    code, out, err = run_db(capsys, "show", "n197_d64_nomask_bh16_fp16-fp16", "--db", str(db_dir))
    assert code == 0, err
    docs = list(yaml.safe_load_all(out))
    assert {d["gpu"] for d in docs} == {"h100", "h200"}
    h100 = next(d for d in docs if d["gpu"] == "h100")
    assert h100["status"] == "in use" and KernelConfig.from_dict(h100["config"]) == VIT_B_CFG
    assert h100["speedup_vs_best_baseline"] == pytest.approx(15.9 / 11.8, abs=1e-3)
    code, out, _ = run_db(capsys, "show", "swin_t_s1", "--gpu", "h100", "--db", str(db_dir))
    assert code == 0 and KernelConfig.from_dict(yaml.safe_load(out)["config"]) == SWIN_CFG
    code, _, err = run_db(capsys, "show", "n197_d64_nomask_bh16", "--db", str(db_dir))
    assert code == 2 and "malformed" in err
    code, _, err = run_db(capsys, "show", "vit_b", "--gpu", "nosuch", "--db", str(db_dir))
    assert code == 2 and "'nosuch' is not a known GPU" in err  # a typo, not "no entry"


def test_db_check_flags_stale_entry_and_corrupt_file(capsys, db_dir):
    import yaml

    code, out, err = run_db(capsys, "check", "--db", str(db_dir))
    assert code == 0 and out.count("OK ") == 2, out + err
    # Plant two entries measured under another template: one whose config maps onto this
    # KernelConfig (usable after the fresh ones), one with a field it does not know (stale).
    path = db_dir / "h100.yaml"
    doc = yaml.safe_load(path.read_text())
    old = dict(doc["entries"][0], key="n197_d64_nomask_bh64_fp16-fp16", software={"template_hash": "0" * 64})
    unknown = dict(old, key="n197_d64_nomask_bh128_fp16-fp16", config={**old["config"], "pack_heads": 2})
    doc["entries"] += [old, unknown]
    doc["header"]["entry_count"] = len(doc["entries"])
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, out, err = run_db(capsys, "check", "-v", "--db", str(db_dir))
    assert code == 0, out + err  # stale is not an error ...
    assert "h100.yaml: 2 usable, 0 usable (other Triton), 1 usable (other template), 1 stale" in out
    other = [line for line in out.splitlines() if line.strip().startswith("other-template")]
    assert len(other) == 1 and "n197_d64_nomask_bh64_fp16-fp16: template-00000000" in other[0]
    stale = [line for line in out.splitlines() if line.strip().startswith("stale")]
    assert len(stale) == 1 and "n197_d64_nomask_bh128_fp16-fp16" in stale[0] and "template 000000000000" in stale[0]
    assert "pack_heads" in stale[0] and re.search(r"h100\.yaml:\d+:", stale[0])
    assert run_db(capsys, "check", "--strict", "--db", str(db_dir))[0] == 1  # ... unless asked
    code, out, _ = run_db(capsys, "ls", "--db", str(db_dir))
    row = next(line for line in out.splitlines() if "n197_d64_nomask_bh64_fp16-fp16" in line)
    assert "usable (other template): template-00000000" in row
    assert re.search(r"\| h100 .*\| 2 +\| 0 +\| 1 +\| 1 +\|", out)
    # A corrupt file: an indentation error on a known line.
    bad = db_dir / "h200.yaml"
    lines = bad.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("  latency_us:"))
    lines[i] = "    latency_us: [11.8"
    bad.write_text("\n".join(lines) + "\n")
    code, out, err = run_db(capsys, "check", "--db", str(db_dir))
    assert code == 1
    corrupt = [line for line in out.splitlines() if line.startswith("CORRUPT")]
    assert len(corrupt) == 1 and re.search(r"h200\.yaml:\d+: YAML syntax error", corrupt[0])
    assert "1 corrupt" in err and "Traceback" not in err
    # ls keeps listing the readable file and exits 1 for the broken one.
    code, out, _ = run_db(capsys, "ls", "--db", str(db_dir))
    assert code == 1 and "CORRUPT" in out and "n49_d32_mask_bh256_fp16-fp16" in out


def test_db_check_reports_a_foreign_file_name(capsys, db_dir):
    (db_dir / "My GPU.yaml").write_text("schema_version: 1\n")
    code, out, _ = run_db(capsys, "check", "--db", str(db_dir))
    assert code == 1 and "is not <gpu>.yaml" in out


def _study_journal(path) -> str:
    """A small Optuna study shaped like qflash-tune's (constraint attr: <= 0 is feasible)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(path)))
    name = "qflash/h100/A3/b1/fp16/space-test"
    study = optuna.create_study(study_name=name, storage=storage)
    for i, (lat, sqnr) in enumerate([(15.0, 33.0), (13.0, 29.0), (12.5, 34.0), (14.0, 35.0), (11.9, 33.5)]):
        t = study.ask()
        t.suggest_categorical("block_n", [64, 128, 256])
        t.set_user_attr("constraint", 30.0 - sqnr)
        t.set_user_attr("config_short", f"cfg{i}")
        study.tell(t, lat)
    return name


def test_db_report_png_and_markdown(capsys, db_dir, tmp_path):
    from PIL import Image

    png = tmp_path / "out" / "report.png"
    code, out, err = run_db(capsys, "report", "--gpu", "h100", "--out", str(png), "--db", str(db_dir))
    assert code == 0, err
    with Image.open(png) as im:
        im.verify()  # a complete, valid PNG
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 400

    journal = tmp_path / "studies.journal"
    name = _study_journal(journal)
    md = tmp_path / "out" / "report.md"
    code, out, err = run_db(
        capsys, "report", "--gpu", "h100", "--out", str(md), "--db", str(db_dir),
        "--storage", str(journal), "--study", "qflash/h100/*",
    )  # fmt: skip
    assert code == 0, err
    text = md.read_text()
    assert "| A3 b1 | `n197_d64_nomask_bh16_fp16-fp16` |" in text and "1.35x" in text and "33.6" in text
    # Best feasible trial: 11.9 µs (trial 4); trial 1 (13.0 µs, 29 dB) is below the floor.
    assert f"| `{name}` | 5 | 0 | 4 | 11.90 (trial 4) | `cfg4` |" in text
    assert "![latency, SQNR and tuning history](report.png)" in text
    for p in (md.with_suffix(".png"), md.with_name("report.study1.png")):
        with Image.open(p) as im:
            im.verify()
    code, _, err = run_db(
        capsys, "report", "--gpu", "h100", "--out", str(md), "--db", str(db_dir),
        "--storage", str(journal), "--study", "nope",
    )  # fmt: skip
    assert code == 2 and name in err


def test_db_report_usage_errors(capsys, db_dir, tmp_path):
    assert run_db(capsys, "report", "--gpu", "h100", "--out", str(tmp_path / "r.pdf"), "--db", str(db_dir))[0] == 2
    code, _, err = run_db(capsys, "report", "--gpu", "h9", "--out", str(tmp_path / "r.png"), "--db", str(db_dir))
    assert code == 2 and "not a known GPU" in err
    assert run_db(capsys, "report", "--gpu", "h100", "--out", "r.png", "--study", "x", "--db", str(db_dir))[0] == 2
    assert run_db(capsys, "ls", "--db", str(tmp_path / "missing"))[0] == 2


def test_db_report_takes_sdpa_baselines_from_a_bench_csv(capsys, tmp_path):
    """--bench: SDPA times of a tools/bench.py CSV become the baselines of the matching entries."""
    from qflash_gen import db

    d = tmp_path / "tuning_db"
    db.write_entries(d / "h100.yaml", [_entry((8, 12, 197, 64), VIT_B_CFG, 20.0)], gpu="h100")
    csv_path = tmp_path / "h100.csv"
    csv_path.write_text(
        "gpu,workload,batch,B,H,N,D,mode,impl,us,sqnr_db\n"
        "h100,A3,8,8,12,197,64,fp16,sdpa_cudnn,15.0,60\n"
        "h100,A3,8,8,12,197,64,fp16,sdpa_flash,17.5,60\n"
        "h100,A3,8,8,12,197,64,graph,sdpa_cudnn,11.0,60\n"  # graph rows are another protocol: ignored
        "h100,A3,8,8,12,197,64,fp16,qflash_gen,30.0,33\n"
    )
    md = tmp_path / "r.md"
    code, _, err = run_db(capsys, "report", "--gpu", "h100", "--out", str(md), "--db", str(d), "--bench", str(csv_path))
    assert code == 0, err
    text = md.read_text()
    assert "| 15.00 (sdpa_cudnn) | 0.75x |" in text, text
    # A CUDA-graph latency is compared with graph-replayed SDPA, not with do_bench (issue 20)
    graph = _entry((8, 12, 197, 64), VIT_B_CFG, 5.5)
    graph = dataclasses.replace(graph, protocol={**PROTOCOL, "timing": "cudagraph"})
    db.write_entries(d / "h100.yaml", [graph], gpu="h100", force=True)
    code, _, err = run_db(capsys, "report", "--gpu", "h100", "--out", str(md), "--db", str(d), "--bench", str(csv_path))
    assert code == 0, err
    assert "| cudagraph | 5.50 | 0.20 | 11.00 (sdpa_cudnn) | 2.00x |" in md.read_text(), md.read_text()
    bad = tmp_path / "bad.csv"
    bad.write_text("gpu,mode,impl,us\nh100,fp16,sdpa_flash,abc\n")
    code, _, err = run_db(capsys, "report", "--gpu", "h100", "--out", str(md), "--db", str(d), "--bench", str(bad))
    assert code == 2 and "bad.csv:2" in err
