"""tools/bench_models.py end to end on CPU: its smoke settings (ViT-T, batch 1, eager, one forward,
the integer oracle as backend) into a temp folder; the CSV must hold one finite row per impl, the
patched ones close to SDPA's logits.  Mechanics only: CPU times say nothing about the GPU."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_models.py"
SMOKE = "--device cpu --backend reference --models vit_t --batches 1 --modes eager,graph --iters 1 --repeats 1"


@pytest.fixture(scope="module")
def tool():
    pytest.importorskip("timm")
    spec = importlib.util.spec_from_file_location("bench_models", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke(tool, tmp_path, capsys):
    assert tool.main([*SMOKE.split(), "--warmup", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "graph mode needs CUDA" in out  # skipped on CPU, with a note
    with open(tmp_path / "models-cpu.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    for col in ("gpu", "model", "batch", "mode", "impl", "ms", "cosine", "launches", "N", "heads", "error"):
        assert col in reader.fieldnames
    assert [(r["model"], r["batch"], r["mode"], r["impl"]) for r in rows] == [
        ("vit_tiny_patch16_224", "1", "eager", impl) for impl in ("sdpa", "qflash_dynamic", "qflash_static")
    ]
    for r in rows:
        assert r["error"] == "" and r["gpu"] == "cpu" and (r["N"], r["heads"], r["layers"]) == ("197", "3", "12")
        assert math.isfinite(float(r["ms"])) and float(r["ms"]) > 0
        assert float(r["cosine"]) > (0.99999 if r["impl"] == "sdpa" else 0.99)
        assert r["launches"] == ""  # counted on CUDA only
    md = (tmp_path / "models-cpu.md").read_text()
    assert "## eager" in md and "| vit_tiny_patch16_224 | 224 | 197 |" in md


def test_failing_impl_is_an_error_row(tool, tmp_path, monkeypatch):
    real_build = tool.build

    def build(name, impl, *a):
        if impl == "qflash_dynamic":
            raise RuntimeError("boom\nsecond line")
        return real_build(name, impl, *a)

    monkeypatch.setattr(tool, "build", build)
    args = [*SMOKE.split(), "--impls", "sdpa,qflash_dynamic", "--warmup", "0", "--out", str(tmp_path), "--tag", "_x"]
    assert tool.main(args) == 0
    with open(tmp_path / "models-cpu_x.csv", newline="") as fh:
        rows = {r["impl"]: r for r in csv.DictReader(fh)}
    assert rows["sdpa"]["error"] == "" and float(rows["sdpa"]["ms"]) > 0
    assert rows["qflash_dynamic"]["ms"] == "" and rows["qflash_dynamic"]["error"] == "RuntimeError: boom"


@pytest.mark.cuda_only
def test_cuda_graph_and_launches(tool, tmp_path):
    """On a GPU: eager and graph rows, kernel launches counted, graph output equal in cosine."""
    args = "--models vit_t --batches 1 --modes eager,graph --iters 2 --repeats 2 --warmup 1".split()
    assert tool.main([*args, "--out", str(tmp_path)]) == 0
    (csv_path,) = tmp_path.glob("models-*.csv")
    with open(csv_path, newline="") as fh:
        rows = {(r["mode"], r["impl"]): r for r in csv.DictReader(fh)}
    assert len(rows) == 6
    for (mode, impl), r in rows.items():
        assert r["error"] == "", (mode, impl, r["error"])
        assert float(r["ms"]) > 0 and int(r["launches"]) > 0 and int(r["launch_calls"]) > 0
        assert float(r["cosine"]) > (0.999 if impl == "sdpa" else 0.99)


def test_device_time_splits_a_forward_by_kind_of_kernel(tool):
    """The profiled forward's kernels -> ms per kind (first matching pattern), total, top list."""
    got = tool.device_time(
        [
            ("_qflash_fwd", 500.0),
            ("_quantize_tiles", 300.0),
            ("sm90_xmma_gemm_f16f16_f32", 1000.0),
            ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 400.0),
            ("vectorized_layer_norm_kernel", 100.0),
            ("_qflash_fwd", 500.0),
        ],
        top=2,
    )
    assert got["dev_ms"] == 2.8 and got["dev_qflash_ms"] == 1.0 and got["dev_quant_ms"] == 0.3
    assert got["dev_gemm_ms"] == 1.0 and got["dev_sdpa_ms"] == 0.4 and got["dev_other_ms"] == 0.1
    assert got["top_kernels"] == "_qflash_fwd 1000; sm90_xmma_gemm_f16f16_f32 1000"
