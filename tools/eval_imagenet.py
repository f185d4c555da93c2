"""ImageNet-1k Top-1/Top-5 of timm classifiers, float vs patched with qflash-gen attention.

The paper's accuracy table (ViT-T/S/B, DeiT-T/S/B, Swin-T/S at 224 px).  It needs what this
project's machines do not have: timm's pretrained weights (downloaded from the Hugging Face hub by
``timm.create_model(..., pretrained=True)``, or a local file via ``--checkpoint``) and the ImageNet
validation set in ImageFolder layout (``val/<wnid>/*.JPEG``, 1000 folders, sorted wnids = class
index).  It has only been run here on random weights and a toy folder (it runs; the numbers mean
nothing); no Top-1 number of this project comes from it yet.

    python tools/eval_imagenet.py --data /data/imagenet/val --device cuda \\
        --models vit_tiny_patch16_224,vit_small_patch16_224,vit_base_patch16_224,deit_tiny_patch16_224,\\
deit_small_patch16_224,deit_base_patch16_224,swin_tiny_patch4_window7_224,swin_small_patch4_window7_224 \\
        --dtype float16 --scales dynamic,static

Static scales are calibrated on ``--calib-batches`` batches taken from the front of a shuffled
(seeded) copy of the data, and those images are still part of the evaluation; pass
``--calib-data`` (e.g. a slice of the train set) to calibrate elsewhere.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def _loader(root: str, model, batch: int, workers: int, shuffle_seed: int | None = None, limit: int | None = None):
    import timm.data
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder

    cfg = timm.data.resolve_data_config({}, model=model)
    ds = ImageFolder(root, transform=timm.data.create_transform(**cfg))
    idx = list(range(len(ds)))
    if shuffle_seed is not None:
        g = torch.Generator().manual_seed(shuffle_seed)
        idx = torch.randperm(len(ds), generator=g).tolist()
    if limit:
        idx = idx[:limit]
    return DataLoader(Subset(ds, idx), batch_size=batch, num_workers=workers, pin_memory=True), len(ds.classes)


@torch.no_grad()
def accuracy(model, loader, device, dtype) -> tuple[float, float, int]:
    top1 = top5 = n = 0
    for x, y in loader:
        x, y = x.to(device, dtype, non_blocking=True), y.to(device)
        logits = model(x).float()
        pred = logits.topk(5, dim=1).indices
        top1 += int((pred[:, 0] == y).sum())
        top5 += int((pred == y[:, None]).any(dim=1).sum())
        n += len(y)
    return 100.0 * top1 / max(n, 1), 100.0 * top5 / max(n, 1), n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="ImageNet val in ImageFolder layout")
    p.add_argument("--models", default="deit_small_patch16_224", help="comma list of timm model names")
    p.add_argument("--checkpoint", default=None, help="local weights for a single --models entry (no download)")
    p.add_argument("--no-pretrained", action="store_true", help="random weights (smoke test only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float16")
    p.add_argument("--backend", choices=("triton", "reference"), default="triton")
    p.add_argument("--scales", default="dynamic", help="comma list: dynamic, static")
    p.add_argument("--per-head", action="store_true")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--calib-data", default=None, help="ImageFolder to calibrate on (default: --data, shuffled)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N images only (quick look)")
    args = p.parse_args(argv)

    import os

    if args.device == "cpu" and args.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import timm

    from qflash_gen import models as qm

    dtype = getattr(torch, args.dtype)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.checkpoint and len(names) != 1:
        raise SystemExit("--checkpoint goes with exactly one --models entry")
    rows = []
    for name in names:
        kwargs = {"pretrained": not args.no_pretrained}
        if args.checkpoint:
            kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": args.checkpoint}}
        model = timm.create_model(name, **kwargs).eval().to(args.device, dtype)
        loader, n_classes = _loader(args.data, model, args.batch, args.workers, limit=args.limit)
        if n_classes != model.num_classes:
            print(f"warning: {args.data} has {n_classes} classes, {name} predicts {model.num_classes}")
        t = time.time()
        base = accuracy(model, loader, args.device, dtype)
        rows.append((name, "float (unpatched)", *base, time.time() - t))
        print(f"{name:40s} float       top1 {base[0]:6.2f}  top5 {base[1]:6.2f}  ({base[2]} images)", flush=True)
        for scales in [s.strip() for s in args.scales.split(",")]:
            patched = copy.deepcopy(model)
            report = qm.patch_model(patched, backend=args.backend)
            print(report)
            if scales == "static":
                calib_loader, _ = _loader(args.calib_data or args.data, model, args.batch, args.workers, shuffle_seed=0)
                batches = []
                for i, (x, _) in enumerate(calib_loader):
                    if i >= args.calib_batches:
                        break
                    batches.append(x.to(args.device, dtype))
                qm.calibrate(patched, batches, per_head=args.per_head)
            elif scales != "dynamic":
                raise SystemExit(f"--scales: {scales!r} is not dynamic or static")
            t = time.time()
            acc = accuracy(patched, loader, args.device, dtype)
            label = f"qflash {scales}{' per-head' if args.per_head else ''}"
            rows.append((name, label, *acc, time.time() - t))
            print(
                f"{name:40s} {label:11s} top1 {acc[0]:6.2f}  top5 {acc[1]:6.2f}  (delta top1 {acc[0] - base[0]:+.2f})",
                flush=True,
            )
    print("\n| model | attention | top-1 | top-5 | images | seconds |\n|---|---|---|---|---|---|")
    for name, label, t1, t5, n, sec in rows:
        print(f"| {name} | {label} | {t1:.2f} | {t5:.2f} | {n} | {sec:.0f} |")


if __name__ == "__main__":
    main()
