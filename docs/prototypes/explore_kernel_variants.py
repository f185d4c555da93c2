"""Exploration call (issue 16): kernel structure variants, bits vs the oracle, CUDA-graph time.
Run on the GPU: python proto/explore.py OUTDIR.  Not product code."""
import csv, importlib.util, os, sys, tempfile, time, traceback
from concurrent.futures import ProcessPoolExecutor
import torch, triton, triton.testing
sys.path.insert(0, os.path.dirname(__file__)); sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qflash_gen import codegen, quant, reference, runtime
from qflash_gen.config import KernelConfig
import variants as V

OUT = sys.argv[1] if len(sys.argv) > 1 else "out"
BASE = KernelConfig(block_m=64, block_n=256, num_warps=4, num_stages=2, exp_variant="shift", rescale="shift", rescale_bits=15, p_bits=14)
SHAPES = {"A3b64": (64, 12, 197, 64), "A2b64": (64, 6, 197, 64), "A1b64": (64, 3, 197, 64), "A2b8": (8, 6, 197, 64), "A3b8": (8, 12, 197, 64), "A3b1": (1, 12, 197, 64)}
import re

def vsum_hack(s):
    old = "            FloatParams, LUT,\n            stride_qm, stride_qk, stride_kn"
    assert old in s
    return s.replace(old, "            FloatParams, LUT + pid_zh * HEAD_DIM,\n            stride_qm, stride_qk, stride_kn")

def bf16vin(s):
    s = V.bf16off(s, vbf16_input=True)
    s = re.sub(r"\n *vsum \+= tl\.sum\(v_\d+\.to\(tl\.int32\), axis=0\)", "", s)
    s = s.replace("vsum = tl.zeros([HEAD_DIM], dtype=tl.int32)", "vsum = tl.load(LUT + offs_d)")
    return vsum_hack(s)

def mk(name, cfg, fn=lambda s: s, vkind="km8", check=True):
    return dict(name=name, cfg=cfg, fn=fn, vkind=vkind, check=check)

VARIANTS = [
    mk("base r168 h2", BASE.replace(max_regs=168, heads_per_program=2)),
    mk("base r168 h1", BASE.replace(max_regs=168)),
    mk("notail r168 h1", BASE.replace(max_regs=168), V.notail),
    mk("notail r168 h2", BASE.replace(max_regs=168, heads_per_program=2), V.notail),
    mk("notail r0 h1", BASE, V.notail),
    mk("notail r128 h1", BASE.replace(max_regs=128), V.notail),
    mk("notail dummy r168 h1", BASE.replace(max_regs=168), lambda s: V.dummy(V.notail(s)), check=False),
    mk("p7 base r168 h2", BASE.replace(p_bits=7, max_regs=168, heads_per_program=2)),
    mk("p7 notail r128 h1", BASE.replace(p_bits=7, max_regs=128), V.notail),
    mk("p7 notail r128 h2", BASE.replace(p_bits=7, max_regs=128, heads_per_program=2), V.notail),
    mk("fp16pv notail r0 h1", BASE, lambda s: V.fp16pv(V.notail(s))),
    mk("fp16pv notail r168 h1", BASE.replace(max_regs=168), lambda s: V.fp16pv(V.notail(s))),
    mk("bf16v notail r0 h1", BASE, lambda s: bf16vin(V.notail(s)), vkind="bf16"),
    mk("bf16v notail r168 h1", BASE.replace(max_regs=168), lambda s: bf16vin(V.notail(s)), vkind="bf16"),
    mk("bf16v notail r168 h2", BASE.replace(max_regs=168, heads_per_program=2), lambda s: bf16vin(V.notail(s)), vkind="bf16"),
    mk("bf16v notail r128 h1", BASE.replace(max_regs=128), lambda s: bf16vin(V.notail(s)), vkind="bf16"),
    mk("bf16v tail r168 h1", BASE.replace(max_regs=168), bf16vin, vkind="bf16"),
    mk("bf16v notail m128w8 r0", BASE.replace(block_m=128, num_warps=8), lambda s: bf16vin(V.notail(s)), vkind="bf16"),
    mk("bf16v notail m128w8 r128", BASE.replace(block_m=128, num_warps=8, max_regs=128), lambda s: bf16vin(V.notail(s)), vkind="bf16"),
    mk("base notail m128w8 r128", BASE.replace(block_m=128, num_warps=8, max_regs=128), V.notail),
]

