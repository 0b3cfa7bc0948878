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

from lusscore.stages.common import StageContext, add_run_arguments, record_step, start_run
from lusscore.stages.finetune import build_segmentation_model, train_segmentation
from lusscore.stages.infer import load_segmentation_model, predict_and_score

SECTION = "semi"


def semi_pairs(ctx: StageContext) -> list[tuple[Path, Path]]:
    """(image, GT label PNG) of every train-semi image."""
    return [(s.image, s.label) for s in ctx.dataset.train_semi_samples()]


def train_semi(ctx: StageContext) -> nn.Module:
    ctx.seed_stage(SECTION)
    model = build_segmentation_model(ctx, ctx.cfg[SECTION]["init"], SECTION)
    model = train_segmentation(ctx, SECTION, semi_pairs(ctx), model)
    record_step(ctx, SECTION)
    return model


def run_semi(ctx: StageContext, split: str = "validation") -> dict | None:
    """Train (or load) the semi model, predict `split`; its metrics, or None without GT."""
    if ctx.run.stage_done(SECTION):
        model = load_segmentation_model(ctx, stage=SECTION)
    else:
        model = train_semi(ctx).to(ctx.rt.device)
    return predict_and_score(ctx, SECTION, model, split)


def add_arguments(parser):
    add_run_arguments(parser)
    parser.add_argument("--split", default="validation", choices=["validation", "test"],
                        help="the split to predict (and score when it has GT)")


def main(args):
    ctx = start_run(args)
    result = run_semi(ctx, args.split)
    if ctx.rt.is_main:
        if result is None:
            print(f"semi: predicted {args.split} into {ctx.run.predictions(SECTION, args.split)} "
                  "(no GT: not scored)")
        else:
            print(f"semi: {args.split} mIoU {result['mIoU']:.2f} -> "
                  f"{ctx.run.metrics(SECTION, args.split)}")
