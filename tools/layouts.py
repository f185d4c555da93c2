"""Time the input layouts and quantization paths of one config against each other, on one GPU.

    python tools/layouts.py --workloads A3,A4 --batches 8,64 [--config block_m=64,block_n=256,...]

Per workload x batch (do_bench median, µs; every output checked bit for bit against the oracle):
  int8_v_contig    int8 q, k, v, V contiguous (B, H, N, D): the kernel transposes V byte by byte
  int8_v_keymajor  the same values, V key-major (quant.key_major, what quant_kernels writes)
  static           fp16 in, static scales: launch.launch_static (in-load quantization, or the quantizer first)
  dynamic          fp16 in, api.attention (per-call scales: absmax, quantize, kernel)
Prints one line per shape and writes <out>/layouts-<gpu>.csv.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
import triton.testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qflash_gen import api, codegen, launch, quant, quant_kernels, reference  # noqa: E402
from qflash_gen.config import KernelConfig, parse_config  # noqa: E402
from qflash_gen.kernel import get_kernel  # noqa: E402


def _us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def _shape(name: str, batch: int) -> tuple[int, int, int, int]:
    from bench import shape_of  # tools/bench.py: the paper's A1..A7

    return shape_of(name, batch)


def run(name: str, batch: int, config: KernelConfig | None) -> list[dict]:
    shape = _shape(name, batch)
    b, h, n, d = shape
    cfg = config or get_kernel(shape, dtype=torch.float16).config
    module = codegen.load(cfg)
    g = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = ((torch.rand(shape, device="cuda", generator=g) * 8 - 4).half() for _ in range(3))
    sq, sk, sv = (float(quant.dynamic_scale(t)) for t in (q, k, v))
    params = quant.make_params(sq, sk, sv, head_dim=d, device="cuda")
    q8, k8, v8 = quant.quantize(q, sq), quant.quantize(k, sk), quant.quantize(v, sv)
    v8k = quant.key_major(v8)
    want = reference.reference_int8(q8, k8, v8, params, cfg, out_dtype=torch.float16)
    out = torch.empty(shape, dtype=torch.float16, device="cuda")

    paths = {
        "int8_v_contig": lambda: launch.launch_fast(module, cfg, q8, k8, v8, params, None, out, torch.float16),
        "int8_v_keymajor": lambda: launch.launch_fast(module, cfg, q8, k8, v8k, params, None, out, torch.float16),
        "static": lambda: launch.launch_static(module, cfg, q, k, v, params, None, out, torch.float16, fast=True),
        "dynamic": lambda: api.attention(q, k, v, config=cfg),
    }
    rows = []
    for path, fn in paths.items():
        got = fn()
        if path == "dynamic":  # its own per-call scales: compare against its own oracle
            a, b_, c, p = quant_kernels.quantize_heads(q, k, v)
            exp = reference.reference_int8(a, b_, c, p, cfg, out_dtype=torch.float16)
        else:
            exp = want
        equal = bool(torch.equal(got.view(torch.int16), exp.view(torch.int16)))
        rows.append(
            dict(workload=name, batch=batch, B=b, H=h, N=n, D=d, config=cfg.short(), path=path,
                 us=_us(fn), oracle_equal=equal)
        )  # fmt: skip
    print(
        f"{name} b={batch} {cfg.short()}: "
        + " ".join(f"{r['path']}={r['us']:.1f}{'' if r['oracle_equal'] else '(MISMATCH)'}" for r in rows),
        flush=True,
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="A3,A4")
    p.add_argument("--batches", default="8,64")
    p.add_argument(
        "--config",
        default=None,
        help="KernelConfig fields as k=v,... over the default config (default: get_kernel's pick)",
    )
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("layouts.py needs a CUDA GPU", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "tools"))
    cfg = None
    if args.config:
        try:
            cfg = parse_config(args.config)  # fields over DEFAULT_CONFIG, as qflash-show --config
        except ValueError as exc:
            print(f"{Path(__file__).name}: --config: {exc}", file=sys.stderr)
            return 2
    rows = [r for wl in args.workloads.split(",") for bt in map(int, args.batches.split(",")) for r in run(wl, bt, cfg)]
    from qflash_gen.gpu import current_gpu

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"layouts-{current_gpu()}.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")
    return 0 if all(r["oracle_equal"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
