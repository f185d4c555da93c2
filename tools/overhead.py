"""Host overhead of the call path, and CUDA-graph capture of qflash_gen.attention (GPU machine).

    python tools/overhead.py [--shape 1,3,197,64] [--calls 3000]

Host time per call = wall time of `calls` back-to-back launches with no sync, divided by calls
(the GPU work of this small shape is shorter than the host time, so the host is what is timed).
Compared, on the same compiled kernel and arguments:
  raw        module._qflash_fwd[grid](...) with every argument precomputed (Triton's own launch)
  kernel     qflash_gen.get_kernel(shape, ...)(q8, k8, v8, scales)  (the designed call path)
  launch     qflash_gen.launch.launch(config, ...)                  (config -> module each call)
  attention  qflash_gen.attention(q, k, v)  fp16 in/out, dynamic scales, DB lookup
Then captures qflash_gen.attention in a CUDA graph and checks replay == eager, bit for bit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qflash_gen  # noqa: E402
from qflash_gen import launch, quant  # noqa: E402
from qflash_gen.codegen import signature  # noqa: E402


def per_call_us(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return host / calls * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1,3,197,64")
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    shape = tuple(int(x) for x in a.shape.split(","))
    b, h, n, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = ((torch.rand(shape, device="cuda", generator=g) * 8 - 4).half() for _ in range(3))
    scales = (4 / 127, 4 / 127, 4 / 127)
    q8, k8, v8 = (quant.quantize(t, s) for t, s in zip((q, k, v), scales, strict=True))
    kern = qflash_gen.get_kernel(shape, dtype=torch.int8, out_dtype=torch.float16)
    cfg = kern.config
    print(f"{torch.cuda.get_device_name()}  shape={shape}  config={cfg.short()}  why={kern.why}")
    out = torch.empty(shape, dtype=torch.float16, device="cuda")
    params = quant.make_params(*scales, head_dim=d, device="cuda")
    module = kern.module
    grid = (triton.cdiv(n, cfg.block_m), b * h)
    lut = launch.lut_arg(cfg, q8.device, params.scales)
    args = signature.pack(
        q8, k8, v8, out, params.scales, params, params.strides(), 1, lut, q8.stride(), k8.stride(), v8.stride(),
        out.stride(), launch.NO_STRIDES, h, n, d, False, True, launch.v_keys(v8), cfg.tail_rows(n), 1,
    )  # fmt: skip
    options = signature.launch_options(cfg.render_part())  # Triton's own launch, uncapped, one head
    fn = module._qflash_fwd

    def raw():
        fn[grid](*args, **options)

    def via_kernel():
        kern(q8, k8, v8, scales, out_dtype=torch.float16, out=out)

    def via_launch():
        launch.launch(cfg, q8, k8, v8, params, out=out, out_dtype=torch.float16)

    def via_attention():
        qflash_gen.attention(q, k, v)

    raw()
    via_kernel()
    assert torch.equal(out, kern(q8, k8, v8, scales, out_dtype=torch.float16)), "kernel path != raw launch"
    results: dict[str, list[float]] = {"raw": [], "kernel": [], "launch": [], "attention": []}
    for _ in range(a.repeats):  # interleaved, so drift hits every path alike
        results["raw"].append(per_call_us(raw, a.calls))
        results["kernel"].append(per_call_us(via_kernel, a.calls))
        results["launch"].append(per_call_us(via_launch, a.calls))
        results["attention"].append(per_call_us(via_attention, a.calls // 10))
    med = {name: statistics.median(vs) for name, vs in results.items()}
    print(f"host µs per call, median of {a.repeats} × {a.calls} calls (min..max):")
    for name, vs in results.items():
        extra = f"   (+{med[name] - med['raw']:.2f} µs over raw)" if name != "raw" else ""
        print(f"  {name:10s} {med[name]:7.2f}  ({min(vs):.2f}..{max(vs):.2f}){extra}")

    # CUDA graph: capture the whole fp16 call (dynamic scales, DB lookup, launch): any host sync
    # in the path would make the capture fail.
    eager = qflash_gen.attention(q, k, v)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            qflash_gen.attention(q, k, v)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = qflash_gen.attention(q, k, v)
    graph.replay()
    torch.cuda.synchronize()
    same = torch.equal(static_out.view(torch.int16), eager.view(torch.int16))
    q.copy_((torch.rand(shape, device="cuda", generator=g) * 8 - 4).half())  # new data, same buffers
    graph.replay()
    torch.cuda.synchronize()
    same_new = torch.equal(static_out.view(torch.int16), qflash_gen.attention(q, k, v).view(torch.int16))
    print(f"CUDA graph replay == eager: {same} (same inputs), {same_new} (new inputs in the captured buffers)")
    return 0 if (same and same_new) else 1


if __name__ == "__main__":
    raise SystemExit(main())
