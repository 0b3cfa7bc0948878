"""Trivial "no learning" floors of a labelled split, scored like any prediction.

Three floors, each written as label PNGs and scored by `lusscore.stages.evaluate.evaluate`
(Hungarian matching by default, as in the unsupervised protocol):

- colour_kmeans: K + 1 k-means clusters of per-pixel RGB (fit on a seeded subsample of the
  split's pixels); every pixel gets its nearest cluster; the cluster most frequent on the
  images' border pixels (one-pixel frame, over the whole split) becomes 0 ('other'), the
  others are numbered 1..K in centroid order.
- centre_disc: the pixels whose centres lie within 0.3 x the shorter side of the image
  centre get one id per image (drawn in 1..K from the seed), everything else 0.
- all_other: every pixel 0.

`compute_baselines` returns a plain JSON-able dict::

    {"split": ..., "match": ..., "num_classes": K, "num_images": N, "seed": ...,
     "floors": {"colour_kmeans": {"mIoU", "mBIoU", "Acc", "FMeasure"}, "centre_disc": {...},
                "all_other": {...}}}
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from lusscore.utils import LusscoreError, atomic_write_text

FLOORS = ("colour_kmeans", "centre_disc", "all_other")
FLOOR_KEYS = ("mIoU", "mBIoU", "Acc", "FMeasure")
MATCHES = ("hungarian", "none")
DISC_RADIUS = 0.3
MAX_FIT_PIXELS = 200_000
KMEANS_ITERS = 20
MAX_LISTED = 10


def centre_disc_mask(h: int, w: int, radius: float = DISC_RADIUS) -> np.ndarray:
    """(H, W) bool: pixel (y, x) is in the disc iff its centre (y + 0.5, x + 0.5) lies within
    radius * min(H, W) of the image centre (H / 2, W / 2)."""
    y = np.arange(h) + 0.5 - h / 2
    x = np.arange(w) + 0.5 - w / 2
    r = radius * min(h, w)
    return y[:, None] ** 2 + x[None, :] ** 2 <= r * r


def border_pixels(rgb: np.ndarray) -> np.ndarray:
    """(M, 3) the pixels of the one-pixel frame of an (H, W, 3) image, each pixel once."""
    h, w = rgb.shape[:2]
    if h <= 2 or w <= 2:
        return rgb.reshape(-1, 3)
    return np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])


def _read_rgb(path) -> np.ndarray:
    from lusscore.data.label_io import read_image
    return np.array(read_image(path), dtype=np.uint8)  # writable: torch.from_numpy shares it


def _samples(dataset, split: str):
    """The split's image/label pairs and its GT folder, with every problem said in words."""
    if not dataset.has_labels(split):  # e.g. the benchmark's test split: its GT stays on the server
        raise LusscoreError(f"{dataset.root}: split {split!r} has no ground truth to score "
                            f"against (no label PNGs for it under {dataset.root})")
    samples = dataset.segmentation_samples(split)
    if not samples:
        raise LusscoreError(f"{dataset.root}: split {split!r} lists no images")
    gt_dir = dataset.labels_dir(split)
    missing = [x.name for x in samples if not x.label.is_file()]
    if missing:
        raise LusscoreError(f"split {split!r}: {len(missing)} GT label file(s) missing under "
                            f"{gt_dir}: " + ", ".join(missing[:MAX_LISTED])
                            + (" ..." if len(missing) > MAX_LISTED else ""))
    missing = [str(x.image) for x in samples if not x.image.is_file()]
    if missing:
        raise LusscoreError(f"split {split!r}: {len(missing)} image(s) missing: "
                            + ", ".join(missing[:MAX_LISTED])
                            + (" ..." if len(missing) > MAX_LISTED else ""))
    return samples, gt_dir


def _fit_colours(samples, num_clusters: int, seed: int, max_pixels: int, device: str,
                 quiet: bool):
    """Fit the colour k-means on a seeded pixel subsample; return it and the border-cluster id."""
    import torch
    from lusscore.utils import progress_bar

    from lusscore.cluster import KMeans
    from lusscore.data.imagenet_s import check_same_size

    rng = np.random.default_rng([seed, 0])
    per_image = max(1, math.ceil(max_pixels / len(samples)))
    fit, border = [], []
    for s in progress_bar(samples, desc="baselines: sample colours", unit="img", disable=quiet):
        check_same_size(s.label, s.image)
        rgb = _read_rgb(s.image)
        pixels = rgb.reshape(-1, 3)
        take = min(per_image, len(pixels))
        fit.append(pixels[rng.choice(len(pixels), size=take, replace=False)])
        border.append(border_pixels(rgb))
    fit = torch.from_numpy(np.concatenate(fit)).float() / 255
    if len(fit) < num_clusters:
        raise LusscoreError(f"colour k-means needs at least {num_clusters} pixels, the split has "
                            f"{len(fit)}")
    # k-means++ seeding: flat colours are picked once each, not twice by chance.
    km = KMeans(num_clusters, niter=KMEANS_ITERS, seed=seed, init="kmeans++", device=device,
                progress=not quiet).fit(fit)
    border_ids = km.predict(torch.from_numpy(np.concatenate(border)).float() / 255)
    counts = torch.bincount(border_ids.cpu(), minlength=num_clusters)
    return km, int(counts.argmax())


