"""Whole timm models, fp16: SDPA (timm as shipped) vs the same model patched with qflash-gen.

    python tools/bench_models.py                                  # 6 models x b=1,64 x eager,graph x 3 impls
    python tools/bench_models.py --models vit_b,swin_t --batches 64 --modes graph
    python tools/bench_models.py --device cpu --backend reference --models vit_t --batches 1 \\
        --modes eager --iters 1 --repeats 1 --out /tmp/bench        # CPU smoke test (slow oracle)

Models (random weights, seed fixed, eval, no_grad): vit_t, vit_s, vit_b (timm ViT-T/S/B/16 @224),
deit_s, swin_t (Swin-T @224), vit_b_384 (ViT-B/16 @384, N=577).  Impls: ``sdpa`` (an unpatched
copy), ``qflash_dynamic`` (``patch_model`` with default options), ``qflash_static`` (patched, then
``calibrate`` on --calib-batches other random batches of the same shape).  Modes:

  eager  CUDA events around --iters back-to-back forwards (host time included: at b=1 the launch
         overhead is the point), ms per forward, median of --repeats
  graph  ``model(x)`` captured into a torch.cuda.CUDAGraph after warm-up; events around --iters
         replays, median of --repeats (CUDA only)

Per row also: ``cosine`` of the logits vs SDPA's (flattened, float32; graph rows: the graph's own
output), ``launches`` (device kernels in one profiled eager forward: torch.profiler with CUDA
activity, events of kineto category "kernel", so no memcpy/memset/sync) and ``launch_calls`` (host
launch API calls in that forward: profiler events named cudaLaunchKernel*/cuLaunchKernel*; Triton
launches through the driver's cuLaunchKernelEx), and that forward's device time by kind of kernel
(``dev_*_ms``: qflash attention, its quantizer, SDPA, GEMMs, other; ``top_kernels``).  All are
empty on CPU.  A failing row is written
with its ``error`` and the run goes on; the CSV is written row by row.
Writes <out>/models-<gpu><tag>.csv and .md.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import itertools
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType

MODELS = {
    "vit_t": "vit_tiny_patch16_224",
    "vit_s": "vit_small_patch16_224",
    "vit_b": "vit_base_patch16_224",
    "deit_s": "deit_small_patch16_224",
    "swin_t": "swin_tiny_patch4_window7_224",
    "vit_b_384": "vit_base_patch16_384",
}
IMPLS = ("sdpa", "qflash_dynamic", "qflash_static")
MODES = ("eager", "graph")
FIELDS = ["gpu", "model", "img", "N", "heads", "layers", "batch", "mode", "impl", "ms", "ratio_vs_sdpa", "cosine"]
FIELDS += ["launches", "launch_calls"]
# Device time of the profiled eager forward, ms, by kind of kernel (first pattern that matches the
# kernel's name): where a forward's GPU time goes, so a model's gap can be split into attention,
# quantizer and everything else.
KINDS = {
    "qflash": re.compile(r"_qflash_fwd"),
    "quant": re.compile(r"_quantize_(tiles|heads)"),
    "sdpa": re.compile(r"flash|fmha|sdpa|attention|attn", re.I),
    "gemm": re.compile(r"gemm|gemv|nvjet|xmma|cutlass|cublas", re.I),
}
FIELDS += ["dev_ms"] + [f"dev_{k}_ms" for k in KINDS] + ["dev_other_ms", "top_kernels", "error"]
LAUNCH_CALL = re.compile(r"^cu(da)?LaunchKernel")


def gpu_label(device: str) -> str:
    if device != "cuda":
        return "cpu"
    try:
        from qflash_gen.gpu import current_gpu

        return current_gpu()
    except Exception:
        name = torch.cuda.get_device_name().lower().removeprefix("nvidia ")
        return re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def describe(model: torch.nn.Module) -> dict:
    """img, N (tokens per attention call), heads, number of attention layers of a timm model."""
    from timm.layers import Attention
    from timm.models.swin_transformer import WindowAttention

    attn = [m for m in model.modules() if isinstance(m, (Attention, WindowAttention))]
    heads = list(dict.fromkeys(m.num_heads for m in attn))
    swin = [m for m in attn if isinstance(m, WindowAttention)]
    n = swin[0].window_area if swin else model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    img = model.pretrained_cfg["input_size"][-1]
    return {"img": img, "N": n, "heads": "/".join(map(str, heads)), "layers": len(attn)}


def build(name: str, impl: str, base, shape, args) -> torch.nn.Module:
    import qflash_gen
    from qflash_gen import models

    if impl == "sdpa":
        return base
    model = copy.deepcopy(base)
    qflash_gen.patch_model(model, backend=args.backend)
    if impl == "qflash_static":
        g = torch.Generator().manual_seed(args.seed + 1)  # other batches than the timed one
        batches = [torch.randn(shape, generator=g).to(args.device, args.dtype) for _ in range(args.calib_batches)]
        models.calibrate(model, batches)
    elif impl != "qflash_dynamic":
        raise ValueError(f"unknown impl {impl!r}")
    assert models.patched_modules(model), f"{name}: nothing was patched"
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_loop(fn, iters: int, repeats: int, device: str) -> float:
    """ms per call: timer around `iters` back-to-back calls (host time included), median of repeats."""
    times = []
    for _ in range(repeats):
        sync(device)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(times)


def capture(fn, warmup: int):
    """(graph, its output tensor): fn warmed up on a side stream, then captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def count_launches(fn) -> dict:
    """Device kernels, host launch API calls and the device-time breakdown (:func:`device_time`)
    of one call of fn, from torch.profiler (empty if it fails)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        events = prof.events()
    except Exception as exc:  # (no CUPTI, say: the row keeps its times)
        print(f"  launch count failed: {error_text(exc)}", flush=True)
        return {}
    kernels = [e for e in events if _is_kernel(e)]
    calls = sum(e.device_type == DeviceType.CPU and bool(LAUNCH_CALL.match(e.name)) for e in events)
    times = [(e.name, getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)) for e in kernels]
    return {"launches": len(kernels), "launch_calls": int(calls), **device_time(times)}


def device_time(kernels: list[tuple[str, float]], top: int = 5) -> dict:
    """``(name, µs)`` of each kernel run -> ms in total and per kind (:data:`KINDS`, else other),
    and the ``top`` kernels by time (short names, µs) as one string."""
    out = {"dev_ms": 0.0, **{f"dev_{k}_ms": 0.0 for k in KINDS}, "dev_other_ms": 0.0}
    by_name: dict[str, float] = {}
    for name, us in kernels:
        kind = next((k for k, pat in KINDS.items() if pat.search(name)), "other")
        out[f"dev_{kind}_ms"] += us / 1e3
        out["dev_ms"] += us / 1e3
        by_name[name] = by_name.get(name, 0.0) + us
    out = {k: round(v, 4) for k, v in out.items()}
    ranked = sorted(by_name.items(), key=lambda t: -t[1])[:top]
    out["top_kernels"] = "; ".join(f"{n[:60]} {us:.0f}" for n, us in ranked)
    return out


def _is_kernel(e) -> bool:
    kind = getattr(e, "activity_type", None)  # kineto's category: kernel, gpu_memcpy, gpu_memset, cuda_sync, ...
    if kind:
        return kind == "kernel"
    return e.device_type == DeviceType.CUDA and not e.name.lower().startswith(("memcpy", "memset"))


def cosine(a: torch.Tensor, b: torch.Tensor | None) -> float:
    if b is None:
        return math.nan
    return F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def bench_impl(name, impl, base, x, ref, modes, sdpa_ms, base_row, args, emit) -> None:
    """Every mode's row of one impl; each failure becomes an error row, the others still run."""
    rows = [{**base_row, "mode": m, "impl": impl} for m in modes]
    try:
        model = build(name, impl, base, tuple(x.shape), args)
        fwd = lambda: model(x)  # noqa: E731
        for _ in range(args.warmup):
            fwd()
        out = fwd()
        sync(args.device)
        cos = cosine(out, ref)
        profiled = count_launches(fwd) if args.device == "cuda" else {}
    except Exception as exc:  # (OOM, an unsupported model, a broken impl: record, go on)
        print(f"  {name} b={base_row['batch']} {impl}: {error_text(exc)}", flush=True)
        for row in rows:
            emit({**row, "error": error_text(exc)})
        _free(args.device)
        return
    for row in rows:
        row.update(cosine=cos, **profiled)
        graph = gout = None
        try:
            if row["mode"] == "eager":
                ms = time_loop(fwd, args.iters, args.repeats, args.device)
            else:
                graph, gout = capture(fwd, args.warmup)
                graph.replay()
                torch.cuda.synchronize()
                row["cosine"] = cosine(gout, ref)  # the graph's own output
                ms = time_loop(graph.replay, args.iters, args.repeats, args.device)
            row["ms"] = ms
            if impl == "sdpa":
                sdpa_ms[row["mode"]] = ms
            if sdpa_ms.get(row["mode"]):
                row["ratio_vs_sdpa"] = sdpa_ms[row["mode"]] / ms
        except Exception as exc:
            row["error"] = error_text(exc)
        del graph, gout
        emit(row)
    _free(args.device)


