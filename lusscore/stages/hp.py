"""HP protocol: hidden-positive contrastive learning (Seong et al., CVPR 2023) on a frozen
backbone (the run's PASS-pretrained ResNet, or a timm ViT with a DINO checkpoint's weights:
hp.backbone), scored beside PASS's own protocols and the trivial floors.

Trains <run>/hp.pt (the `hp` config section; resumed after a crash, loss log <run>/hp.jsonl):
the segmentation head S, its EMA copy S', the projection Z and the cluster probe
(num_classes + 1 centroids) on crops of the train images and a photometric augmentation of
each crop. Per batch the thresholds phi come from two reference pools: the task-agnostic one
(backbone features of one random patch from each of hp.pool_size random training images,
fixed) and the task-specific one (a ring buffer of the batches' EMA-head features, one patch per
image: no extra forward passes; or with hp.renew_interval N, HP's own: recomputed from
pool_size random train images every N steps); the loss is the fused hp_contrastive_loss on the
codes and on their local (3x3) mixes, plus the consistency regulariser (lusscore/losses/hp.py).

HP's linear probe (protocol hp_linear): a 1x1 classifier on the frozen backbone and S, trained
on the train-semi GT (<run>/hp_linear.pt, the `hp_linear` section), predicting class ids
(scored without a match): <run>/hp_linear/.

Prediction: backbone -> S -> nearest centroid. The cluster most frequent on the border pixels of
the train images is 'other' (id 0, the floors' rule), the rest are ids 1..C, matched to classes
on validation by the Hungarian match (test reuses validation's match.json):
<run>/hp/predictions/<split>/, <run>/hp/metrics.json, <run>/hp/test/metrics.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from lusscore.checkpoint import load_checkpoint
from lusscore.data.label_io import read_image
from lusscore.data.photometric import PhotometricAugment
from lusscore.data.transforms import load_center_crop, to_normalized_tensor
from lusscore.engine import Runtime, Trainer, autocast, make_loader, prepare_model, train_epochs, unwrap
from lusscore.losses.hp import (RingPool, affinity_mix_weights, attention_mix_weights, flat_pixels,
                                hp_objective, lambda_at, mix_codes, one_patch_per_image,
                                pool_thresholds)
from lusscore.models.hp import HPLinearProbe, HPModel, HPPredictor
from lusscore.models.pass_models import pretrained_trunk
from lusscore.models.vit import ViTBackbone
from lusscore.stages.common import StageContext, add_run_arguments, record_step, start_run
from lusscore.stages.finetune import SegmentationTrainer, train_segmentation
from lusscore.stages.infer import predict_and_score
from lusscore.stages.semi import semi_pairs
from lusscore.utils import LusscoreError, atomic_write_text, progress_bar

SECTION = "hp"
LINEAR = "hp_linear"  # the linear probe's stage and protocol


class HPViews(Dataset):
    """A random resized crop (and flip) of each image, and a photometric augmentation of that
    same crop: the pair whose codes the consistency regulariser pulls together. HP's
    augmentation: ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8 and grayscale with p 0.2, drawn
    per image and applied to the batch by `collate` (the loader's collate_fn)."""

    def __init__(self, paths: list[Path], crop: int, scale):
        self.paths = paths
        self.geometry = T.Compose([T.RandomResizedCrop(crop, scale=tuple(scale)),
                                   T.RandomHorizontalFlip()])
        self.photometric = PhotometricAugment(jitter_strength=0.5, color_p=0.8, grayscale_p=0.2,
                                              blur_p=0.0)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        crop = self.geometry(read_image(self.paths[i]))
        return pil_to_tensor(crop), self.photometric.draw()

    def collate(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(crop, draw) items -> (the crops, their augmentations), both normalised."""
        crops = torch.stack([crop for crop, _ in items])
        draws = torch.stack([draw for _, draw in items])
        return to_normalized_tensor(crops), to_normalized_tensor(self.photometric.apply(crops, draws))


class HPForward(nn.Module):
    """The trainable part of one HP step as one module call (so that DDP sees it): codes of
    the crop, of its augmentation and of the local mixes (by `mix_weights`, (B, 9, h*w)), the
    EMA features, the probe loss."""

    def __init__(self, model: HPModel):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, features_aug: torch.Tensor, mix_weights: torch.Tensor):
        m = self.model
        s = m.head(features)
        with torch.no_grad():
            s_ema = F.normalize(m.ema_head(features), dim=1)
        return (m.projection(s), m.projection(m.head(features_aug)),
                m.projection(mix_codes(s, mix_weights)), s_ema, m.probe.loss(s))


BACKBONES = ("pretrain", "vit")


def frozen_backbone(ctx: StageContext) -> nn.Module:
    """hp.backbone: the run's pretrained ResNet trunk (pretrain), or a timm ViT with the
    weights of the DINO checkpoint file hp.vit.weights (vit)."""
    h = ctx.cfg[SECTION]
    if h["backbone"] not in BACKBONES:
        raise LusscoreError(f"hp.backbone must be {' or '.join(map(repr, BACKBONES))}, not {h['backbone']!r}")
    if h["backbone"] == "vit":
        vit = h["vit"]  # a mapping: replaced as a whole by a config that sets it
        if not vit.get("arch"):
            raise LusscoreError("hp.vit.arch is not set: a timm model name, e.g. vit_small_patch8_224")
        backbone = ViTBackbone(vit["arch"], vit.get("weights"), **(vit.get("kwargs") or {}))
    else:
        backbone = pretrained_trunk(ctx.run.checkpoint("pretrain"), ctx.cfg["model"])
    return backbone.to(ctx.rt.device).eval().requires_grad_(False)


def features_and_mix_weights(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen features of a batch and LHP's 3x3 mixing weights: from the last block's
    attention for a ViT (as HP), from the features' cosine affinity for a CNN."""
    if isinstance(backbone, ViTBackbone):
        features, attention = backbone.with_attention(x)
        return features.float(), attention_mix_weights(attention, *features.shape[2:])
    features = backbone(x).float()
    return features, affinity_mix_weights(features)


@torch.no_grad()
def reference_pool(backbone: nn.Module, paths: list[Path], size: int, crop: int, rt: Runtime,
                   head: nn.Module | None = None, batch_size: int = 32) -> torch.Tensor:
    """(min(size, images), C): the normalised feature (the backbone's, or `head`'s output on
    it) of one random patch of each of `size` random images (resized and centre-cropped to
    `crop`)."""
    chosen = torch.randperm(len(paths))[:size].tolist()
    rows = []
    for start in range(0, len(chosen), batch_size):
        x = torch.stack([load_center_crop(paths[i], crop, crop) for i in chosen[start:start + batch_size]])
        with autocast(rt):
            features = backbone(x.to(rt.device))
            if head is not None:
                features = head(features)
        rows.append(one_patch_per_image(features.float()))
    return F.normalize(torch.cat(rows), dim=1)


class HPTrainer(Trainer):
    name = SECTION

    def __init__(self, cfg: dict, rt: Runtime, paths: list[Path], backbone: nn.Module):
        h = self.h = cfg[SECTION]
        self.rt, self.backbone, self.seed = rt, backbone, int(cfg["seed"])
        per_rank = max(1, min(h["batch_size"] // rt.world_size, len(paths) // rt.world_size))
        views = HPViews(paths, h["crop"], h["scale"])
        self.loader = make_loader(views, per_rank, rt, self.seed, workers=cfg["data"]["workers"],
                                  collate_fn=views.collate)
        model = HPModel(backbone.out_channels, h["dim"], cfg["data"]["num_classes"] + 1, h["dropout"])
        self.model = prepare_model(HPForward(model), rt)
        self.core = unwrap(self.model).model
        probe_scale = h["probe_lr"] / h["lr"]
        self.optimizer = torch.optim.AdamW(
            [{"params": [*self.core.head.parameters(), *self.core.projection.parameters()],
              "weight_decay": h["weight_decay"]},
             {"params": self.core.probe.parameters(), "weight_decay": 0.0, "lr_scale": probe_scale}],
            lr=h["lr"])
        self.epochs = int(h["epochs"])
        self.total_steps = self.epochs * len(self.loader)
        self.lrs = [h["lr"]] * self.total_steps  # HP trains at a constant learning rate
        self.paths = paths
        self.pool_agnostic = reference_pool(backbone, paths, h["pool_size"], h["crop"], rt)
        self.pool_specific = RingPool(h["pool_size"], h["dim"], rt.device)
        self.renew_interval = int(h["renew_interval"])
        if self.renew_interval:
            self.renew_specific_pool()
        self.step = 0

    def renew_specific_pool(self) -> None:
        """HP's renewal: the EMA head's features of one patch of each of pool_size random
        train images replace the whole task-specific pool."""
        h = self.h
        self.pool_specific.replace(reference_pool(self.backbone, self.paths, h["pool_size"],
                                                  h["crop"], self.rt, head=self.core.ema_head))

    def start_epoch(self, epoch: int) -> None:
        self.step = epoch * len(self.loader)

    def loss(self, batch):
        h = self.h
        x, x_aug = (t.to(self.rt.device, non_blocking=True) for t in batch)
        if self.renew_interval and self.step and self.step % self.renew_interval == 0:
            self.renew_specific_pool()
        with torch.no_grad(), autocast(self.rt):
            features, mix_weights = features_and_mix_weights(self.backbone, x)
            features_aug = self.backbone(x_aug).float()
        with autocast(self.rt):
            z, z_aug, z_mix, s_ema, probe_loss = self.model(features, features_aug, mix_weights)
        f = F.normalize(flat_pixels(features), dim=1)
        s = flat_pixels(s_ema.float())
        phi_f = pool_thresholds(f, self.pool_agnostic)
        phi_s = pool_thresholds(s, self.pool_specific.view())
        lam = lambda_at(self.step, self.total_steps, h["lambda_warmup"])
        loss, parts = hp_objective(flat_pixels(z), flat_pixels(z_mix), flat_pixels(z_aug), f, phi_f,
                                   s, phi_s, h["tau"], h["rho"], lam, h["alpha"],
                                   seed=self.seed * 1_000_003 + self.step, base_tau=h["base_tau"])
        if not self.renew_interval:
            # The batch joins the task-specific pool after its own thresholds were taken.
            self.pool_specific.add(one_patch_per_image(s_ema.float()))
        self.step += 1
        parts.update(probe=probe_loss.detach(), lam=torch.tensor(lam))
        return loss + probe_loss, parts, x.shape[0]

    def before_step(self, step: int) -> None:
        if self.h["grad_norm"]:
            nn.utils.clip_grad_norm_([*self.core.head.parameters(), *self.core.projection.parameters()],
                                     self.h["grad_norm"])

    def after_step(self, step: int) -> None:
        self.core.update_ema(self.h["ema_momentum"])

    def state(self) -> dict:
        return {"pool_agnostic": self.pool_agnostic.cpu(), "pool_specific": self.pool_specific.state()}

    def load(self, state: dict) -> None:
        self.pool_agnostic = state["pool_agnostic"].to(self.rt.device)
        self.pool_specific.load(state["pool_specific"])


def train_hp(ctx: StageContext, backbone: nn.Module) -> HPModel:
    paths = [p for p, _ in ctx.dataset.image_samples("train")]
    ctx.seed_stage(SECTION)
    trainer = HPTrainer(ctx.cfg, ctx.rt, paths, backbone)
    train_epochs(trainer, ctx.run, ctx.rt, ctx.cfg)
    record_step(ctx, SECTION)
    return trainer.core


def load_hp_model(ctx: StageContext, backbone: nn.Module) -> HPModel:
    h = ctx.cfg[SECTION]
    model = HPModel(backbone.out_channels, h["dim"], ctx.cfg["data"]["num_classes"] + 1, h["dropout"])
    HPForward(model).load_state_dict(load_checkpoint(ctx.run.checkpoint(SECTION))["model"])
    return model.to(ctx.rt.device)


@torch.no_grad()
def other_first_order(backbone: nn.Module, model: HPModel, paths: list[Path], resize: int,
                      rt: Runtime, images: int = 256) -> dict:
    """The cluster most frequent on the border pixels of (at most `images` evenly spaced) train
    images becomes 'other'; -> {"order": [other, the rest in index order], "border_counts"}."""
    model.eval()
    k = model.probe.centroids.shape[0]
    counts = torch.zeros(k, dtype=torch.long)
    step = max(1, len(paths) // images)
    for path in progress_bar(paths[::step][:images], desc="hp: border clusters", disable=not rt.is_main):
        x = load_center_crop(path, resize, resize)[None].to(rt.device)
        with autocast(rt):
            ids = model.probe.logits(model.head(backbone(x)).float()).argmax(1)[0].cpu()
        border = torch.cat([ids[0], ids[-1], ids[1:-1, 0], ids[1:-1, -1]])
        counts += torch.bincount(border, minlength=k)
    other = int(counts.argmax())
    return {"order": [other] + [c for c in range(k) if c != other], "border_counts": counts.tolist()}


def trained_hp(ctx: StageContext) -> tuple[nn.Module, HPModel]:
    """(the frozen backbone, the HP model of <run>/hp.pt, trained here when not complete)."""
    backbone = frozen_backbone(ctx)
    model = load_hp_model(ctx, backbone) if ctx.run.stage_done(SECTION) else train_hp(ctx, backbone)
    return backbone, model


def hp_predictor(ctx: StageContext) -> HPPredictor:
    """The trained HP model as a predictor; its cluster order is written to
    <run>/hp/clusters.json."""
    backbone, model = trained_hp(ctx)
    paths = [p for p, _ in ctx.dataset.image_samples("train")]
    clusters = other_first_order(backbone, model, paths, ctx.cfg["infer"]["resize"], ctx.rt)
    if ctx.rt.is_main:
        path = ctx.run.protocol_dir(SECTION) / "clusters.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(clusters, indent=1))
    return HPPredictor(backbone, model, clusters["order"]).to(ctx.rt.device).eval()


class LinearProbeTrainer(SegmentationTrainer):
    """HP's linear probe: the fine-tuning loop's crops and cross-entropy, HP's Adam at a
    constant lr on the 1x1 classifier (the rest is frozen)."""

    trains_backbone = False

    def optimization(self, fcfg: dict, iters: int):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.Adam(trainable, lr=fcfg["lr"]), [fcfg["lr"]] * (self.epochs * iters)


def linear_probe(ctx: StageContext) -> HPLinearProbe:
    """HP's linear probe on the trained HP head (<run>/hp_linear.pt: trained here on the
    train-semi GT, the `hp_linear` section, when not complete)."""
    backbone, model = trained_hp(ctx)
    probe = HPLinearProbe(backbone, model.head, ctx.cfg[SECTION]["dim"], ctx.cfg["data"]["num_classes"] + 1)
    if ctx.run.stage_done(LINEAR):
        probe.load_state_dict(load_checkpoint(ctx.run.checkpoint(LINEAR))["model"])
    else:
        ctx.seed_stage(LINEAR)
        probe = train_segmentation(ctx, LINEAR, semi_pairs(ctx), probe.to(ctx.rt.device),
                                   LinearProbeTrainer)
        record_step(ctx, LINEAR)
    return probe.to(ctx.rt.device).eval()


def run_hp(ctx: StageContext, split: str = "validation") -> dict | None:
    """Train (or load) HP, predict `split` with its cluster probe; its metrics (matched), or
    None without GT."""
    return predict_and_score(ctx, SECTION, hp_predictor(ctx), split)


def run_hp_linear(ctx: StageContext, split: str = "validation") -> dict | None:
    """Train (or load) HP and its linear probe, predict `split` with the probe; its metrics
    (class ids: no match), or None without GT."""
    return predict_and_score(ctx, LINEAR, linear_probe(ctx), split)


def add_arguments(parser):
    add_run_arguments(parser)


def main(args):
    """HP's cluster probe (protocol hp), then its linear probe (hp_linear), each on
    validation, then test when it has GT; the table beside the run's other protocols and the
    floors; <run>/protocols.json updated."""
    from lusscore.stages.baselines import baselines_step
    from lusscore.stages.evaluate import format_protocols, json_ready, run_splits, summarize
    ctx = start_run(args)
    results = {SECTION: run_splits(ctx, SECTION, run_hp), LINEAR: run_splits(ctx, LINEAR, run_hp_linear)}
    floors = baselines_step(ctx)
    if ctx.rt.is_main:
        path = ctx.run.protocols_summary
        summary = json.loads(path.read_text()) if path.is_file() else {}
        summary.update({name: summarize(name, r) for name, r in results.items() if r})
        atomic_write_text(path, json.dumps(json_ready(summary), indent=1))
        print(format_protocols(summary, floors), flush=True)
