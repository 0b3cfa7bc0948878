"""Predict the label maps of a split with the fine-tuned model (<run>/finetune.pt).

--split validation (default), train-semi or test; test is predicted whether or not its GT
exists (the benchmark's test GT stays on its server: `luss submit` packs the predictions).

Each image is resized (shorter side 256), the logits are upsampled bilinearly to the image
size (to at most 1000 px on the longer side, then nearest to the full size, as the
reference code caps large images), and the argmax is written as an ImageNet-S PNG to
<run>/predictions/<split>/<wnid>/<name>.png. Images whose prediction already exists (with
the right size) are skipped, so a killed run resumes where it stopped.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lusscore.data.label_io import image_size, label_png_valid, write_label_png
from lusscore.data.segmentation import InferenceImages
from lusscore.engine import Runtime, autocast
from lusscore.stages.common import StageContext, add_run_arguments, record_step, start_run
from lusscore.stages.evaluate import prediction_splits
from lusscore.models.pass_models import SegmentationModel, load_segmentation_checkpoint
from lusscore.utils import progress_bar, remove_temp_files

MAX_SIDE = 1000


@torch.no_grad()
def predict_map(model, x: torch.Tensor, size: tuple[int, int], rt: Runtime) -> torch.Tensor:
    """(1, 3, h, w) normalised image -> (H, W) int64 predicted ids on the CPU."""
    with autocast(rt):
        logits = model(x.to(rt.device))
    h, w = size
    scale = min(1.0, MAX_SIDE / max(h, w))
    out = (max(1, round(h * scale)), max(1, round(w * scale)))
    pred = F.interpolate(logits.float(), size=out, mode="bilinear", align_corners=False).argmax(1)
    if out != (h, w):
        pred = F.interpolate(pred[None].float(), size=(h, w), mode="nearest")[0].long()
    return pred[0].cpu()


def predict_split(model, samples, out_dir: Path, rt: Runtime, resize: int = 256) -> int:
    """Write one prediction per sample (sharded over ranks); returns how many were written."""
    model.eval()
    if rt.is_main:  # what a killed run left half-written
        remove_temp_files(out_dir)
    rt.barrier()
    todo = [s for s in samples[rt.rank::rt.world_size]]
    dataset = InferenceImages([s.image for s in todo], resize=resize)
    written = 0
    for i in progress_bar(range(len(dataset)), desc="infer", disable=not rt.is_main, unit="img"):
        target = out_dir / todo[i].name
        size = image_size(todo[i].image)
        if label_png_valid(target, size):
            continue
        x, _, _ = dataset[i]
        write_label_png(target, predict_map(model, x[None], size, rt))
        written += 1
    rt.barrier()
    return written


def load_segmentation_model(ctx: StageContext, stage: str = "finetune") -> SegmentationModel:
    """The model of <run>/<stage>.pt (finetune, or semi for the semi-supervised protocol)."""
    return load_segmentation_checkpoint(ctx.cfg, ctx.run.checkpoint(stage)).to(ctx.rt.device)


def predict_protocol(ctx: StageContext, model, protocol: str = "unsupervised") -> None:
    """Predict validation, and test when its images exist, into the protocol's folders."""
    resize = ctx.cfg["infer"]["resize"]
    for split in prediction_splits(ctx.dataset):
        predict_split(model, ctx.dataset.prediction_samples(split),
                      ctx.run.predictions(protocol, split), ctx.rt, resize=resize)
    if protocol == "unsupervised":
        record_step(ctx, "infer")


def add_arguments(parser):
    add_run_arguments(parser)
    parser.add_argument("--split", default="validation", choices=["validation", "train-semi", "test"])


def main(args):
    ctx = start_run(args)
    out_dir = ctx.run.predictions("unsupervised", args.split)
    n = predict_split(load_segmentation_model(ctx), ctx.dataset.prediction_samples(args.split),
                      out_dir, ctx.rt, resize=ctx.cfg["infer"]["resize"])
    record_step(ctx, "infer")
    if ctx.rt.is_main:
        print(f"infer: wrote {n} predictions to {out_dir}")
