"""Time the one-launch quantizer (``quant_kernels.quantize_heads``) on the q, k, v views timm hands
over (a packed (B, N, 3, H, D) fp16 projection), for each kernel it can run, against the HBM floor.

    python tools/bench_quant.py --out out --workloads A1,A2,A3,A4,A5 --batches 1,8,64

For each workload and batch: the default choice (``tile_plan``), the chunked kernel and the listed
one-tile variants (BLOCK_N, groups per program, warps, ...; the prefetching kernel's among them) or,
for heads no tile holds (N = 577, 1370), the chunked kernel's launch variants (``Chunked``: rows a
chunk, warps, 1-D grid, pipelined loops), dynamic and static scales, CUDA-graph replay (median, µs).  Every variant's bits are compared with the torch oracle
(``quant.quantize_dynamic`` / ``quant.quantize_groups``) first; a row says ``equal``.  The floor is
the bytes moved (2 read + 1 written per element) at the rate a ``clone`` of the same packed
tensor reaches.  Writes ``quant-<gpu>.csv`` and ``.md`` under --out after every shape.  GPU only;
``--markdown FILE.csv`` rewrites the table of a CSV on any machine.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import gpu_label, shape_of  # noqa: E402

from qflash_gen import quant, quant_kernels  # noqa: E402
from qflash_gen.quant_kernels import Chunked  # noqa: E402

# fmt: off
VARIANTS = {  # name -> tile argument of quantize_heads, by head size class
    # (BLOCK_N, heads a program, warps[, 1-D grid[, register cap[, programs a tensor[, stages]]]]);
    # False: the (groups, 3) grid.  Programs > 0: the prefetching kernel, P programs a tensor each
    # walking blocks p, p + P, ... (stages 3: Triton's pipeliner in place of register prefetch).
    # P: one resident wave of 3P CTAs on an H200's 132 SMs at the registers cross-compiled for
    # sm_90 (ViT-B, dynamic): 8 warps 254 (1 CTA an SM: P 44), capped at 128 (2 an SM: P 88);
    # 4 warps 255 (2 an SM: P 88); N=49, GB 2, 4 warps 128 (4 an SM: P 176; 528 is three waves)
    197: [
        (256, 1, 4), (256, 1, 8), (256, 1, 16), (256, 1, 8, False), (256, 1, 8, True, 80), (256, 1, 8, True, 64),
        (256, 1, 8, True, 0, 44), (256, 1, 8, True, 128, 88), (256, 1, 4, True, 0, 88), (256, 1, 8, True, 0, 44, 3),
    ],
    49: [
        (64, 1, 4), (64, 2, 4), (64, 4, 4), (64, 4, 8), (64, 8, 8), (64, 2, 4, True, 80), (64, 2, 4, True, 64),
        (64, 2, 4, True, 0, 176), (64, 2, 4, True, 0, 528),
    ],
}
# fmt: on
# Heads no tile holds (ViT/384 N = 577, DINOv2/518 N = 1370, D = 64): the chunked kernel's launch
# options, Chunked(rows a chunk, warps, 1-D grid, stages); the default choice is Chunked(32, 4).
# Registers cross-compiled for sm_90 at D = 64 with Triton 3.6 (the device's; a kernel's count is
# its k program's: dynamic, k smoothed), static in brackets; no spills.  Stages 3 keep two chunks
# in shared memory (one in flight while the other is reduced), 4 three; every chunk loop is
# pipelined (cp.async in the TTGIR).  The trade counted: programs an SM (registers) x chunks in
# flight x chunk bytes (default: 8 x 1 x 4 KB) against the heads those programs re-read from L2
# (default at N = 577: 1,056 resident head tensors x 74 KB = 78 MB, over the H200's L2; 128 rows,
# 16 warps, stages 3: 2 x 2 x 16 KB in flight, 19.5 MB resident).
LONG_HEADS = [
    Chunked(32, 4, True),  # the default's launch on the 1-D grid: 64 (40)
    Chunked(64, 4, True),  # 96 (56)
    Chunked(64, 8),  # 64 (40)
    Chunked(64, 8, True),
    Chunked(128, 8, True),  # 127 (64)
    Chunked(128, 16, True),  # 64 (32)
    Chunked(256, 16, True),  # 128 (64)
    Chunked(32, 4, True, 3),  # 69 (48), 8 KB shared
    Chunked(32, 4, True, 4),  # 70 (48), 12 KB
    Chunked(64, 8, True, 3),  # 68 (48), 16 KB
    Chunked(64, 8, True, 4),  # 76 (48), 24 KB
    Chunked(128, 8, True, 3),  # 128 (80), 32 KB
    Chunked(128, 16, True, 3),  # 64 (52), 32 KB
]
VARIANTS[577] = VARIANTS[1370] = LONG_HEADS


def variant_name(t: tuple | Chunked) -> str:
    if isinstance(t, Chunked):
        return t.name
    grid = "" if len(t) < 4 or t[3] else "grid2d"
    cap = f"r{t[4]}" if len(t) > 4 and t[4] else ""
    programs = f"p{t[5]}" if len(t) > 5 and t[5] else ""
    stages = f"s{t[6]}" if len(t) > 6 and t[6] else ""
    return f"tile{t[0]}x{t[1]}w{t[2]}{grid}{cap}{programs}{stages}"


def packed_views(shape, seed=0):
    b, h, n, d = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn((b, n, 3, h, d), generator=g, device="cuda", dtype=torch.float16) * 2
    return qkv, qkv.permute(2, 0, 3, 1, 4).unbind(0)


def graph_us(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def equal(got, want) -> bool:
    return all(torch.equal(a.contiguous(), b.contiguous()) for a, b in zip(got, want, strict=True))


def bench_shape(name: str, batch: int) -> list[dict]:
    shape = shape_of(name, batch)
    b, h, n, d = shape
    qkv, (q, k, v) = packed_views(shape)
    floor_rate = qkv.numel() * 4 / (graph_us(lambda: qkv.clone()) * 1e-6)  # bytes per s of a clone
    floor_us = qkv.numel() * 3 / floor_rate * 1e6
    want_dyn = quant.quantize_dynamic(q, k, v, d)
    sq, sk, sv = (want_dyn[3].scales[..., i].reshape(b, h).contiguous() for i in range(3))
    params = quant.make_params(sq, sk, sv, head_dim=d)
    want_static = tuple(quant.quantize_groups(t, s) for t, s in ((q, sq), (k, sk), (v, sv)))
    default = quant_kernels.tile_plan(n, d) or f"({Chunked().name})"  # no tile holds a head: chunked
    variants = [("default", None), ("chunked", False)]
    variants += [
        (variant_name(t), t) for t in VARIANTS.get(n, []) if isinstance(t, Chunked) or t[0] * t[1] * d <= 32768
    ]
    rows = []
    for vname, tile in variants:
        for mode in ("dynamic", "static"):
            if mode == "dynamic":

                def run(tile=tile):
                    return quant_kernels.quantize_heads(q, k, v, tile=tile)

                want = want_dyn[:3]
            else:

                def run(tile=tile):
                    return quant_kernels.quantize_heads(q, k, v, params=params, tile=tile)

                want = want_static
            try:
                got = run()
                ok = equal(got[:3], want) and (
                    mode == "static" or torch.equal(got[3].scales, want_dyn[3].scales.reshape(got[3].scales.shape))
                )
                us = graph_us(run)
                err = ""
            except Exception as exc:  # a variant that does not compile is a row, not the end
                ok, us, err = False, float("nan"), f"{type(exc).__name__}: {exc}"[:120]
            rows.append(
                dict(
                    gpu=gpu_label(),
                    workload=name,
                    batch=batch,
                    shape="x".join(map(str, shape)),
                    variant=vname if tile is not None else f"default{default}",
                    mode=mode,
                    us=round(us, 2),
                    floor_us=round(floor_us, 2),
                    equal=ok,
                    error=err,
                )
            )
            print(
                f"{name} b={batch} {rows[-1]['variant']:>22} {mode:8} {us:8.2f} us  floor {floor_us:6.2f}  equal={ok} {err}",
                flush=True,
            )
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a table, with each shape's fastest variant per mode marked."""
    best = {}
    for r in rows:
        key = (r["workload"], r["batch"], r["mode"])
        if str(r["equal"]) == "True" and float(r["us"]) < best.get(key, float("inf")):
            best[key] = float(r["us"])
    lines = [
        f"# The one-launch quantizer on {rows[0]['gpu']} (tools/bench_quant.py; CUDA-graph replay, median µs)",
        "",
        "| workload | batch | B×H×N×D | variant | mode | µs | floor µs | equal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        us = f"**{r['us']}**" if float(r["us"]) == best.get((r["workload"], r["batch"], r["mode"])) else r["us"]
        lines.append(
            f"| {r['workload']} | {r['batch']} | {r['shape']} | {r['variant']} | {r['mode']} | {us} | {r['floor_us']} | {r['equal']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out")
    ap.add_argument("--workloads", default="A1,A2,A3,A4,A5")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--markdown", metavar="CSV", help="write CSV's .md beside it and stop (no GPU needed)")
    args = ap.parse_args(argv)
    if args.markdown:
        with open(args.markdown, newline="") as f:
            Path(args.markdown).with_suffix(".md").write_text(markdown(list(csv.DictReader(f))))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench_quant.py needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    stem = f"quant-{gpu_label()}"
    for name in args.workloads.split(","):
        for batch in (int(x) for x in args.batches.split(",")):
            rows += bench_shape(name, batch)
            with open(out / f"{stem}.csv", "w", newline="") as f:  # after every shape: nothing lost on a cut
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            (out / f"{stem}.md").write_text(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
