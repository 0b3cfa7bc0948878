"""Label-generation throughput (images/s), end to end: JPEG decode + resize, backbone,
pixel attention, cosine argmax to the centroids, upsampling, 'other' mask and PNG writing.

Writes N random JPEGs (ImageNet-like sizes) to a temporary folder and labels them with a
randomly initialised ResNet + PixelAttention and random centroids (the speed does not depend
on the weights). Default: ResNet-50, resize 256, K = 919, the GPU.

    python bench/bench_label.py [--device cuda] [--arch resnet50] [--images 512] [--quick] [--json OUT]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from lusscore.models import PixelAttention  # noqa: E402
from lusscore.models.backbone import resnet_backbone  # noqa: E402
from lusscore.stages import label as label_stage  # noqa: E402

# The most common ImageNet sizes (H, W): most images are 375x500 or 500x375 or 333x500.
SIZES = [(375, 500), (375, 500), (375, 500), (500, 375), (333, 500), (500, 500)]


def write_images(folder: Path, n: int, sizes) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        p = folder / "train" / f"n{i % 10:08d}" / f"img_{i:06d}.JPEG"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(p, quality=90)
        paths.append(p)
    return paths


def main():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--classes", type=int, default=919)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--writers", type=int, default=8)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--quick", action="store_true", help="ResNet-18, 8 small images")
    args = p.parse_args()
    if args.quick:
        args.arch, args.images, args.classes, args.resize = "resnet18", 8, 10, 64
        args.batch_size, args.workers, args.writers = 4, 0, 2
    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = resnet_backbone(args.arch)
    attention = PixelAttention(backbone.out_channels)
    centroids = torch.randn(args.classes, backbone.out_channels)
    sizes = [(s[0] // 4, s[1] // 4) for s in SIZES] if args.quick else SIZES
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_images(root, args.images, sizes)
        warm = label_stage.plan_items(paths[: args.batch_size], root / "train", root / "warm", False)
        label_stage.label_images(backbone, attention, centroids, warm, 0.4, device=device,
                                 batch_size=args.batch_size, resize=args.resize, workers=0,
                                 writers=args.writers, amp=args.amp, progress=False)
        items = label_stage.plan_items(paths, root / "train", root / "labels", False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats = label_stage.label_images(backbone, attention, centroids, items, 0.4, device=device,
                                         batch_size=args.batch_size, resize=args.resize,
                                         workers=args.workers, writers=args.writers, amp=args.amp,
                                         progress=False)
    result = {"case": f"{args.arch} resize {args.resize} K={args.classes} "
                      f"batch {args.batch_size}{' amp' if args.amp else ''}",
              "impl": "lusscore", "images": stats["labelled"], "seconds": stats["seconds"],
              "images_per_s": stats["images_per_s"]}
    common.write_results(args.json, "label", device, [result])


if __name__ == "__main__":
    main()
