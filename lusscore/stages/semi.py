"""Semi-supervised protocol: fine-tune on the pixel-annotated train-semi images, evaluate.

Starts from <run>/pretrain.pt's backbone (semi.init: pretrain | none) with a fresh (C+1)-way
1x1 head and trains it with cross-entropy on the train-semi GT label PNGs (ignore = 1000 left
out of the loss), with the fine-tuning loop and the `semi` config section (30 epochs by
default): <run>/semi.pt (+ .yaml), resumed after a crash, loss log <run>/semi.jsonl. Then
predicts a split (validation, or test: <run>/semi/predictions/<split>/<wnid>/<name>.png,
existing ones skipped) and, when the split has GT, evaluates without matching (the head
predicts GT ids): <run>/semi/metrics.json (test: <run>/semi/test/metrics.json), in the
format of <run>/metrics.json.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from lusscore.engine import Runtime, StageCheckpoint
from lusscore.stages.common import (add_run_arguments, dataset_of, predictions_dir,
                                    protocol_metrics_path, start_run)

SECTION = "semi"


def semi_pairs(cfg: dict) -> list[tuple[Path, Path]]:
    """(image, GT label PNG) of every train-semi image."""
    from lusscore.stages.distance_match import train_semi_samples
    return [(s.image, s.label) for s in train_semi_samples(dataset_of(cfg))]


def train_semi(cfg: dict, run_dir: Path, rt: Runtime) -> nn.Module:
    from lusscore.stages.finetune import build_segmentation_model, train_segmentation
    pairs = semi_pairs(cfg)
    model = build_segmentation_model(cfg, run_dir, cfg[SECTION].get("init", "pretrain"), SECTION)
    return train_segmentation(cfg, SECTION, pairs, run_dir, rt, model)


def run_semi(cfg: dict, run_dir: Path, rt: Runtime, split: str = "validation") -> dict | None:
    """Train (or load) the semi model, predict `split`; its metrics, or None without GT."""
    from lusscore.stages.infer import load_segmentation_model, predict_split
    from lusscore.stages.run import evaluate_protocol
    run_dir = Path(run_dir)
    if StageCheckpoint(run_dir, SECTION, rt, cfg).is_done():
        model = load_segmentation_model(cfg, run_dir, rt, stage=SECTION)
    else:
        model = train_semi(cfg, run_dir, rt).to(rt.device)
    ds = dataset_of(cfg)
    predict_split(model, ds.prediction_samples(split), predictions_dir(run_dir, SECTION, split), rt,
                  resize=cfg.get("infer", {}).get("resize", 256))
    if not ds.has_labels(split):
        return None
    return evaluate_protocol(cfg, run_dir, rt, SECTION, split)


def add_arguments(parser):
    add_run_arguments(parser)
    parser.add_argument("--split", default="validation", choices=["validation", "test"],
                        help="the split to predict (and score when it has GT)")


def main(args):
    cfg, run_dir, rt = start_run(args)
    result = run_semi(cfg, run_dir, rt, args.split)
    if rt.is_main:
        if result is None:
            print(f"semi: predicted {args.split} into {predictions_dir(run_dir, SECTION, args.split)} "
                  "(no GT: not scored)")
        else:
            print(f"semi: {args.split} mIoU {result['mIoU']:.2f} -> "
                  f"{protocol_metrics_path(run_dir, SECTION, args.split)}")
