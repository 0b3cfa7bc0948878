"""Cross-subset evaluation (the paper's Tab 6): a run trained on one ImageNet-S subset (e.g.
S919) scored on another one's split (S50, S300).

    luss cross-eval --run-dir RUN --data S50_ROOT [--split validation] [--protocol P]

The run's model predicts the other subset's images into <run>/cross/<subset>/<protocol>/<split>
(resumable). Fully unsupervised: the Hungarian match pairs each of the subset's C classes with
one of the run's predicted ids over the subset's images (the official image-level
co-occurrence cost, K ids x C classes), and every id left unpaired counts as 'other'. Semi and
distance matching predict the run's class ids: each is mapped to the subset's class of the
same wnid, ids of classes the subset lacks to 'other'. Writes metrics.json and match.json
beside the predictions.
"""
from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

from lusscore.data import ImageNetS, read_label_png
from lusscore.matching import cooccurrence, cost_matrix, save_match
from lusscore.stages.common import PROTOCOLS, start_run
from lusscore.stages.evaluate import evaluate, format_table, json_ready
from lusscore.utils import LusscoreError, atomic_write_text


def wnid_match(run_wnids: list[str], subset: ImageNetS) -> dict[int, int]:
    """{run class id: subset class id, or 0 where the subset lacks the wnid}."""
    ids = {w: i + 1 for i, w in enumerate(subset.wnids)}
    match = {i + 1: ids.get(w, 0) for i, w in enumerate(run_wnids)}
    match[0] = 0
    return match


def rectangular_hungarian(pred_dir: Path, samples, num_pred: int, num_classes: int) -> dict[int, int]:
    """{pred id: subset class}: Munkres over the K x C image-level co-occurrence cost; the ids
    no class is paired with map to 0 ('other')."""
    from lusscore.ops import munkres_assign
    pred_present, gt_present = [], []
    for s in samples:
        pred_present.append(np.unique(read_label_png(pred_dir / s.name)))
        gt_present.append(np.unique(read_label_png(s.label)))
    k = max(num_pred, num_classes)  # square presence counts; only the K x C block is used
    cooc = cooccurrence(pred_present, gt_present, k)[:num_pred, :num_classes]
    cost = cost_matrix(cooc, len(samples))
    cols = munkres_assign(torch.from_numpy(np.ascontiguousarray(cost))).tolist()
    match = {i + 1: (int(j) + 1 if j >= 0 else 0) for i, j in enumerate(cols)}
    match[0] = 0
    return match


def predict(ctx, protocol: str, samples, out_dir: Path) -> None:
    """The run's protocol model on another subset's samples."""
    if protocol == "distance_match":
        from lusscore.stages.distance_match import (load_or_build_bank, load_pretrain_backbone,
                                                    predict_knn)
        backbone = load_pretrain_backbone(ctx)
        predict_knn(backbone, load_or_build_bank(ctx, backbone), samples, out_dir, ctx.cfg,
                    ctx.rt, progress=ctx.rt.is_main)
        return
    from lusscore.stages.infer import load_segmentation_model, predict_split
    stage = "finetune" if protocol == "unsupervised" else "semi"
    if not ctx.run.stage_done(stage):
        raise LusscoreError(f"{ctx.run.checkpoint(stage)} is not a finished {stage} checkpoint: "
                            f"run the {protocol} protocol of {ctx.run.root} first")
    icfg = ctx.cfg["infer"]
    mode = icfg["mode"] if protocol == "unsupervised" else "argmax"
    predict_split(load_segmentation_model(ctx, stage), samples, out_dir, ctx.rt,
                  resize=icfg["resize"], mode=mode, cam_tau=icfg["cam_tau"])


def cross_evaluate(ctx, subset: ImageNetS, split: str, protocol: str) -> dict:
    if not subset.has_labels(split):
        raise LusscoreError(f"{subset.labels_dir(split)}: the subset's {split} split has no GT")
    samples = subset.segmentation_samples(split)
    name = Path(subset.root).resolve().name
    out_dir = ctx.run.root / "cross" / name / protocol / split
    predict(ctx, protocol, samples, out_dir)
    if protocol == "unsupervised":
        match = rectangular_hungarian(out_dir, samples, ctx.dataset.num_classes, subset.num_classes)
    else:
        match = wnid_match(ctx.dataset.wnids, subset)
    save_match(out_dir.parent / f"{split}_match.json", match)
    result = evaluate(subset.labels_dir(split), out_dir, subset.num_classes,
                      subset.names_path(split) if subset.names_path(split).is_file() else None,
                      str(out_dir.parent / f"{split}_match.json"), workers=0)
    atomic_write_text(out_dir.parent / f"{split}_metrics.json", json.dumps(json_ready(result), indent=1))
    return result


def add_arguments(parser):
    parser.add_argument("--run-dir", required=True, help="the run folder (trained on one subset)")
    parser.add_argument("--data", required=True, help="the other subset's root (ImageNet-S layout)")
    parser.add_argument("--split", default="validation", choices=["validation", "test"])
    parser.add_argument("--protocol", default="unsupervised", choices=PROTOCOLS)
    parser.add_argument("--num-classes", type=int, default=None,
                        help="pick the packaged category list when the subset root has none")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")


def main(args):
    ctx = start_run(Namespace(run_dir=args.run_dir, config=None, set=[], device=args.device))
    subset = ImageNetS(args.data, num_classes=args.num_classes)
    result = cross_evaluate(ctx, subset, args.split, args.protocol)
    print(format_table(result, ["other"] + subset.wnids))
    print(f"cross-eval: {args.protocol} of {args.run_dir} on {args.data} {args.split}: "
          f"mIoU {result['mIoU']:.2f}")
