"""Shape-prior saliency maps of a split, and their score against GT foreground.

    luss saliency --data ROOT --split train --method rc --out DIR [--workers N]
    luss saliency --data ROOT --split validation --method rc --out DIR --evaluate
    luss saliency --data ROOT --split validation --out DIR --evaluate   (score existing maps)

--method rc: region-contrast saliency, no learning (lusscore.saliency.RegionContrast);
gt_foreground: an upper bound for experiments, the split's GT foreground blurred and
thresholded (needs <split>-segmentation, which the synthetic sets have for train too).
Writes DIR/<split>/<wnid>/<name>.png (8-bit grayscale, the image's size), the folder layout
label.prior maps reads; resumable (valid maps are skipped, each file is written to a
temporary name and renamed) and spread over --workers processes.

--evaluate scores DIR/<split> against the split's GT foreground: F-beta (beta^2 = 0.3) of the
map thresholded at --threshold, and MAE, per image and averaged; written to
DIR/<split>/saliency_score.json. With label.prior rc, `luss run` computes the maps of each
split it labels into <run>/saliency and scores validation's into <run>/saliency_score.json.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lusscore.data import ImageNetS
from lusscore.data.label_io import image_size, read_image, read_label_png
from lusscore.saliency import (PRIORS, RegionContrast, foreground_prior, read_saliency_png,
                               saliency_valid, score_saliency, write_saliency_png)
from lusscore.utils import LusscoreError, atomic_write_text, progress_bar, remove_temp_files

METHODS = ("rc", "gt_foreground")
SCORE_FILE = "saliency_score.json"


def gt_folder(dataset: ImageNetS, split: str) -> Path:
    """<root>/<split>-segmentation (train's too: the synthetic sets have it)."""
    return dataset.root / f"{split}-segmentation"


def prior_paths(dataset: ImageNetS, split: str, folder: str | os.PathLike, images) -> list[Path]:
    """The map of each image of a split in a saliency folder: its path relative to the split
    folder with a .png suffix (as the label stage names its PNGs), under folder/<split>."""
    root = dataset.split_dir(split)
    return [Path(folder) / split / Path(p).relative_to(root).with_suffix(".png") for p in images]


def split_maps(dataset: ImageNetS, split: str, folder: Path) -> list[tuple[Path, Path]]:
    """(image, its map in folder) for every image of a split."""
    if split == "train":
        images = [p for p, _ in dataset.image_samples("train")]
    else:
        images = [s.image for s in dataset.split_images(split)]
    return list(zip(images, prior_paths(dataset, split, folder, images)))


def _compute_one(task) -> bool:
    """One map (in a worker process): True when written, False when a valid one existed."""
    image, out, method, settings, gt = task
    hw = image_size(image)
    if saliency_valid(out, hw):
        return False
    if method == "rc":
        saliency = RegionContrast(**settings)(np.asarray(read_image(image)))
    else:
        saliency = foreground_prior(read_label_png(gt, expected_size=hw), **settings)
    write_saliency_png(out, saliency)
    return True


def compute_saliency(dataset: ImageNetS, split: str, out: str | os.PathLike, method: str = "rc",
                     settings: dict | None = None, workers: int = 2, progress: bool = True) -> dict:
    """Write every missing map of a split into out/<split>; -> {'computed', 'skipped', 'seconds'}.

    settings: RegionContrast's fields (rc) or foreground_prior's blur and threshold."""
    if method not in METHODS:
        raise LusscoreError(f"saliency method must be one of {METHODS}, got {method!r}")
    settings = dict(settings or {})
    if method == "rc":
        RegionContrast(**settings)  # bad settings fail here, not in a worker
    pairs = split_maps(dataset, split, Path(out))
    gt = gt_folder(dataset, split)
    if method == "gt_foreground" and not gt.is_dir():
        raise LusscoreError(f"--method gt_foreground needs the split's GT folder {gt}")
    remove_temp_files(Path(out) / split)  # what a killed run left half-written
    tasks = [(image, path, method, settings,
              gt / path.relative_to(Path(out) / split) if method == "gt_foreground" else None)
             for image, path in pairs]
    start, computed = time.perf_counter(), 0
    bar = progress_bar(total=len(tasks), desc=f"saliency {split}", unit="img", disable=not progress)
    try:
        if workers > 0:
            with ProcessPoolExecutor(workers) as pool:
                for written in pool.map(_compute_one, tasks, chunksize=16):
                    computed += written
                    bar.update(1)
        else:
            for task in tasks:
                computed += _compute_one(task)
                bar.update(1)
    finally:
        bar.close()
    return {"computed": computed, "skipped": len(tasks) - computed,
            "seconds": time.perf_counter() - start}


def evaluate_saliency(dataset: ImageNetS, split: str, folder: str | os.PathLike,
                      threshold: float = 0.5) -> dict:
    """F-beta and MAE of folder/<split>'s maps against the split's GT foreground."""
    if not dataset.has_labels(split):
        raise LusscoreError(f"{dataset.root}: {split} has no GT labels to score saliency against")
    f_scores, maes = [], []
    for sample in dataset.segmentation_samples(split):
        label = read_label_png(sample.label)
        saliency = read_saliency_png(prior_paths(dataset, split, folder, [sample.image])[0],
                                     label.shape)
        f, mae = score_saliency(saliency, label, threshold)
        f_scores.append(f)
        maes.append(mae)
    return {"split": split, "threshold": threshold, "images": len(f_scores),
            "F_beta": 100.0 * float(np.mean(f_scores)), "MAE": float(np.mean(maes))}


def format_score(score: dict) -> str:
    return (f"saliency on {score['split']} ({score['images']} images): F-beta "
            f"{score['F_beta']:.2f} at threshold {score['threshold']:.2f}, MAE {score['MAE']:.4f}")


# --- the prior inside a run (label.prior) ---------------------------------------------------

def prior_settings(cfg: dict) -> dict:
    """The run's prior, checked: {'prior', 'maps', 'mask', 'attention_weight'}."""
    lcfg = cfg["label"]
    prior = lcfg["prior"]
    if prior not in PRIORS:
        raise LusscoreError(f"label.prior must be one of {PRIORS}, got {prior!r}")
    if prior == "maps" and not lcfg["prior_maps"]:
        raise LusscoreError("label.prior maps needs label.prior_maps: a folder of "
                            "<split>/<wnid>/<name>.png saliency maps")
    weight = float(cfg["attention"]["prior_weight"])
    if weight < 0:
        raise LusscoreError(f"attention.prior_weight must be >= 0, got {weight}")
    return {"prior": prior, "maps": lcfg["prior_maps"], "mask": bool(lcfg["prior_mask"]),
            "attention_weight": weight}


def run_prior_folder(ctx, split: str) -> Path | None:
    """The folder whose <split>/ holds the run's prior maps (None without a prior): the user's
    label.prior_maps (a relative path is taken from the dataset root), or for rc
    <run>/saliency, computed here where maps are missing (and recomputed from scratch when
    the saliency settings changed); validation's maps are scored once they are made."""
    prior = prior_settings(ctx.cfg)
    if prior["prior"] == "none":
        return None
    if prior["prior"] == "maps":
        folder = Path(prior["maps"])
        if not folder.is_absolute():  # maps kept with the dataset: relative to its root
            folder = ctx.dataset.root / folder
        if not (folder / split).is_dir():
            raise LusscoreError(f"label.prior_maps: {folder / split} not found (the prior maps "
                                f"of the {split} split)")
        return folder
    folder = ctx.run.saliency_dir
    options = dict(ctx.cfg["saliency"])
    workers = int(options.pop("workers"))
    settings = asdict(RegionContrast(**options))
    if ctx.rt.is_main:
        recorded = ctx.run.saliency_settings
        if recorded.is_file() and json.loads(recorded.read_text()) != settings:
            shutil.rmtree(folder)
            ctx.log("saliency settings changed: recomputing the region-contrast maps")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(recorded, json.dumps(settings, indent=1))
        stats = compute_saliency(ctx.dataset, split, folder, "rc", settings, workers=workers)
        if stats["computed"]:
            ctx.log(f"saliency {split}: {stats['computed']} region-contrast maps in "
                    f"{stats['seconds']:.0f} s")
        scored = ctx.run.saliency_score.is_file() and not stats["computed"]
        if split == "validation" and ctx.dataset.has_labels("validation") and not scored:
            score = evaluate_saliency(ctx.dataset, "validation", folder)
            atomic_write_text(ctx.run.saliency_score, json.dumps(score, indent=1))
            ctx.log(format_score(score))
    ctx.rt.barrier()
    return folder


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="dataset root in the ImageNet-S layout")
    parser.add_argument("--split", default="train",
                        choices=["train", "train-semi", "validation", "test"])
    parser.add_argument("--method", choices=METHODS, default=None,
                        help="compute maps: rc (region contrast) | gt_foreground (an upper bound "
                             "from GT); without it, --evaluate scores the maps already in --out")
    parser.add_argument("--out", required=True, help="saliency folder (maps in OUT/<split>/)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes computing maps (0: in this process)")
    parser.add_argument("--evaluate", action="store_true",
                        help="score OUT/<split> against the split's GT foreground (F-beta, MAE)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="the saliency threshold of F-beta (0.5)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="pick the packaged category list (when the root has none)")


def main(args):
    if args.method is None and not args.evaluate:
        raise LusscoreError("give --method to compute maps, --evaluate to score them, or both")
    dataset = ImageNetS(args.data, num_classes=args.num_classes)
    if args.method is not None:
        stats = compute_saliency(dataset, args.split, args.out, args.method,
                                 workers=args.workers, progress=not args.quiet)
        print(f"luss saliency: {stats['computed']} maps written, {stats['skipped']} already "
              f"done, {stats['seconds']:.1f} s -> {Path(args.out) / args.split}")
    if args.evaluate:
        score = evaluate_saliency(dataset, args.split, args.out, args.threshold)
        atomic_write_text(Path(args.out) / args.split / SCORE_FILE, json.dumps(score, indent=1))
        print(format_score(score))
