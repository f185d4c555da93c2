"""Where does the host time of one qflash_gen call go?  (GPU machine.)

    python tools/profile_call.py --shape 64,12,197,64

Prints the wall time per call of each stage (synchronized, median of 50) and the torch.profiler
table of the whole fp16 call, sorted by CPU time."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qflash_gen import api, attention, launch, quant, quant_kernels  # noqa: E402
from qflash_gen.config import default_config  # noqa: E402


def timed(fn, reps=50):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e6)
    return statistics.median(ts)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="64,12,197,64")
    a = p.parse_args()
    shape = tuple(int(x) for x in a.shape.split(","))
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.float16) for _ in range(3))
    cfg = default_config(shape[2], shape[3])
    sq, sk, sv = (quant.dynamic_scale(t) for t in (q, k, v))
    q8, k8, v8 = (quant.quantize(t, s) for t, s in ((q, sq), (k, sk), (v, sv)))
    params = quant.make_params(sq, sk, sv, head_dim=shape[3])
    stages = {
        "dynamic_scale x3": lambda: [quant.dynamic_scale(t) for t in (q, k, v)],
        "quantize x3": lambda: [quant.quantize(t, s) for t, s in ((q, sq), (k, sk), (v, sv))],
        "make_params": lambda: quant.make_params(sq, sk, sv, head_dim=shape[3]),
        "quantize_heads (1 launch)": lambda: quant_kernels.quantize_heads(q, k, v),
        "launch (fp16 out)": lambda: launch.launch(cfg, q8, k8, v8, params, out_dtype=torch.float16),
        "attention_int8": lambda: api.attention_int8(q8, k8, v8, (sq, sk, sv), config=cfg, out_dtype=torch.float16),
        "attention (fp16)": lambda: attention(q, k, v, config=cfg),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
    }
    for name, fn in stages.items():
        print(f"{name:22s} {timed(fn):9.1f} us/call (synchronized)")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            attention(q, k, v, config=cfg)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
