"""Representation learning from scratch: SwAV + pixel-to-pixel (P2P) + deep-to-shallow (D2S),
PASS_s; with pretrain.method pixpro, PASS_p: PixPro's loss + the clustering loss + P2P + D2S.

Loss = [L_pixpro +] w_swav * L_swav + w_d2s * L_d2s + w_p2p * L_p2p (1/2, 1/2, 1 by default; a
weight of 0 switches a part off, for ablations; see lusscore/losses/pass_loss.py). Writes
<run>/pretrain.pt with the backbone and heads (and PixPro's momentum network).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from lusscore.data.imagenet_s import image_folder_samples
from lusscore.data.label_io import read_image
from lusscore.data.views import MultiCropTransform, augment_options, crop_like
from lusscore.engine import Runtime, Trainer, autocast, make_loader, prepare_model, train_epochs, unwrap
from lusscore.losses.pass_loss import (SwAVQueue, add_p2p, add_pixpro, d2s_options, p2p_options,
                                      pass_losses, pixpro_options, queue_length, queue_state)
from lusscore.models.pass_models import PASSPretrainModel
from lusscore.ops.switch import ops_from_config
from lusscore.optim import LARS, cosine_schedule
from lusscore.saliency import read_saliency_png
from lusscore.stages.common import StageContext, add_run_arguments, record_step, start_run, train_stage


class ImageFiles(Dataset):
    """Images (and their folder class ids) through a transform, e.g. MultiCropTransform;
    with priors (a saliency map path per image), each multi-crop sample also carries the
    same crops of its map."""

    def __init__(self, samples: list[tuple[Path, int]], transform,
                 priors: list[Path] | None = None):
        self.samples, self.transform, self.priors = samples, transform, priors

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        image = read_image(path)
        sample = self.transform(image)
        if self.priors is not None:
            prior = read_saliency_png(self.priors[i], (image.height, image.width))
            sample = crop_like(sample, torch.from_numpy(prior))
        return sample, label


def multicrop_forward(model, core, batch, rt: Runtime, **options):
    """One SwAV-style forward of a multi-crop batch: prototypes re-normalised first, crops of
    each size as one group on the device. -> (model output, images per crop)."""
    core.prototypes.normalize_()
    groups = [g.to(rt.device, non_blocking=True) for g in batch.by_size()]
    with autocast(rt):
        out = model(groups, **options)
    return out, batch.images[0].shape[0]


def loss_weights(pcfg: dict) -> dict:
    return dict(pcfg["loss_weights"])


class PretrainTrainer(Trainer):
    """SwAV + D2S + P2P (+ PixPro) on multi-crop batches, LARS with a cosine schedule; the SwAV
    queue starts at epoch_queue_starts; the prototypes stay fixed for freeze_prototypes_iters;
    PixPro's momentum network follows the online one after every step."""

    name = "pretrain"

    def __init__(self, cfg: dict, rt: Runtime, samples, model: nn.Module | None = None):
        pcfg, mcfg = cfg["pretrain"], cfg["model"]
        self.pcfg, self.rt, self.feat_dim = pcfg, rt, mcfg["feat_dim"]
        self.weights = loss_weights(pcfg)
        crops = pcfg["crops"]
        transform = MultiCropTransform(crops["sizes"], crops["counts"], crops["min_scale"],
                                       crops["max_scale"], std_quirk=pcfg["std_quirk"],
                                       **augment_options(pcfg["augment"]))
        self.n_crops = sum(crops["counts"])
        per_rank = max(1, pcfg["batch_size"] // rt.world_size)
        self.loader = make_loader(ImageFiles(samples, transform), per_rank, rt, int(cfg["seed"]),
                                  workers=cfg["data"]["workers"], collate_fn=transform.collate)
        if model is None:
            model = PASSPretrainModel(mcfg, self.weights, pcfg["p2p_lattice"],
                                      d2s_options(pcfg)["stages"], p2p_options(pcfg),
                                      pixpro_options(pcfg))
        self.model = prepare_model(model, rt, channels_last_on_cpu=True)
        self.core = unwrap(self.model)
        self.optimizer = LARS([p for p in self.model.parameters() if p.requires_grad],
                              lr=pcfg["base_lr"], momentum=0.9, weight_decay=pcfg["weight_decay"])
        self.epochs, iters = int(pcfg["epochs"]), len(self.loader)
        self.total_steps = self.epochs * iters
        self.lrs = cosine_schedule(pcfg["base_lr"], pcfg["final_lr"], self.epochs * iters,
                                   warmup_iters=int(pcfg["warmup_epochs"] * iters))
        self.queue_len = queue_length(pcfg["queue_length"], rt, per_rank)
        self.queue: SwAVQueue | None = None

    def start_epoch(self, epoch: int) -> None:
        if (self.queue is None and self.queue_len > 0
                and epoch >= self.pcfg["epoch_queue_starts"]):
            self.queue = SwAVQueue(self.queue_len, self.feat_dim, self.rt.device)

    def loss(self, batch):
        out, bs = multicrop_forward(self.model, self.core, batch, self.rt)
        total, parts = pass_losses(out, bs, self.n_crops, self.weights, self.pcfg, self.queue,
                                   self.core.prototypes.weight)
        total = add_p2p(self.core, out, batch, bs, self.weights, total, parts, self.pcfg)
        total = add_pixpro(self.core, out, batch, bs, total, parts)
        return total, parts, bs

    def before_step(self, step: int) -> None:
        if step < self.pcfg["freeze_prototypes_iters"]:
            self.core.prototypes.weight.grad = None

    def after_step(self, step: int) -> None:
        if self.core.pixpro is not None:
            self.core.pixpro.momentum_update(self.core.backbone, step, self.total_steps)

    def state(self) -> dict:
        return {"backbone": self.core.backbone.state_dict(), **queue_state(self.queue, self.rt)}

    def load(self, state: dict) -> None:
        if state.get("queue") is not None:
            self.queue = SwAVQueue(self.queue_len, self.feat_dim, self.rt.device)
            self.queue.load(state, self.rt)


@ops_from_config
def pretrain(ctx: StageContext, samples: list[tuple[Path, int]] | None = None) -> nn.Module:
    """Train (or resume) <run>/pretrain.pt on samples (default: the train split, or every
    image of data.pretrain_root, e.g. the full ImageNet-1k train folder for S919)."""
    if samples is None:
        root = ctx.cfg["data"]["pretrain_root"]
        samples = image_folder_samples(root) if root else ctx.dataset.image_samples("train")
    ctx.seed_stage("pretrain")
    model = train_epochs(PretrainTrainer(ctx.cfg, ctx.rt, samples), ctx.run, ctx.rt, ctx.cfg)
    record_step(ctx, "pretrain")
    return model


add_arguments = add_run_arguments


def main(args):
    train_stage(start_run(args), "pretrain", pretrain)
