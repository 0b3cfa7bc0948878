"""Predict the label maps of a split with the fine-tuned model (<run>/finetune.pt).

--split validation (default), train-semi or test; test is predicted whether or not its GT
exists (the benchmark's test GT stays on its server: `luss submit` packs the predictions).

Each image is resized (shorter side 256), the logits are upsampled bilinearly to the image
size (to at most 1000 px on the longer side, then nearest to the full size, as the
reference code caps large images), and the argmax is written as an ImageNet-S PNG to
<run>/predictions/<split>/<wnid>/<name>.png. Images whose prediction already exists (with
the right size) are skipped, so a killed run resumes where it stopped.

infer.mode cam (the paper's image-level inference, "^tau" in Tab 10a, App. A): the image's
class is the argmax over 1..C of the spatially averaged logits (a classifier on the pooled
feature, the 1x1 head being linear); its logit map, min-max normalised (Eq. 9), gives that
class where it is >= infer.cam_tau and 'other' elsewhere (Eq. 10).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lusscore.data.label_io import image_size, label_png_valid, write_label_png
from lusscore.data.segmentation import InferenceImages
from lusscore.engine import Runtime, autocast
from lusscore.stages.common import StageContext, add_run_arguments, record_step, start_run
from lusscore.stages.evaluate import evaluate_protocol, prediction_splits
from lusscore.models.pass_models import SegmentationModel, load_segmentation_checkpoint
from lusscore.utils import LusscoreError, progress_bar, remove_temp_files

MAX_SIDE = 1000


INFER_MODES = ("argmax", "cam")


def cam_prediction(logits: torch.Tensor, cam_tau: float) -> torch.Tensor:
    """(B, C+1, H, W) logits -> (B, H, W) ids by CAM thresholding (App. A, Eq. 9-10)."""
    cls = logits[:, 1:].mean(dim=(2, 3)).argmax(dim=1) + 1                  # (B,)
    cam = logits[torch.arange(len(logits), device=logits.device), cls]      # (B, H, W)
    lo = cam.amin(dim=(1, 2), keepdim=True)
    hi = cam.amax(dim=(1, 2), keepdim=True)
    cam = (cam - lo) / (hi - lo).clamp_min(1e-12)
    return torch.where(cam >= cam_tau, cls[:, None, None], torch.zeros_like(cls)[:, None, None])


@torch.no_grad()
def predict_map(model, x: torch.Tensor, size: tuple[int, int], rt: Runtime,
                mode: str = "argmax", cam_tau: float = 0.5) -> torch.Tensor:
    """(1, 3, h, w) normalised image -> (H, W) int64 predicted ids on the CPU."""
    if mode not in INFER_MODES:
        raise LusscoreError(f"infer.mode must be one of {INFER_MODES}, got {mode!r}")
    with autocast(rt):
        logits = model(x.to(rt.device))
    h, w = size
    scale = min(1.0, MAX_SIDE / max(h, w))
    out = (max(1, round(h * scale)), max(1, round(w * scale)))
    logits = F.interpolate(logits.float(), size=out, mode="bilinear", align_corners=False)
    pred = logits.argmax(1) if mode == "argmax" else cam_prediction(logits, cam_tau)
    if out != (h, w):
        pred = F.interpolate(pred[None].float(), size=(h, w), mode="nearest")[0].long()
    return pred[0].cpu()


def predict_split(model, samples, out_dir: Path, rt: Runtime, resize: int = 256,
                  mode: str = "argmax", cam_tau: float = 0.5) -> int:
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
        write_label_png(target, predict_map(model, x[None], size, rt, mode, cam_tau))
        written += 1
    rt.barrier()
    return written


def load_segmentation_model(ctx: StageContext, stage: str = "finetune") -> SegmentationModel:
    """The model of <run>/<stage>.pt (finetune, or semi for the semi-supervised protocol)."""
    return load_segmentation_checkpoint(ctx.cfg, ctx.run.checkpoint(stage)).to(ctx.rt.device)


def predict_and_score(ctx: StageContext, protocol: str, model, split: str) -> dict | None:
    """A backbone-only protocol's split: predicted (at infer.resize) into its folder, then scored
    as the protocol is (evaluate_protocol); None for a split without GT."""
    ds = ctx.dataset
    predict_split(model, ds.prediction_samples(split), ctx.run.predictions(protocol, split), ctx.rt,
                  resize=ctx.cfg["infer"]["resize"])
    if not ds.has_labels(split):
        return None
    return evaluate_protocol(ctx, protocol, split)


def predict_protocol(ctx: StageContext, model, protocol: str = "unsupervised") -> None:
    """Predict validation, and test when its images exist, into the protocol's folders."""
    icfg = ctx.cfg["infer"]
    for split in prediction_splits(ctx.dataset):
        predict_split(model, ctx.dataset.prediction_samples(split),
                      ctx.run.predictions(protocol, split), ctx.rt, resize=icfg["resize"],
                      mode=icfg["mode"], cam_tau=icfg["cam_tau"])
    if protocol == "unsupervised":
        record_step(ctx, "infer")


def predict_with_pseudo_labels(ctx: StageContext, tau: float) -> None:
    """finetune.enabled false (the paper's Tab 10d, "before fine-tuning"): the pseudo labels of
    validation (and test) at the run's tau are the unsupervised protocol's predictions."""
    from lusscore.stages.label import label_split
    for split in prediction_splits(ctx.dataset):
        label_split(ctx, split, tau, save_attention=False,
                    out_dir=ctx.run.predictions("unsupervised", split))
    record_step(ctx, "infer")


def add_arguments(parser):
    add_run_arguments(parser)
    parser.add_argument("--split", default="validation", choices=["validation", "train-semi", "test"])


def main(args):
    ctx = start_run(args)
    out_dir = ctx.run.predictions("unsupervised", args.split)
    icfg = ctx.cfg["infer"]
    n = predict_split(load_segmentation_model(ctx), ctx.dataset.prediction_samples(args.split),
                      out_dir, ctx.rt, resize=icfg["resize"], mode=icfg["mode"],
                      cam_tau=icfg["cam_tau"])
    record_step(ctx, "infer")
    if ctx.rt.is_main:
        print(f"infer: wrote {n} predictions to {out_dir}")
