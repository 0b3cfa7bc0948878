"""Choose tau on validation: evaluate the pseudo labels for tau from MIN to MAX by STEP.

Reads <run>/labels/validation (labels written without a tau, with their mean-attention
.npy) and the GT once; each tau zeroes the pixels whose mean attention (upsampled to the
image) is below it and gets its own Hungarian matching. Prints the table, saves
<run>/sweep_tau.json and sweep_tau.png (mIoU and F-measure vs tau) and writes the best tau
into the run's config.yaml (label.tau).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lusscore.config import save_config
from lusscore.data.label_io import read_label_png
from lusscore.metrics import ThresholdSweep
from lusscore.ops.switch import ops_from_config
from lusscore.stages.common import RUN_CONFIG, add_run_arguments, dataset_of, start_run
from lusscore.utils import LusscoreError, atomic_path, atomic_write_text


def thresholds(lo: float, hi: float, step: float) -> list[float]:
    if step <= 0 or hi < lo:
        raise LusscoreError(f"the tau sweep needs MIN <= MAX and STEP > 0, got {lo}, {hi}, {step}")
    n = int(np.floor((hi - lo) / step + 1e-9)) + 1
    return [round(lo + i * step, 10) for i in range(n)]


def sweep(samples, labels_dir: Path, num_classes: int, taus: list[float], progress=True) -> dict:
    acc = ThresholdSweep(num_classes, taus)
    for s in tqdm(samples, desc="sweep-tau", unit="img", disable=not progress):
        label_path = labels_dir / s.name
        gt = read_label_png(s.label)
        pred = read_label_png(label_path, expected_size=gt.shape)
        npy = label_path.with_suffix(".npy")
        if not npy.is_file():
            raise FileNotFoundError(f"mean-attention map not found: {npy} (label validation with "
                                    "--save-attention)")
        att = torch.from_numpy(np.load(npy))[None, None].float()
        conf = F.interpolate(att, size=gt.shape, mode="bilinear", align_corners=False)[0, 0]
        acc.update(pred, gt, conf, names=[s.name])
    return acc.compute("hungarian")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    taus = result["thresholds"]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(taus, [r["mIoU"] for r in result["results"]], "o-", label="mIoU")
    ax.plot(taus, [r["FMeasure"] for r in result["results"]], "s--", label="F-measure")
    ax.axvline(result["best_threshold"], color="gray", lw=0.8)
    ax.set_xlabel("tau (mean attention threshold)")
    ax.set_ylabel("%")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


@ops_from_config
def run_sweep(cfg: dict, run_dir: Path, progress=True) -> dict:
    lo, hi, step = cfg["label"]["sweep"]
    taus = thresholds(lo, hi, step)
    ds = dataset_of(cfg)
    result = sweep(ds.segmentation_samples("validation"), run_dir / "labels" / "validation",
                   ds.num_classes, taus, progress)
    table = [{"tau": t, "mIoU": r["mIoU"], "FMeasure": r["FMeasure"]}
             for t, r in zip(result["thresholds"], result["results"])]
    summary = {"best_tau": result["best_threshold"], "best": {k: result["best"][k] for k in
               ("mIoU", "mBIoU", "Acc", "FMeasure")}, "table": table}
    atomic_write_text(run_dir / "sweep_tau.json", json.dumps(summary, indent=1))
    plot(result, run_dir / "sweep_tau.png")
    cfg["label"]["tau"] = result["best_threshold"]
    save_config(run_dir / RUN_CONFIG, cfg)
    return summary


def format_sweep(summary: dict) -> str:
    rows = [f"{'tau':>6} {'mIoU':>7} {'F':>7}"]
    rows += [f"{r['tau']:6.3f} {r['mIoU']:7.2f} {r['FMeasure']:7.2f}" for r in summary["table"]]
    rows.append(f"best tau {summary['best_tau']:.3f}: pseudo-label mIoU {summary['best']['mIoU']:.2f}")
    return "\n".join(rows)


def add_arguments(parser):
    add_run_arguments(parser)
    parser.add_argument("--range", nargs=3, type=float, metavar=("MIN", "MAX", "STEP"),
                        help="the taus to try (default: the config's label.sweep)")


def main(args):
    cfg, run_dir, rt = start_run(args)
    if args.range is not None:
        cfg["label"]["sweep"] = list(args.range)
    if rt.is_main:
        print(format_sweep(run_sweep(cfg, run_dir)))