_mods = {}
def module_for(var):
    key = var["name"]
    if key in _mods:
        return _mods[key]
    src = var["fn"](codegen.render(var["cfg"]))
    d = tempfile.mkdtemp(prefix="qx")
    path = os.path.join(d, "k.py"); open(path, "w").write(src)
    spec = importlib.util.spec_from_file_location("qx_" + str(abs(hash(key))), path)
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    _mods[key] = m
    return m

def launch(var, mod, q8, k8, v, ints, floats, lut, out):
    cfg = var["cfg"]; b, h, n, d = q8.shape
    bm = cfg.block_m; hpp = cfg.heads_for(b * h)
    mod._qflash_fwd[((n + bm - 1) // bm, b * h // hpp)](
        q8, k8, v, out, ints, ints, floats, lut,
        *q8.stride(), *k8.stride(), *v.stride(), *out.stride(), 0, 0, 0, 0, h,
        N_CTX=n, HEAD_DIM=d, HAS_BIAS=False, OUT_FLOAT=True, V_KEYS=runtime.v_keys(v),
        BLOCK_M=bm, BLOCK_N=cfg.block_n, HPP=hpp, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"maxnreg": cfg.max_regs} if cfg.max_regs else {}))
    return out

def problem(shape, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = ((torch.rand(shape, device="cuda", generator=g) * 8 - 4).half() for _ in range(3))
    sq, sk, sv = (quant.dynamic_scale(t) for t in (q, k, v))
    q8, k8, v8 = quant.quantize(q, sq), quant.quantize(k, sk), quant.quantize(v, sv)
    params = quant.make_params(sq, sk, sv, head_dim=shape[3])
    vsum = v8.int().sum(2).contiguous()  # (B, H, D)
    return dict(q8=q8, k8=k8, v8=v8, km8=quant.key_major(v8), bf16=v8.to(torch.bfloat16), params=params, vsum=vsum, fp=(q, k, v))

def graph_us(fn, reps=20):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return triton.testing.do_bench(lambda: g.replay(), warmup=50, rep=300, return_mode="median") * 1e3 / reps

def warm(i):
    var = VARIANTS[i]
    try:
        mod = module_for(var)
        pr = problem((2, 6, 197, 64))
        out = torch.empty((2, 6, 197, 64), dtype=torch.float16, device="cuda")
        launch(var, mod, pr["q8"], pr["k8"], pr[var["vkind"]], pr["params"].ints, pr["params"].floats, pr["vsum"], out)
        torch.cuda.synchronize()
        return None
    except Exception:
        return traceback.format_exc()[-1500:]

def main():
    os.makedirs(OUT, exist_ok=True)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    t0 = time.time()
    import multiprocessing as mp
    with ProcessPoolExecutor(max_workers=10, mp_context=mp.get_context("spawn")) as ex:
        errs = list(ex.map(warm, range(len(VARIANTS))))
    for v, e in zip(VARIANTS, errs):
        if e: print("WARM FAIL", v["name"], e, flush=True)
    print(f"warm-up {time.time()-t0:.1f}s", flush=True)
    rows = []
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for sname, shape in SHAPES.items():
        pr = problem(shape, seed=hash(sname) % 1000)
        refs = {}
        out = torch.empty(shape, dtype=torch.float16, device="cuda")
        for be in ("CUDNN_ATTENTION", "FLASH_ATTENTION"):
            q, k, v = pr["fp"]
            def sd(q=q, k=k, v=v, be=be):
                with sdpa_kernel([getattr(SDPBackend, be)]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            try:
                us = graph_us(sd)
            except Exception as e:
                us = float("nan")
            rows.append(dict(shape=sname, variant="sdpa_" + be.split("_")[0].lower(), us=us, equal=""))
            print(f"{sname:6s} {rows[-1]['variant']:28s} {us:8.2f} us", flush=True)
        for var in VARIANTS:
            try:
                mod = module_for(var)
                vt = pr[var["vkind"]]
                fn = lambda: launch(var, mod, pr["q8"], pr["k8"], vt, pr["params"].ints, pr["params"].floats, pr["vsum"], out)
                out.fill_(float("nan")); fn(); torch.cuda.synchronize()
                eq = ""
                if var["check"]:
                    pb = var["cfg"].p_bits
                    if pb not in refs:
                        refs[pb] = reference.reference_int8(pr["q8"], pr["k8"], pr["v8"], pr["params"], BASE.replace(p_bits=pb), out_dtype=torch.float16)
                    eq = bool(torch.equal(out.view(torch.int16), refs[pb].view(torch.int16)))
                us = graph_us(fn)
            except Exception:
                us, eq = float("nan"), "ERR " + traceback.format_exc()[-300:].replace("\n", " | ")
            rows.append(dict(shape=sname, variant=var["name"], us=us, equal=eq))
            print(f"{sname:6s} {var['name']:28s} {us:8.2f} us  equal={eq}", flush=True)
        with open(os.path.join(OUT, "explore.csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["shape", "variant", "us", "equal"]); w.writeheader(); w.writerows(rows)
    # summary table: variant x shape
    names = ["sdpa_cudnn", "sdpa_flash"] + [v["name"] for v in VARIANTS]
    print("\n%-28s" % "variant" + "".join("%9s" % s for s in SHAPES))
    for n in names:
        print("%-28s" % n + "".join("%9.2f" % next((r["us"] for r in rows if r["shape"] == s and r["variant"] == n), float("nan")) for s in SHAPES))

if __name__ == "__main__":
    main()


def quant_bench():
    import quantproto as QP
    from qflash_gen import quant_kernels
    rows = []
    for b, h, n, d in [(64, 12, 197, 64), (1, 12, 197, 64), (64, 6, 197, 64), (64 * 64, 3, 49, 32)]:
        qkv = torch.randn(b, n, 3, h, d, device="cuda", dtype=torch.float16) * 3
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        ok = True
        for vb in (False, True):
            for nw in (4, 8):
                try:
                    fn = lambda: QP.quantize_heads(q, k, v, v_bf16=vb, num_warps=nw)
                    outs = fn(); torch.cuda.synchronize()
                    # spot check two heads against torch
                    for (bb, hh) in [(0, 0), (b - 1, h - 1)]:
                        s = quant.dynamic_scale(k[bb, hh]); ok &= torch.equal(outs[1][bb, hh], quant.quantize(k[bb, hh], s))
                    us = graph_us(fn, reps=10)
                except Exception:
                    us = float("nan"); ok = traceback.format_exc()[-300:]
                rows.append((f"quant_heads vbf16={vb} w{nw}", (b, h, n, d), us, ok))
                print(f"quant {b},{h},{n},{d} vbf16={vb} w{nw}: {us:.2f} us ok={ok}", flush=True)
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
        try:
            us = graph_us(lambda: quant_kernels.quantize_qkv(qc, kc, vc, d), reps=10)
        except Exception:
            us = float("nan")
        print(f"quant {b},{h},{n},{d} today's fused (contiguous, per tensor, 2 launches): {us:.2f} us", flush=True)
        us = graph_us(lambda: (q.contiguous(), k.contiguous(), v.contiguous()), reps=10)
        print(f"quant {b},{h},{n},{d} just .contiguous() x3: {us:.2f} us", flush=True)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for be in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
            def sd(be=be):
                with sdpa_kernel([getattr(SDPBackend, be)]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            try:
                us = graph_us(sd, reps=10)
            except Exception:
                us = float("nan")
            print(f"sdpa strided views {b},{h},{n},{d} {be}: {us:.2f} us", flush=True)


if __name__ == "__main__" and os.environ.get("QX_QUANT", "1") == "1":
    quant_bench()
