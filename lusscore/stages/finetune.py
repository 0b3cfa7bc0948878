"""Fine-tune the backbone + a (K+1)-way 1x1 head on pixel pseudo labels (cross-entropy).

Reads <run>/labels/train/<wnid>/<name>.png (from `luss label`) and the images of the
dataset's train split; starts from <run>/pretrain.pt's backbone; writes <run>/finetune.pt.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lusscore.checkpoint import load_checkpoint
from lusscore.data.segmentation import LabeledImages
from lusscore.engine import (JsonlLog, Runtime, StageCheckpoint, autocast, make_loader, prepare_model,
                             set_lr, unwrap)
from lusscore.models import ResNetTrunk, SegmentationHead
from lusscore.optim import LARS, cosine_schedule
from lusscore.stages.common import add_run_arguments, dataset_of, run_training_stage
from lusscore.utils import LusscoreError

IGNORE_INDEX = 1000


class SegmentationModel(nn.Module):
    def __init__(self, model_cfg: dict, num_classes: int):
        super().__init__()
        self.backbone = ResNetTrunk(model_cfg["arch"], width=model_cfg.get("width", 64),
                                    output_stride=model_cfg.get("output_stride", 32))
        self.head = SegmentationHead(self.backbone.stage4_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)["stage4"])


def build_segmentation_model(cfg: dict, run_dir: Path, init: str,
                             section: str = "finetune") -> SegmentationModel:
    model = SegmentationModel(cfg["model"], cfg["data"]["num_classes"])
    if init == "pretrain":
        ck = run_dir / "pretrain.pt"
        if not ck.is_file():
            raise LusscoreError(f"{ck} not found: run `luss pretrain` first, or set {section}.init=none")
        model.backbone.load_state_dict(load_checkpoint(ck)["backbone"])
    elif init != "none":
        raise LusscoreError(f"{section}.init must be 'pretrain' or 'none', not {init!r}")
    return model


def label_pairs(labels_dir: Path, image_paths: dict[str, Path]) -> list[tuple[Path, Path]]:
    """(image, label) for every label PNG under labels_dir; the image is found by wnid/stem."""
    pairs, missing = [], []
    for lab in sorted(labels_dir.rglob("*.png")):
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


def train_segmentation(cfg: dict, section: str, pairs, run_dir: Path, rt: Runtime,
                       model: nn.Module) -> nn.Module:
    """The fine-tuning loop shared by `finetune` (pseudo labels) and `semi` (GT labels)."""
    fcfg = cfg[section]
    seed = int(cfg.get("seed", 0))
    dataset = LabeledImages(pairs, crop=fcfg["crop"], label_size=fcfg["label_size"],
                            scale=fcfg.get("scale", (0.08, 1.0)))
    per_rank = max(1, fcfg["batch_size"] // rt.world_size)
    if len(dataset) < per_rank * rt.world_size:
        per_rank = max(1, len(dataset) // rt.world_size)
    loader = make_loader(dataset, per_rank, rt, seed, workers=cfg["data"].get("workers", 0))
    model = prepare_model(model, rt)
    optimizer = LARS(model.parameters(), lr=fcfg["base_lr"], momentum=0.9,
                     weight_decay=fcfg.get("weight_decay", 1e-6))
    epochs = int(fcfg["epochs"])
    lrs = cosine_schedule(fcfg["base_lr"], fcfg["final_lr"], epochs * len(loader),
                          warmup_iters=int(fcfg.get("warmup_epochs", 0) * len(loader)))
    ck = StageCheckpoint(run_dir, section, rt, cfg)
    log = JsonlLog(run_dir / f"{section}.jsonl", rt)
    start = 0
    state = ck.load()
    if state is not None:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"]
    for epoch in range(start, epochs):
        loader.sampler.set_epoch(epoch)
        model.train()
        bar = tqdm(loader, desc=f"{section} {epoch + 1}/{epochs}", disable=not rt.is_main, leave=False)
        for it, (x, y) in enumerate(bar):
            t0 = time.perf_counter()
            step = epoch * len(loader) + it
            set_lr(optimizer, lrs[step])
            x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
            with autocast(rt):
                logits = model(x)
            logits = F.interpolate(logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rate = x.shape[0] * rt.world_size / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}")
            log.write(stage=section, epoch=epoch, iter=step, loss=loss.item(), lr=lrs[step], img_s=rate)
        ck.save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": epoch + 1}, done=epoch + 1 == epochs)
    return unwrap(model)


def finetune(cfg: dict, run_dir: Path, rt: Runtime) -> nn.Module:
    ds = dataset_of(cfg)
    images = {p.relative_to(ds.split_dir("train")).with_suffix("").as_posix(): p
              for p, _ in ds.image_samples("train")}
    pairs = label_pairs(run_dir / "labels" / "train", images)
    model = build_segmentation_model(cfg, run_dir, cfg["finetune"].get("init", "pretrain"))
    return train_segmentation(cfg, "finetune", pairs, run_dir, rt, model)


add_arguments = add_run_arguments


def main(args):
    run_training_stage(args, "finetune", finetune)