def _write_predictions(samples, work: Path, km, other: int, num_classes: int, seed: int,
                       quiet: bool) -> None:
    """Every floor's label PNG of every image, under work/<floor>/<label name>."""
    import torch
    from lusscore.utils import progress_bar

    from lusscore.data.label_io import write_label_png

    # Cluster `other` -> 0, the others -> 1..K in centroid order.
    lut = np.zeros(num_classes + 1, dtype=np.int64)
    lut[[c for c in range(num_classes + 1) if c != other]] = np.arange(1, num_classes + 1)
    disc_ids = np.random.default_rng([seed, 1]).integers(1, num_classes + 1, size=len(samples))
    for s, disc_id in progress_bar(list(zip(samples, disc_ids)), desc="baselines: write floors",
                                   unit="img", disable=quiet):
        rgb = _read_rgb(s.image)
        h, w = rgb.shape[:2]
        ids = km.predict(torch.from_numpy(rgb.reshape(-1, 3)).float() / 255).cpu().numpy()
        write_label_png(work / "colour_kmeans" / s.name, lut[ids].reshape(h, w))
        write_label_png(work / "centre_disc" / s.name,
                        np.where(centre_disc_mask(h, w), int(disc_id), 0))
        write_label_png(work / "all_other" / s.name, np.zeros((h, w), dtype=np.int64))


def _number(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def compute_baselines(dataset, split: str = "validation", seed: int = 0,
                      match: str = "hungarian", device: str = "cpu", workers: int = 0,
                      work_dir: str | os.PathLike | None = None, quiet: bool = True,
                      max_pixels: int = MAX_FIT_PIXELS) -> dict:
    """Score the three floors on a labelled split of an `ImageNetS` dataset.

    match: "hungarian" (the unsupervised protocol) or "none". work_dir: keep the prediction
    PNGs there (work_dir/<floor>/...) instead of in a temporary folder. workers: PNG
    decoding processes of the evaluator. max_pixels: pixels the colour k-means is fit on.
    """
    from lusscore.stages.evaluate import evaluate

    if match not in MATCHES:
        raise LusscoreError(f"match must be one of {MATCHES}, got {match!r}")
    if max_pixels < 1:
        raise LusscoreError(f"max_pixels must be >= 1, got {max_pixels}")
    k = dataset.num_classes
    samples, gt_dir = _samples(dataset, split)
    km, other = _fit_colours(samples, k + 1, seed, max_pixels, device, quiet)
    with tempfile.TemporaryDirectory(prefix="luss-baselines-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        _write_predictions(samples, work, km, other, k, seed, quiet)
        names = work / "names.txt"
        atomic_write_text(names, "".join(f"{s.name}\n" for s in samples))
        floors = {}
        for floor in FLOORS:
            result = evaluate(gt_dir, work / floor, k, names=names, match=match, device=device,
                              workers=workers, quiet=quiet)
            floors[floor] = {key: _number(result[key]) for key in FLOOR_KEYS}
    return {"split": split, "match": match, "num_classes": k, "num_images": len(samples),
            "seed": seed, "floors": floors}


def write_baselines(path: str | os.PathLike, result: dict) -> None:
    """Write compute_baselines' result as JSON, atomically."""
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")


def read_baselines(path: str | os.PathLike) -> dict:
    """A baselines.json, checked: a clear error when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"baselines file not found: {path}")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LusscoreError(f"{path}: not valid JSON ({e})") from None
    floors = result.get("floors") if isinstance(result, dict) else None
    if not isinstance(floors, dict) or not all(isinstance(m, dict) and "mIoU" in m
                                               for m in floors.values()):
        raise LusscoreError(f"{path}: no floors with an mIoU; not a file of `luss baselines`")
    return result


def format_floors(baselines: dict, width: int = 20, header: bool = True) -> str:
    """One `floor <name>` row per floor, in the columns of stages/evaluate.py's format_protocols
    (protocol, mIoU, mBIoU, Acc, F, match); `width` is the first column's."""
    def fmt(v):
        return "nan" if v is None else f"{v:.2f}"

    lines = [f"{'protocol':<{width}} {'mIoU':>7} {'mBIoU':>7} {'Acc':>7} {'F':>7}  match"] \
        if header else []
    for name, m in baselines["floors"].items():
        lines.append(f"{'floor ' + name:<{width}} {fmt(m['mIoU']):>7} {fmt(m['mBIoU']):>7} "
                     f"{fmt(m['Acc']):>7} {fmt(m['FMeasure']):>7}  {baselines['match']}")
    return "\n".join(lines)
