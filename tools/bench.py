"""Benchmark qflash-gen against torch SDPA fp16 (flash, cuDNN, efficient, math) on one GPU.

    python tools/bench.py --workloads A1,A2,A3,A4,A5,A6,A7 --batches 1,8,64 --out docs/benchmarks

Per workload x batch it records (one CSV row per measurement):
  mode=kernel  qflash-gen int8-in kernel (pre-quantized inputs, V key-major as quant_kernels writes
               it; the launch alone, through launch.launch_fast as get_kernel's call does),
               do_bench median
  mode=graph   the same launch and each SDPA backend under CUDA-graph replay
  mode=kernel_int8out  the same kernel with int8 out, do_bench median
  mode=fp16, graph_fp16
               fp16 in -> fp16 out: qflash_gen.attention (one dynamic scale per (batch, head),
               computed on the device: the quantizer launch + the kernel) and SDPA (mode=fp16)
  mode=fp16_static, graph_fp16_static
               fp16 in -> fp16 out at static per-tensor scales (calibrated once on the input, as
               get_kernel(shape)(q, k, v, (sq, sk, sv)) with float scales): launch.launch_static
               (quantized in the kernel's loads where one query block covers N, else by the
               quantizer first); do_bench and graph replay
  mode=ivit, graph_ivit
               the paper's baseline, unfused integer attention in the style of I-ViT
               (tools/ivit_baseline.py: three launches, N x N intermediates in HBM), same int8
               inputs and integer math
Workloads: the paper's A1..A7 or any name of qflash_gen.workloads (vit_b_384, dinov2_b, ...).
Each qflash row is checked against the integer oracle on the GPU first (oracle_equal) and carries
its SQNR vs fp64.  do_bench flushes L2 between repeats.  The kernel row also carries the fraction
of each limit it reaches (qflash_gen/roofline.py): hbm_frac, mma_frac, alu_frac (from the SASS of
the measured config and shape; single-pass configs only) and int_instr_per_score.
Writes <out>/<gpu>.csv, <gpu>.md and <gpu>.png (tools/plot_bench.py, with matplotlib).

With --energy (needs nvidia-ml-py and a GPU with NVML's energy counter) it also records
  mode=energy  µJ per call of the qflash int8-in kernel and of each SDPA fp16 backend, all under
               CUDA-graph replay, interleaved in each round on the same card (qflash_gen/energy.py):
               energy_uj (total), above_idle_uj, idle_w, their min/max over --energy-repeats
               rounds; `us` is the GPU time per call in the energy loop
and a markdown section comparing them (goal: >= 18.8 % less energy than the best SDPA backend).
    python tools/bench.py --workloads A1,A2,A3,A4,A5,A6,A7 --batches 64 --energy --tag -energy
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qflash_gen import (  # noqa: E402
    api,
    codegen,
    launch,
    quant,
    reference,
    roofline,
    workloads,  # noqa: E402
)
from qflash_gen.codegen import asm  # noqa: E402
from qflash_gen.config import KernelConfig, parse_config  # noqa: E402
from qflash_gen.kernel import get_kernel  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
import ivit_baseline  # noqa: E402

# The paper's kernel workloads (per image): (heads, N, D, windows per image).
PAPER_WORKLOADS = {
    "A1": (3, 197, 64, 1),  # ViT-T
    "A2": (6, 197, 64, 1),  # ViT-S
    "A3": (12, 197, 64, 1),  # ViT-B
    "A4": (3, 49, 32, 64),  # Swin-T stage 1
    "A5": (6, 49, 32, 16),  # Swin-T stage 2
    "A6": (12, 49, 32, 4),  # Swin-T stage 3
    "A7": (24, 49, 32, 1),  # Swin-T stage 4
}
SDPA_BACKENDS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_math": "MATH",
}


def gpu_label() -> str:
    try:
        from qflash_gen.gpu import current_gpu

        return current_gpu()
    except Exception:  # gpu.py may not exist yet in older checkouts
        return torch.cuda.get_device_name().replace(" ", "_").lower()


def shape_of(name: str, batch: int) -> tuple[int, int, int, int]:
    """(B, H, N, D) of a paper workload (A1..A7) or any named one (vit_b_384, dinov2_b, ...)."""
    if name in PAPER_WORKLOADS:
        heads, n, d, windows = PAPER_WORKLOADS[name]
        return (batch * windows, heads, n, d)
    try:
        return workloads.get(name).shape(batch)
    except ValueError as exc:
        raise SystemExit(f"unknown workload {name!r}: {exc}") from None


def _median_us(fn, graph: bool) -> float:
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def _sdpa(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = getattr(SDPBackend, SDPA_BACKENDS[backend])

    def run(q, k, v):
        with sdpa_kernel([b]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return run


def _problem(name: str, batch: int, config: KernelConfig | None):
    """The inputs every measurement of (workload, batch) shares: fp16 uniform [-4, 4) q, k, v (same
    seed in every mode), the fp64 reference, the config (the DB's pick unless given), and the int8
    tensors with their kernel constants (v8 key-major, as quant_kernels writes it for the kernel:
    quant.key_major)."""
    shape = shape_of(name, batch)
    g = torch.Generator(device="cuda").manual_seed(1234 + batch)
    q, k, v = ((torch.rand(shape, device="cuda", generator=g) * 8 - 4).half() for _ in range(3))
    ref = reference.float_attention(q, k, v)
    if config is None:
        kern = get_kernel(shape, dtype=torch.float16)  # the DB's pick for this fp16 workload
        picked = (kern.config, kern.why)
    else:
        picked = (config, "explicit")
    sq, sk, sv = (quant.dynamic_scale(t) for t in (q, k, v))
    q8s = (quant.quantize(q, sq), quant.quantize(k, sk), quant.key_major(quant.quantize(v, sv)))
    params = quant.make_params(sq, sk, sv, head_dim=shape[3])
    return shape, shape, (q, k, v), ref, picked, q8s, params


_SASS: dict[tuple, str | None] = {}


def _sass(cfg: KernelConfig, h: int, n: int, d: int) -> str | None:
    """SASS of the int8-in, fp16-out kernel for this config and (H, N, D), compiled once for this
    GPU's arch (B is only the grid: the compiled kernel does not depend on it); None if it fails."""
    key = (cfg, h, n, d)
    if key not in _SASS:
        major, minor = torch.cuda.get_device_capability()
        try:
            res = asm.compile_asm(cfg, (1, h, n, d), masked=False, out_dtype="fp16", arch=major * 10 + minor)
            _SASS[key] = res.stages["sass"]
        except asm.CompileError as exc:
            print(f"  ALU fraction n/a for {cfg.short()} H={h} N={n} D={d}: {exc}", file=sys.stderr)
            _SASS[key] = None
    return _SASS[key]


def _limits(shape, cfg: KernelConfig, us: float, gpu: str, clock_mhz: float) -> dict:
    f = roofline.fractions(shape, cfg, us, gpu, clock_mhz=clock_mhz, sass=_sass(cfg, *shape[1:]))
    return {
        "hbm_frac": f.hbm,
        "mma_frac": f.mma,
        "alu_frac": f.alu,
        "int_instr_per_score": f.int_instr_per_score,
    }


def bench_one(
    name: str,
    batch: int,
    config: KernelConfig | None,
    rows: list[dict],
    gpu: str,
    clock_mhz: float = roofline.DEFAULT_CLOCK_MHZ,
) -> None:
    shape, (b, h, n, d), (q, k, v), ref, (cfg, why), (q8, k8, v8), params = _problem(name, batch, config)
    out8 = torch.empty(shape, dtype=torch.int8, device="cuda")
    out16 = torch.empty(shape, dtype=torch.float16, device="cuda")

    module = codegen.load(cfg)

    # The call path of get_kernel(shape)(q8, k8, v8, scales): the cached compiled kernel launched
    # directly (runtime.launch_fast), not Triton's per-call binding, which on this kind of host
    # takes longer than the small kernels themselves.
    def kern():
        launch.launch_fast(module, cfg, q8, k8, v8, params, None, out8, torch.int8)

    def kern16():
        launch.launch_fast(module, cfg, q8, k8, v8, params, None, out16, torch.float16)

    kern16()
    want = reference.reference_int8(q8, k8, v8, params, cfg, out_dtype=torch.float16)
    equal = bool(torch.equal(out16.view(torch.int16), want.view(torch.int16)))
    sq_db = reference.sqnr_db(out16, ref)
    base = dict(gpu=gpu, workload=name, batch=batch, B=b, H=h, N=n, D=d, config=cfg.short(), lookup=why)
    for mode, fn, graph in (("kernel", kern16, False), ("graph", kern16, True)):
        us = _median_us(fn, graph)
        rows.append(
            {
                **base,
                "mode": mode,
                "impl": "qflash_gen",
                "us": us,
                "sqnr_db": sq_db,
                "oracle_equal": equal,
                **(_limits(shape, cfg, us, gpu, clock_mhz) if mode == "kernel" else {}),
            }
        )
    rows.append(
        {
            **base,
            "mode": "kernel_int8out",
            "impl": "qflash_gen",
            "us": _median_us(kern, False),
            "sqnr_db": math.nan,
            "oracle_equal": equal,
        }
    )

    # fp16 in -> fp16 out, dynamic per-(batch, head) scales: the quantizer launch and the kernel
    # launch (qflash_gen.attention; what a patched model runs by default).
    def full():
        return api.attention(q, k, v, config=cfg)

    out_full = full()
    equal_full = bool(
        torch.equal(
            out_full.view(torch.int16), api.attention(q, k, v, config=cfg, backend="reference").view(torch.int16)
        )
    )
    for mode, graph in (("fp16", False), ("graph_fp16", True)):
        rows.append(
            {
                **base,
                "mode": mode,
                "impl": "qflash_gen",
                "us": _median_us(full, graph),
                "sqnr_db": reference.sqnr_db(out_full, ref),
                "oracle_equal": equal_full,
            }
        )
    # The paper's baseline: unfused integer attention (I-ViT style: int8 QK^T GEMM, integer softmax
    # over whole rows, int8 P.V GEMM; 3 launches, N x N intermediates in HBM), same bits as the
    # single-pass oracle where one exists (N <= 256).
    if d in (32, 64, 128):
        v8n = v8.contiguous()
        try:
            o_iv = ivit_baseline.ivit_attention(q8, k8, v8n, params, out_dtype=torch.float16)
            iv_equal = ""
            if n <= 256:
                want_iv = reference.reference_int8(
                    q8, k8, v8n, params, ivit_baseline.config_for(n), out_dtype=torch.float16
                )
                iv_equal = bool(torch.equal(o_iv.view(torch.int16), want_iv.view(torch.int16)))
            for mode, graph in (("ivit", False), ("graph_ivit", True)):
                rows.append(
                    {
                        **base,
                        "mode": mode,
                        "impl": "ivit_unfused",
                        "us": _median_us(
                            lambda: ivit_baseline.ivit_attention(q8, k8, v8n, params, out_dtype=torch.float16), graph
                        ),
                        "sqnr_db": reference.sqnr_db(o_iv, ref),
                        "oracle_equal": iv_equal,
                    }
                )
        except (RuntimeError, ValueError) as exc:  # e.g. out of memory for the N x N planes
            print(f"  ivit baseline unavailable: {str(exc).splitlines()[0][:100]}", file=sys.stderr)

    # Static scales: calibrated once (Python floats), then fp16 in -> fp16 out in one or two launches.
    ssq, ssk, ssv = (float(quant.dynamic_scale(t)) for t in (q, k, v))
    sparams = quant.make_params(ssq, ssk, ssv, head_dim=d, device="cuda")
    module = codegen.load(cfg)
    out16s = torch.empty(shape, dtype=torch.float16, device="cuda")

    def static16():
        launch.launch_static(module, cfg, q, k, v, sparams, None, out16s, torch.float16, fast=True)

    static16()
    q8s = tuple(quant.quantize(t, s) for t, s in ((q, ssq), (k, ssk), (v, ssv)))
    want_s = reference.reference_int8(*q8s, sparams, cfg, out_dtype=torch.float16)
    equal_s = bool(torch.equal(out16s.view(torch.int16), want_s.view(torch.int16)))
    sq_db_s = reference.sqnr_db(out16s, ref)
    for mode, graph in (("fp16_static", False), ("graph_fp16_static", True)):
        rows.append(
            {
                **base,
                "mode": mode,
                "impl": "qflash_gen",
                "us": _median_us(static16, graph),
                "sqnr_db": sq_db_s,
                "oracle_equal": equal_s,
            }
        )

    for impl in SDPA_BACKENDS:
        fn = _sdpa(impl)
        try:
            o = fn(q, k, v)
            s_db = reference.sqnr_db(o, ref)
            t = _median_us(lambda fn=fn: fn(q, k, v), False)
            tg = _median_us(lambda fn=fn: fn(q, k, v), True)
        except RuntimeError as e:  # backend unavailable for this shape/dtype
            print(f"  {impl}: unavailable ({str(e).splitlines()[0][:80]})", file=sys.stderr)
            continue
        rows.append({**base, "mode": "fp16", "impl": impl, "us": t, "sqnr_db": s_db, "oracle_equal": ""})
        rows.append({**base, "mode": "graph", "impl": impl, "us": tg, "sqnr_db": s_db, "oracle_equal": ""})


def bench_energy(
    name: str,
    batch: int,
    config: KernelConfig | None,
    rows: list[dict],
    gpu: str,
    *,
    counter,
    min_seconds: float = 1.0,
    repeats: int = 3,
) -> None:
    """µJ per call of qflash-gen (int8 in, fp16 out) and each SDPA fp16 backend, CUDA-graph replay,
    interleaved in each round with one shared idle span (see qflash_gen/energy.py for the method)."""
    from qflash_gen import energy

    shape, (b, h, n, d), (q, k, v), ref, (cfg, why), (q8, k8, v8), params = _problem(name, batch, config)
    out16 = torch.empty(shape, dtype=torch.float16, device="cuda")

    def kern16():
        launch.launch(cfg, q8, k8, v8, params, out=out16, out_dtype=torch.float16)

    kern16()
    want = reference.reference_int8(q8, k8, v8, params, cfg, out_dtype=torch.float16)
    equal = bool(torch.equal(out16.view(torch.int16), want.view(torch.int16)))
    sqnr = {"qflash_gen": reference.sqnr_db(out16, ref)}
    works = {"qflash_gen": energy.GraphWork(kern16)}
    for impl in SDPA_BACKENDS:
        fn = _sdpa(impl)
        try:
            sqnr[impl] = reference.sqnr_db(fn(q, k, v), ref)
            works[impl] = energy.GraphWork(lambda fn=fn: fn(q, k, v))
        except RuntimeError as e:  # backend unavailable for this shape/dtype, or not capturable
            print(f"  energy {impl}: unavailable ({str(e).splitlines()[0][:80]})", file=sys.stderr)
    results = energy.EnergyMeter(counter, min_seconds=min_seconds, repeats=repeats).measure_many(works)
    base = dict(gpu=gpu, workload=name, batch=batch, B=b, H=h, N=n, D=d, config=cfg.short(), lookup=why)
    for impl, r in results.items():
        rows.append(
            {
                **base,
                "mode": "energy",
                "impl": impl,
                "us": r.us_per_call,
                "sqnr_db": sqnr[impl],
                "oracle_equal": equal if impl == "qflash_gen" else "",
                "energy_uj": r.uj_per_call,
                "energy_min_uj": r.uj_min,
                "energy_max_uj": r.uj_max,
                "above_idle_uj": r.above_idle_uj,
                "above_idle_min_uj": r.above_idle_min_uj,
                "above_idle_max_uj": r.above_idle_max_uj,
                "idle_w": r.idle_w,
                "busy_w": r.busy_w,
                "repeats": r.repeats,
                "calls": r.calls,
                "loop_s": r.busy_s,
                "counter_step_ms": None if r.tick_s is None else r.tick_s * 1e3,
            }
        )


ENERGY_GOAL = 0.188  # the paper's claim: 18.8 % less energy than FP16 FlashAttention


def energy_markdown(rows: list[dict], counter: str, min_seconds: float, repeats: int) -> str:
    """The energy section: qflash vs each SDPA backend, µJ per call, median (min-max) of the rounds."""
    from qflash_gen import energy

    rows = [r for r in rows if r["mode"] == "energy"]
    if not rows:
        return ""
    step = [r["counter_step_ms"] for r in rows if r.get("counter_step_ms") is not None]
    out = [
        "## Energy per call (µJ)",
        "",
        f"Counter: {counter}; counter step ≈ {step[0]:.1f} ms." if step else f"Counter: {counter}.",
        f"Method: {energy.method(min_seconds, repeats)}.",
        "Cells: median of the rounds (min–max). Saving = 1 − qflash / best SDPA backend (by total µJ); "
        f"goal ≥ {ENERGY_GOAL:.1%} (the paper's claim). µs: GPU time per call in the energy loop.",
        "",
        "| workload | batch | qflash µJ | qflash above idle µJ | best SDPA µJ (backend) | its above idle µJ | "
        + " | ".join(f"{b} µJ" for b in SDPA_BACKENDS)
        + " | saving total | saving above idle | goal met | idle W | qflash W | qflash µs | best SDPA µs |",
        "|---|---|---|---|---|---|" + "---|" * len(SDPA_BACKENDS) + "---|---|---|---|---|---|---|",
    ]

    def cell(r: dict | None) -> str:
        if r is None:
            return "n/a"
        return f"{r['energy_uj']:.1f} ({r['energy_min_uj']:.1f}–{r['energy_max_uj']:.1f})"

    def above(r: dict) -> str:
        return f"{r['above_idle_uj']:.1f} ({r['above_idle_min_uj']:.1f}–{r['above_idle_max_uj']:.1f})"

    for wl, bt in sorted({(r["workload"], r["batch"]) for r in rows}):
        rs = {r["impl"]: r for r in rows if r["workload"] == wl and r["batch"] == bt}
        qf = rs.get("qflash_gen")
        sd = [rs[b] for b in SDPA_BACKENDS if b in rs]
        best = min(sd, key=lambda r: r["energy_uj"]) if sd else None
        if qf is None or best is None:
            continue
        save = 1 - qf["energy_uj"] / best["energy_uj"]
        save_above = 1 - qf["above_idle_uj"] / best["above_idle_uj"] if best["above_idle_uj"] > 0 else math.nan
        out.append(
            f"| {wl} | {bt} | {cell(qf)} | {above(qf)} | {cell(best)} ({best['impl']}) | {above(best)} | "
            + " | ".join(cell(rs.get(b)) for b in SDPA_BACKENDS)
            + f" | {save:.1%} | {save_above:.1%} | {'yes' if save >= ENERGY_GOAL else 'no'} | {qf['idle_w']:.1f} | "
            f"{qf['busy_w']:.1f} | {qf['us']:.1f} | {best['us']:.1f} |"
        )
    return "\n".join(out)


def _limits_cell(r: dict) -> str:
    def pct(x):
        return "–" if x is None or x == "" else f"{100 * x:.0f}"

    return " / ".join(pct(r.get(k)) for k in ("hbm_frac", "mma_frac", "alu_frac"))


def limits_line(gpu: str, clock_mhz: float, clock_source: str) -> str:
    """The header line naming the peaks and the clock the limits column uses."""
    pk = roofline.peaks(gpu)
    if pk is None:
        return f"Limits: no peaks known for {gpu!r} (qflash_gen.gpu.KNOWN_GPUS), so no fractions."
    return (
        f"Limits (qflash_gen/roofline.py): HBM {pk.hbm_bytes_per_s / 1e12:.2f} TB/s, dense int8 tensor "
        f"{pk.int8_ops_per_s / 1e12:.0f} TOPS, integer ALU {pk.sms} SMs × {pk.int32_lanes_per_sm} INT32 lanes "
        f"per pipe (ALU pipe and FMA pipe for IMAD; the busier one counts) at {clock_mhz:.0f} MHz ({clock_source})."
    )


def markdown(rows: list[dict], gpu: str, header: str) -> str:
    out = [
        header,
        "",
        "| workload | batch | qflash kernel µs | best SDPA µs (backend) | kernel ratio | qflash graph µs "
        "| best SDPA graph µs | graph ratio | fp16→fp16 dynamic graph µs (ratio) | fp16→fp16 static graph µs (ratio) "
        "| I-ViT unfused graph µs (qflash speedup) | limits % (HBM/MMA/ALU) | SQNR dB | == oracle (kernel/dyn/static/I-ViT) "
        "| config (lookup) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["workload"], r["batch"]) for r in rows}, key=lambda x: (x[0], x[1]))
    for wl, bt in keys:
        rs = [r for r in rows if r["workload"] == wl and r["batch"] == bt]

        def get(mode, impl, rs=rs):
            return next((r for r in rs if r["mode"] == mode and r["impl"] == impl), None)

        qk, qg = get("kernel", "qflash_gen"), get("graph", "qflash_gen")
        qfg, qsg = get("graph_fp16", "qflash_gen"), get("graph_fp16_static", "qflash_gen")
        ivg = get("graph_ivit", "ivit_unfused")
        qf, qs, iv = get("fp16", "qflash_gen"), get("fp16_static", "qflash_gen"), get("ivit", "ivit_unfused")
        sd = [r for r in rs if r["mode"] == "fp16" and r["impl"].startswith("sdpa")]
        sg = [r for r in rs if r["mode"] == "graph" and r["impl"].startswith("sdpa")]
        best = min(sd, key=lambda r: r["us"]) if sd else None
        bestg = min(sg, key=lambda r: r["us"]) if sg else None

        def ratio(a, b):
            return f"{b['us'] / a['us']:.2f}×" if a and b else "n/a"

        def cell(r, against):
            return f"{r['us']:.1f} ({ratio(r, against)})" if r else "n/a"

        eq = "/".join(str(r["oracle_equal"]) if r else "n/a" for r in (qk, qf, qs, iv))
        ivit = f"{ivg['us']:.1f} ({ratio(qg, ivg)})" if ivg else "n/a"  # speedup: I-ViT time / qflash time
        out.append(
            f"| {wl} | {bt} | {qk['us']:.1f} | {best['us']:.1f} ({best['impl']}) | {ratio(qk, best)} | "
            f"{qg['us']:.1f} | {bestg['us']:.1f} | {ratio(qg, bestg)} | {cell(qfg, bestg)} | {cell(qsg, bestg)} | "
            f"{ivit} | {_limits_cell(qk)} | {qk['sqnr_db']:.1f} | {eq} | "
            f"{qk['config']} ({qk['lookup']}) |"
        )
    out.append("")
    out.append(
        "Ratios are best-SDPA fp16 time / qflash time (>1: qflash faster); graph columns: both under CUDA-graph "
        "replay (GPU time; host launch time excluded). kernel: int8 in (V key-major), fp16 out, the launch alone. "
        "fp16→fp16 dynamic: `qflash_gen.attention`, one scale per (batch, head) computed on the device "
        "(k smoothed), two launches (quantizer, kernel). static: per-tensor scales calibrated once "
        "(Python floats), fp16 q, k, v quantized in the kernel's loads where one query block covers N, "
        "else by the quantizer first. I-ViT unfused: int8 QKᵀ GEMM, integer softmax over whole rows, int8 "
        "P·V GEMM in three launches with N×N intermediates in HBM (tools/ivit_baseline.py), the same integer "
        "math; the speedup is its graph time over qflash's. limits %: the kernel row's share of peak HBM "
        "bandwidth, dense int8 tensor rate and integer-ALU rate (– where not modelled; see qflash_gen/roofline.py)."
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="A1,A2,A3,A4,A5,A6,A7")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument(
        "--config",
        default=None,
        help="KernelConfig fields as k=v,... over the default config (default: get_kernel's DB pick per shape)",
    )
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument("--energy", action="store_true", help="also µJ per call (NVML energy counter, graph replay)")
    p.add_argument("--energy-seconds", type=float, default=1.0, help="least GPU time of each energy loop (s)")
    p.add_argument("--energy-repeats", type=int, default=3, help="energy rounds (idle + every impl) per workload")
    p.add_argument("--time-budget", type=float, default=0, help="seconds; start no new shape after this (0: none)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.py needs a CUDA GPU", file=sys.stderr)
        return 2
    counter = None
    if args.energy:
        from qflash_gen import energy

        try:
            counter = energy.open_counter()
        except energy.EnergyUnavailable as exc:
            print(f"bench.py --energy: {exc}", file=sys.stderr)
            return 2
    cfg = None
    if args.config:
        try:
            cfg = parse_config(args.config)  # fields over DEFAULT_CONFIG, as qflash-show --config
        except ValueError as exc:
            print(f"{Path(__file__).name}: --config: {exc}", file=sys.stderr)
            return 2
    gpu = gpu_label()
    clock_mhz, clock_source = roofline.max_sm_clock_mhz(torch.cuda.current_device())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{gpu}{args.tag}"
    dev = torch.cuda.get_device_properties(0)
    header = (
        f"# qflash-gen vs SDPA fp16 on {torch.cuda.get_device_name()} ({gpu})\n\n"
        f"{datetime.date.today()} · torch {torch.__version__} · triton {triton.__version__} · "
        f"{dev.multi_processor_count} SMs · command: `python tools/bench.py --workloads {args.workloads} --batches {args.batches}"
        + (f" --config {args.config}" if args.config else "")
        + (f" --time-budget {args.time_budget:g}" if args.time_budget else "")
        + (
            f" --energy --energy-seconds {args.energy_seconds:g} --energy-repeats {args.energy_repeats}"
            if counter
            else ""
        )
        + "`\n\n"
        + limits_line(gpu, clock_mhz, clock_source)
    )
    rows: list[dict] = []
    start = time.monotonic()
    for wl in args.workloads.split(","):
        for bt in (int(x) for x in args.batches.split(",")):
            if args.time_budget and time.monotonic() - start > args.time_budget:
                print(f"time budget of {args.time_budget:g} s spent: {wl} b={bt} and later not measured", flush=True)
                break
            try:
                bench_one(wl, bt, cfg, rows, gpu, clock_mhz)
            except Exception as exc:  # one workload failing must not lose the others
                print(f"{wl} b={bt}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
                continue
            last = [r for r in rows if r["workload"] == wl and r["batch"] == bt]
            print(f"{wl} b={bt}: " + " ".join(f"{r['mode']}/{r['impl']}={r['us']:.1f}" for r in last), flush=True)
            if counter is not None:
                bench_energy(
                    wl,
                    bt,
                    cfg,
                    rows,
                    gpu,
                    counter=counter,
                    min_seconds=args.energy_seconds,
                    repeats=args.energy_repeats,
                )
                got = [r for r in rows if r["workload"] == wl and r["batch"] == bt and r["mode"] == "energy"]
                print(" ".join(f"energy/{r['impl']}={r['energy_uj']:.1f}uJ" for r in got), flush=True)
            _write(out, stem, rows, markdown(rows, gpu, header))  # after every shape: a killed run keeps them
    md = markdown(rows, gpu, header)
    if counter is not None:
        md += "\n\n" + energy_markdown(rows, counter.description, args.energy_seconds, args.energy_repeats)
    _write(out, stem, rows, md)
    try:  # the PNG next to them (tools/plot_bench.py; needs matplotlib)
        sys.path.insert(0, str(ROOT / "tools"))
        from plot_bench import plot

        plot(out / f"{stem}.csv", out / f"{stem}.png")
    except ImportError as exc:
        print(
            f"no plot ({exc}): pip install matplotlib, then python tools/plot_bench.py {out / stem}.csv",
            file=sys.stderr,
        )
    print(md)
    return 0


def _write(out: Path, stem: str, rows: list[dict], md: str) -> None:
    if not rows:
        return
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    (out / f"{stem}.md").write_text(md + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
