"""Fine-tune the backbone + a (K+1)-way 1x1 head on pixel pseudo labels (cross-entropy).

Reads <run>/labels/train/<wnid>/<name>.png (from `luss label`) and the images of the
dataset's train split; starts from <run>/pretrain.pt's backbone; writes <run>/finetune.pt.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lusscore.data.label_io import IGNORE_INDEX
from lusscore.data.segmentation import LabeledImages
from lusscore.engine import Runtime, Trainer, autocast, make_loader, prepare_model, train_epochs
from lusscore.models.pass_models import SegmentationModel, segmentation_model
from lusscore.optim import LARS, cosine_schedule
from lusscore.stages.common import StageContext, add_run_arguments, record_step, start_run, train_stage
from lusscore.utils import LusscoreError, files_under


def build_segmentation_model(ctx: StageContext, init: str,
                             section: str = "finetune") -> SegmentationModel:
    return segmentation_model(ctx.cfg, ctx.run.checkpoint("pretrain"), init, section)


def label_pairs(labels_dir: Path, image_paths: dict[str, Path]) -> list[tuple[Path, Path]]:
    """(image, label) for every label PNG under labels_dir; the image is found by wnid/stem."""
    pairs, missing = [], []
    for lab in sorted(files_under(labels_dir, (".png",))):
        key = lab.relative_to(labels_dir).with_suffix("").as_posix()
        if key in image_paths:
            pairs.append((image_paths[key], lab))
        else:
            missing.append(key)
    if missing:
        raise LusscoreError(f"{labels_dir}: {len(missing)} labels have no image, e.g. {missing[:3]}")
    if not pairs:
        raise LusscoreError(f"{labels_dir}: no label PNGs; run `luss label` first")
    return pairs


class SegmentationTrainer(Trainer):
    """Cross-entropy on (image, label map) crops, LARS with a cosine schedule: `finetune`
    (pseudo labels) and `semi` (train-semi GT), each with its config section."""

    trains_backbone = True  # the whole network trains: channels-last on the CPU (prepare_model)

    def __init__(self, cfg: dict, section: str, pairs, rt: Runtime, model: nn.Module):
        fcfg = cfg[section]
        self.name, self.rt = section, rt
        dataset = LabeledImages(pairs, crop=fcfg["crop"], label_size=fcfg["label_size"],
                                scale=fcfg["scale"])
        per_rank = max(1, fcfg["batch_size"] // rt.world_size)
        if len(dataset) < per_rank * rt.world_size:
            per_rank = max(1, len(dataset) // rt.world_size)
        self.loader = make_loader(dataset, per_rank, rt, int(cfg["seed"]),
                                  workers=cfg["data"]["workers"])
        self.model = prepare_model(model, rt, channels_last_on_cpu=self.trains_backbone)
        self.epochs = int(fcfg["epochs"])
        self.optimizer, self.lrs = self.optimization(fcfg, len(self.loader))

    def optimization(self, fcfg: dict, iters: int) -> tuple[torch.optim.Optimizer, list[float]]:
        """LARS with a cosine schedule (per iteration) over the section's epochs."""
        optimizer = LARS(self.model.parameters(), lr=fcfg["base_lr"], momentum=0.9,
                         weight_decay=fcfg["weight_decay"])
        return optimizer, cosine_schedule(fcfg["base_lr"], fcfg["final_lr"], self.epochs * iters,
                                          warmup_iters=int(fcfg["warmup_epochs"] * iters))

    def loss(self, batch):
        x, y = (t.to(self.rt.device, non_blocking=True) for t in batch)
        with autocast(self.rt):
            logits = self.model(x)
        logits = F.interpolate(logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX), {}, x.shape[0]


def train_segmentation(ctx: StageContext, section: str, pairs, model: nn.Module,
                       trainer_class: type[SegmentationTrainer] = SegmentationTrainer) -> nn.Module:
    """The fine-tuning loop shared by `finetune` (pseudo labels), `semi` (GT labels) and HP's
    linear probe."""
    trainer = trainer_class(ctx.cfg, section, pairs, ctx.rt, model)
    return train_epochs(trainer, ctx.run, ctx.rt, ctx.cfg)


def finetune(ctx: StageContext) -> nn.Module:
    ds = ctx.dataset
    images = {p.relative_to(ds.split_dir("train")).with_suffix("").as_posix(): p
              for p, _ in ds.image_samples("train")}
    pairs = label_pairs(ctx.run.labels("train"), images)
    ctx.seed_stage("finetune")
    model = train_segmentation(ctx, "finetune", pairs,
                               build_segmentation_model(ctx, ctx.cfg["finetune"]["init"]))
    record_step(ctx, "finetune")
    return model


add_arguments = add_run_arguments


def main(args):
    train_stage(start_run(args), "finetune", finetune)
