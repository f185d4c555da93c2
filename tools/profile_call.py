"""Where does the host time of one qflash_gen call go?  (GPU machine.)

    python tools/profile_call.py --shape 64,12,197,64 [--packed]

Prints, per stage, the wall time of a call (synchronized, median of 50) and the host time of a
call (200 calls back to back, no sync: what an eager model pays where the GPU work is shorter;
"checked": with the hot path's plans ignored, as every first call of a signature runs),
then the torch.profiler table of the whole fp16 call, sorted by CPU time.  ``--packed``: q, k, v
are views of a packed (B, N, 3, H, D) projection, as timm hands them over.  The quantizer runs
twice: through ``fastlaunch`` (the default) and through Triton's own launch."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qflash_gen import api, attention, fastlaunch, hotpath, launch, quant, quant_kernels  # noqa: E402
from qflash_gen.config import default_config  # noqa: E402
from qflash_gen.integrations import ops  # noqa: E402


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


def host(fn, reps=200):
    """Host µs a call: ``reps`` calls back to back, timed before the closing sync (median of 5)."""
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        ts.append((time.perf_counter() - t) * 1e6 / reps)
        torch.cuda.synchronize()
    return statistics.median(ts)


def triton_launch(fn):
    """``fn`` with fastlaunch off (the quantizer through Triton's ``kernel[grid](...)``)."""

    def call():
        fastlaunch.FAST_TRITON = False
        try:
            return fn()
        finally:
            fastlaunch.FAST_TRITON = FAST

    return call


FAST = fastlaunch.FAST_TRITON


def checked(fn):
    """``fn`` with the hot path off (no signature: every call takes the checked path, nothing recorded)."""

    def call():
        signature = hotpath.signature
        hotpath.signature = lambda *a: None
        try:
            return fn()
        finally:
            hotpath.signature = signature

    return call


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="64,12,197,64")
    p.add_argument("--packed", action="store_true", help="q, k, v as views of a (B, N, 3, H, D) tensor")
    a = p.parse_args()
    shape = tuple(int(x) for x in a.shape.split(","))
    if a.packed:
        b, h, n, d = shape
        qkv = torch.randn((b, n, 3, h, d), device="cuda", dtype=torch.float16)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.float16) for _ in range(3))
    cfg = default_config(shape[2], shape[3])
    sq, sk, sv = (quant.dynamic_scale(t) for t in (q, k, v))
    q8, k8, v8 = (quant.quantize(t, s) for t, s in ((q, sq), (k, sk), (v, sv)))
    params = quant.make_params(sq, sk, sv, head_dim=shape[3])
    table = ops.static_table(torch.stack([sq, sk, sv]).reshape(3, 1).float())
    stages = {
        "dynamic_scale x3": lambda: [quant.dynamic_scale(t) for t in (q, k, v)],
        "quantize x3": lambda: [quant.quantize(t, s) for t, s in ((q, sq), (k, sk), (v, sv))],
        "make_params": lambda: quant.make_params(sq, sk, sv, head_dim=shape[3]),
        "quantize_heads (1 launch)": lambda: quant_kernels.quantize_heads(q, k, v),
        "quantize_heads, Triton launch": triton_launch(lambda: quant_kernels.quantize_heads(q, k, v)),
        "launch (fp16 out)": lambda: launch.launch(cfg, q8, k8, v8, params, out_dtype=torch.float16),
        "attention_int8": lambda: api.attention_int8(q8, k8, v8, (sq, sk, sv), config=cfg, out_dtype=torch.float16),
        "attention (fp16)": lambda: attention(q, k, v, config=cfg),
        "attention, Triton launch q": triton_launch(lambda: attention(q, k, v, config=cfg)),
        "attention (DB config)": lambda: attention(q, k, v),
        "attention, checked path": checked(lambda: attention(q, k, v)),
        "attention_static (DB config)": lambda: ops.attention_static_impl(q, k, v, table),
        "attention_static, checked": checked(lambda: ops.attention_static_impl(q, k, v, table)),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
    }
    print(f"shape {shape} packed={a.packed} fastlaunch={FAST} {torch.cuda.get_device_name()}")
    for name, fn in stages.items():
        print(f"{name:30s} {timed(fn):9.1f} us/call synchronized {host(fn):9.1f} us/call host")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            attention(q, k, v, config=cfg)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
