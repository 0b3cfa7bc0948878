"""Run PASS end to end on the embedded default: the synthetic ImageNet-S-format dataset.

Generates the dataset (reused when already complete), runs every stage with the demo
config (`luss run demo`), prints the ImageNet-S metric table and saves a picture of a few
validation images: image, GT, pseudo label, prediction and mean attention.
"""
import json
import time
from pathlib import Path

import numpy as np

import lusscore
from lusscore.config import apply_overrides, load_config, save_config
from lusscore.data import ImageNetS, read_image, read_label_png
from lusscore.data.synthetic import SynthConfig, generate_dataset
from lusscore.engine import seed_everything, setup_runtime
from lusscore.stages.common import RUN_CONFIG
from lusscore.stages.run import run_pipeline
from lusscore.stages.synth import print_summary
from lusscore.utils import atomic_path


def add_arguments(parser):
    parser.add_argument("--out", default="luss-demo", help="run folder (default: ./luss-demo)")
    parser.add_argument("--seed", type=int, default=0, help="dataset and training seed")
    parser.add_argument("--workers", type=int, default=2, help="parallel dataset writers")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the demo config (repeatable)")


def palette(n: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    colours = rng.integers(40, 255, size=(max(n, 1) + 1, 3)).astype(np.uint8)
    colours[0] = 0
    return colours


def colourise(label: np.ndarray, colours: np.ndarray) -> np.ndarray:
    out = colours[np.clip(label, 0, len(colours) - 1)]
    out[label == 1000] = 255  # ignore in white
    return out


def save_picture(run_dir: Path, dataset: ImageNetS, match: dict, tau: float, path: Path, rows: int = 6):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import torch.nn.functional as F

    samples = dataset.segmentation_samples("validation")
    picks = [samples[i] for i in np.linspace(0, len(samples) - 1, min(rows, len(samples))).astype(int)]
    colours = palette(dataset.num_classes)
    to_gt = np.vectorize(lambda v: match.get(int(v), 0))
    titles = ["image", "ground truth", "pseudo label", "prediction", "mean attention"]
    fig, axes = plt.subplots(len(picks), 5, figsize=(10, 2 * len(picks)), dpi=100, squeeze=False)
    for r, s in enumerate(picks):
        img = np.asarray(read_image(s.image))
        gt = read_label_png(s.label)
        pseudo_path = run_dir / "labels" / "validation" / s.name
        att = np.load(pseudo_path.with_suffix(".npy"))
        att_full = F.interpolate(torch.from_numpy(att)[None, None], size=gt.shape, mode="bilinear",
                                 align_corners=False)[0, 0].numpy()
        pseudo = np.where(att_full < tau, 0, read_label_png(pseudo_path))
        pred = read_label_png(run_dir / "predictions" / "validation" / s.name)
        panels = [img, colourise(gt, colours), colourise(to_gt(pseudo), colours),
                  colourise(to_gt(pred), colours), att_full]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel, cmap="magma" if c == 4 else None, vmin=0 if c == 4 else None,
                      vmax=1 if c == 4 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main(args):
    start = time.time()
    out = Path(args.out)
    print("lusscore", json.dumps(lusscore.build_info()))
    data_root = out / "data"
    summary = generate_dataset(data_root, SynthConfig(seed=args.seed), workers=args.workers)
    print_summary(data_root, summary)
    cfg = apply_overrides(load_config("demo"), [f"data.root={data_root}", f"seed={args.seed}"] + args.set)
    rt = setup_runtime(args.device)
    if rt.is_main:
        save_config(out / RUN_CONFIG, cfg)
    seed_everything(cfg["seed"], rt.rank)
    result = run_pipeline(cfg, out, rt)
    if rt.is_main:
        sweep = json.loads((out / "sweep_tau.json").read_text())
        match = {int(k): int(v) for k, v in result["match"].items()}
        save_picture(out, ImageNetS(data_root), match, sweep["best_tau"], out / "demo.png")
        print(f"pseudo-label mIoU (validation, tau {sweep['best_tau']:.2f}): {sweep['best']['mIoU']:.2f}; "
              f"after fine-tuning: {result['mIoU']:.2f}")
        print(f"demo finished in {(time.time() - start) / 60:.1f} min: metrics {out / 'metrics.json'}, "
              f"picture {out / 'demo.png'}")