def _free(device: str) -> None:
    if device == "cuda":
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception as exc:  # a sticky CUDA error: the next rows will say so, the CSV keeps these
            print(f"  CUDA cleanup failed: {error_text(exc)}", flush=True)


def fmt(v, spec: str) -> str:
    return "" if v in ("", None) or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(rows: list[dict], header: str) -> str:
    out = [header]
    patched = [i for i in IMPLS[1:] if any(r["impl"] == i for r in rows)]
    for mode in MODES:
        rs = [r for r in rows if r["mode"] == mode]
        if not rs:
            continue
        out += ["", f"## {mode}", "", "| model | img | N | heads | layers | batch | SDPA ms | SDPA launches | "]
        out[-1] += " | ".join(f"{i} ms | ×SDPA | launches | +/layer | cosine" for i in patched) + " |"
        out.append("|---" * (8 + 5 * len(patched)) + "|")
        for key in dict.fromkeys((r["model"], r["batch"]) for r in rs):
            by = {r["impl"]: r for r in rs if (r["model"], r["batch"]) == key}
            first = next(iter(by.values()))
            sd = by.get("sdpa", {})
            cells = [first["model"], first["img"], first["N"], first["heads"], first["layers"], first["batch"]]
            cells += [fmt(sd.get("ms"), ".3f") or ("err" if sd else ""), fmt(sd.get("launches"), "d")]
            for impl in patched:
                r = by.get(impl, {})
                extra = ""
                if isinstance(r.get("launches"), int) and isinstance(sd.get("launches"), int) and r["layers"]:
                    extra = f"{(r['launches'] - sd['launches']) / r['layers']:+.1f}"
                ms = fmt(r.get("ms"), ".3f") or ("err" if r else "")
                ratio = fmt(r.get("ratio_vs_sdpa"), ".2f")
                cells += [ms, ratio and ratio + "×", fmt(r.get("launches"), "d"), extra, fmt(r.get("cosine"), ".5f")]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
    profiled = [r for r in rows if r["mode"] == MODES[0] and r.get("dev_ms") not in ("", None)]
    if profiled:
        kinds = [*KINDS, "other"]
        out += ["", "## device time of one profiled eager forward (ms)", ""]
        out += ["| model | batch | impl | total | " + " | ".join(kinds) + " |", "|---" * (4 + len(kinds)) + "|"]
        for r in profiled:
            cells = [r["model"], r["batch"], r["impl"], fmt(r["dev_ms"], ".3f")]
            cells += [fmt(r.get(f"dev_{k}_ms"), ".3f") for k in kinds]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
    errors = [r for r in rows if r.get("error")]
    if errors:
        out += ["", "Errors:", ""] + [
            f"- {r['model']} b={r['batch']} {r['mode']} {r['impl']}: {r['error']}" for r in errors
        ]
    out += [
        "",
        "ms: per forward, median of the repeats (eager: timer around back-to-back forwards, host time included; "
        "graph: CUDA-graph replays). ×SDPA: SDPA ms / qflash ms of the same mode (>1: qflash faster). launches: "
        "device kernels in one profiled eager forward (torch.profiler, kineto category kernel: no memcpy/memset; CUDA "
        "only; the CSV also has launch_calls, the host's cudaLaunchKernel*/cuLaunchKernel* calls). +/layer: (launches - SDPA's) / "
        "attention layers. cosine: logits vs SDPA's, flattened, float32. N: tokens per attention call (Swin: a "
        "window). Random weights (seeded), so cosine checks the plumbing, not accuracy on real images.",
    ]
    return "\n".join(out) + "\n"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)} or timm names")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=20, help="forwards (eager) or replays (graph) per repeat")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--calib-batches", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--backend", choices=("triton", "reference"), default="triton")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    args = p.parse_args(argv)
    args.models = [MODELS.get(m.strip(), m.strip()) for m in args.models.split(",") if m.strip()]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.modes = [m.strip() for m in args.modes.split(",")]
    args.impls = [i.strip() for i in args.impls.split(",")]
    bad = [m for m in args.modes if m not in MODES] + [i for i in args.impls if i not in IMPLS]
    if bad:
        p.error(f"unknown mode/impl {bad}; modes: {MODES}, impls: {IMPLS}")
    args.impls = [i for i in IMPLS if i in args.impls]  # sdpa first: the ratios need its time
    args.dtype = getattr(torch, args.dtype)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --backend reference (a smoke test)", file=sys.stderr)
        return 2
    if args.device == "cpu" and args.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is loaded
    if args.device == "cpu" and "graph" in args.modes:
        print("note: graph mode needs CUDA: skipped on CPU", flush=True)
        args.modes.remove("graph")
    import timm
    import triton

    gpu = gpu_label(args.device)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"models-{gpu}{args.tag}"
    header = (
        f"# timm models: SDPA vs qflash-gen patched, {card} ({gpu})\n\n{datetime.date.today()} · torch "
        f"{torch.__version__} · triton {triton.__version__} · timm {timm.__version__} · {str(args.dtype)[6:]}, "
        f"{args.device}/{args.backend}, iters {args.iters} × repeats {args.repeats}\n\n"
        f"command: `python tools/bench_models.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
    )
    rows: list[dict] = []
    with open(f"{stem}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()

        def emit(row: dict) -> None:
            rows.append(row)
            writer.writerow({k: row.get(k, "") for k in FIELDS})
            fh.flush()
            ms, cos = fmt(row.get("ms"), ".3f") or "-", fmt(row.get("cosine"), ".5f") or "-"
            msg = f"{row['model']:30s} b={row['batch']:<3d} {row['mode']:5s} {row['impl']:15s} ms={ms:>9s} cos={cos}"
            msg += f" launches={row.get('launches', '')}" + (f"  ERROR {row['error']}" if row.get("error") else "")
            print(msg, flush=True)

        with torch.no_grad():
            for name in args.models:
                torch.manual_seed(args.seed)
                try:
                    base = timm.create_model(name, pretrained=False).eval().to(args.device, args.dtype)
                    info = describe(base)
                except Exception as exc:
                    for b, impl, m in itertools.product(args.batches, args.impls, args.modes):
                        emit(dict(gpu=gpu, model=name, batch=b, mode=m, impl=impl, error=error_text(exc)))
                    continue
                for b in args.batches:
                    shape = (b, 3, info["img"], info["img"])
                    x = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(
                        args.device, args.dtype
                    )
                    try:
                        ref = base(x)
                    except Exception as exc:
                        ref = None
                        print(f"{name} b={b}: SDPA reference failed ({error_text(exc)}): no cosine", flush=True)
                    base_row = {"gpu": gpu, "model": name, **info, "batch": b}
                    sdpa_ms: dict[str, float] = {}
                    for impl in args.impls:
                        bench_impl(name, impl, base, x, ref, args.modes, sdpa_ms, base_row, args, emit)
                    del x, ref
                    (out_dir / f"{stem.name}.md").write_text(markdown(rows, header))
                del base
                _free(args.device)
    md = markdown(rows, header)
    (out_dir / f"{stem.name}.md").write_text(md)
    print("\n" + md + f"\nwrote {stem}.csv, {stem}.md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
