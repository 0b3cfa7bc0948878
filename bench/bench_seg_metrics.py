"""Benchmark: per-image ImageNet-S metric time (seg_metrics_update_) and the matching.

Cases: 375x500 maps at C = 919 with 2 and 30 labels per map. Peers:
- reference: lusscore.reference.seg_metrics (per-label erosions as max-pools + histograms);
- official: the official approach (per-label cv2.erode band maps of pred and GT, then the
  histc histograms and the size-bucket function), when OpenCV is importable;
  EVALUATION.md measured the official evaluator at ~30 ms per image on one CPU core.
Matching: co-occurrence + Munkres at C = 50, 300, 919 (N = 752, 4097, 12419 images).
torch.compile of the reference is not timed: it is a Python loop over labels with
data-dependent shapes (torch.unique), which compiles to graph breaks, not to one kernel.
"""
from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.common import parser, time_fn, write_results  # noqa: E402
from lusscore.ops.seg_metrics import new_accumulators, seg_metrics_update_  # noqa: E402
from lusscore.reference import seg_metrics as ref  # noqa: E402
from python_tests.samples import segmentation_pair  # noqa: E402


def official_step(pred: np.ndarray, gt: np.ndarray, num_classes: int, cv2) -> None:
    """The official per-image work: band maps per label with cv2.erode, masking, histc of
    region and boundary, and the size-bucket histograms (as in evaluation/ of ImageNet-S)."""
    h, w = gt.shape
    d = max(1, round(0.03 * math.sqrt(h * h + w * w)))
    kernel = np.ones((3, 3), dtype=np.uint8)

    def band_map(label):
        out = np.zeros_like(label)
        for u in np.unique(label):
            mask = (label == u).astype(np.uint8)
            padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
            eroded = cv2.erode(padded, kernel, iterations=d)[1:h + 1, 1:w + 1]
            out[(mask - eroded) > 0] = u + 1
        return out

    bp, bg = band_map(pred), band_map(gt)
    valid = gt != 1000
    p, g = torch.from_numpy(pred[valid]).float(), torch.from_numpy(gt[valid]).float()
    tp_, tg_ = torch.from_numpy(bp[valid]).float(), torch.from_numpy(bg[valid]).float()
    k = num_classes + 1

    def iou(o, t, bins):
        inter = o[o == t]
        return (torch.histc(inter, bins=bins, min=0, max=bins - 1),
                torch.histc(o, bins=bins, min=0, max=bins - 1),
                torch.histc(t, bins=bins, min=0, max=bins - 1))

    iou(p, g, k)
    iou(tp_, tg_, k + 1)
    for o, t, bins in ((p, g, k), (tp_, g, k + 1)):  # size buckets, region and boundary
        counts = torch.bincount(g.long())
        total = counts.sum()
        buckets = [[], [], [], []]
        for c in torch.unique(g):
            if c == 0:
                continue
            s = math.ceil(100.0 * counts[int(c)] / total)
            buckets[0 if s <= 5 else 1 if s <= 25 else 2 if s <= 50 else 3].append(int(c))
        bg_sel = g == 0
        for classes in buckets:
            if classes:
                sel = bg_sel | torch.isin(g, torch.tensor(classes, dtype=g.dtype))
                iou(o[sel], (t if bins == k else tg_)[sel], bins)


def bench_image_metrics(device, quick: bool):
    h, w = (60, 80) if quick else (375, 500)
    num_classes = 50 if quick else 919
    try:
        import cv2
    except ImportError:
        cv2 = None
    results = []
    for labels in (2, 30):
        pred, gt = segmentation_pair(h, w, labels, num_classes=num_classes, seed=labels)
        acc = new_accumulators(num_classes, device=device)
        pd, gd = pred.int().to(device), gt.int().to(device)  # int32, as luss evaluate decodes
        case = f"{h}x{w} C={num_classes} labels={labels}"
        t = time_fn(lambda: seg_metrics_update_(pd, gd, num_classes, **acc), device)
        results.append({"case": case, "impl": "lusscore", "per_image_s": t["median_s"], **t})
        if device.type == "cpu":
            t = time_fn(lambda: ref.seg_metrics_update(pred, gt, num_classes, num_classes + 1),
                        device, warmup=1, repeat=3, min_time=0)
        else:
            t = time_fn(lambda: (ref.band_map(pd), ref.band_map(gd)), device, warmup=1,
                        repeat=3, min_time=0)
            t["note"] = "band maps only (per-label max-pool erosions on the GPU)"
        results.append({"case": case, "impl": "reference", "per_image_s": t["median_s"], **t})
        if cv2 is not None:
            pn, gn = pred.numpy().astype(np.int64), gt.numpy().astype(np.int64)
            t = time_fn(lambda: official_step(pn, gn, num_classes, cv2), "cpu", warmup=1,
                        repeat=5, min_time=0)
            results.append({"case": case, "impl": "official (cv2, CPU)",
                            "per_image_s": t["median_s"], **t})
    return results


def bench_matching(quick: bool):
    from lusscore.matching import cooccurrence_from_pairs, hungarian_match
    rng = np.random.default_rng(0)
    out = []
    for c, n in ((50, 752), (300, 4097), (919, 12419)):
        if quick and c > 50:
            break
        perm = rng.permutation(c) + 1
        pi, pid, gi, gid = [], [], [], []
        for i in range(n):
            g = rng.choice(c, size=int(rng.integers(1, 4)), replace=False) + 1
            p = perm[g - 1]
            if rng.random() < 0.3:
                p = np.concatenate([p, rng.choice(c, 2) + 1])
            gi.append(np.full(g.size, i)), gid.append(g), pi.append(np.full(p.size, i)), pid.append(p)
        arrays = [np.concatenate(x) for x in (pi, pid, gi, gid)]
        t0 = time.perf_counter()
        cooc = cooccurrence_from_pairs(*arrays, n, c)
        t1 = time.perf_counter()
        hungarian_match(cooc, n)
        t2 = time.perf_counter()
        out.append({"case": f"matching C={c} N={n}", "impl": "lusscore",
                    "cooccurrence_s": t1 - t0, "munkres_s": t2 - t1, "median_s": t2 - t0})
        if c == 919:  # the hard case for Munkres: random predictions, many ties
            rand = [np.repeat(np.arange(n), 3), rng.integers(1, c + 1, 3 * n), arrays[2],
                    arrays[3]]
            t0 = time.perf_counter()
            hungarian_match(cooccurrence_from_pairs(*rand, n, c), n)
            out.append({"case": f"matching C={c} N={n} random predictions", "impl": "lusscore",
                        "median_s": time.perf_counter() - t0})
    return out


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the goal is per core)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = bench_image_metrics(device, args.quick) + bench_matching(args.quick)
    write_results(args.json, "seg_metrics", device, results,
                  official_measured_cpu_s_per_image=0.030)


if __name__ == "__main__":
    main()
