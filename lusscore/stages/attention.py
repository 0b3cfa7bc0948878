"""Train the pixel attention: M_A, theta and the prototypes, with the SwAV loss on
attention-pooled features of a frozen backbone (queue from epoch 0).

Starts from <run>/pretrain.pt; writes <run>/attention.pt holding 'backbone', 'attention',
'projection', 'prototypes' and the run config. Faithful to the reference code, the frozen
backbone's and the projection head's BN statistics keep updating (attention.freeze_bn and
attention.freeze_projection_bn: true turn that off). The reference code trains this stage with
LARC around SGD (attention.optimizer: lars, every packaged config); plain SGD with momentum
(sgd) is the other option.

With a shape prior (label.prior rc or maps) and attention.prior_weight > 0, the loss adds
prior_weight x the binary cross-entropy between each crop's channel-mean attention and the
same crop of the image's saliency map (area-averaged to the attention's size): the prior
supervises the attention, as the saliency maps do in the earlier version of the paper.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lusscore.data.views import MultiCropTransform, augment_options
from lusscore.engine import (Runtime, Trainer, make_loader, prepare_model, to_channels_last_on_cpu,
                             train_epochs, unwrap)
from lusscore.losses.pass_loss import N_LARGE, SwAVQueue, pass_losses, queue_length, queue_state
from lusscore.models.pass_models import AttentionModel, read_pretrain
from lusscore.ops.switch import ops_from_config
from lusscore.optim import LARS, cosine_schedule
from lusscore.stages.common import StageContext, add_run_arguments, record_step, start_run, train_stage
from lusscore.stages.pretrain import ImageFiles, multicrop_forward
from lusscore.stages.saliency import prior_paths, run_prior_folder
from lusscore.utils import LusscoreError

OPTIMIZERS = ("sgd", "lars")


def attention_optimizer(params, acfg: dict) -> torch.optim.Optimizer:
    """lars: LARS with trust 0.001 (apex LARC(clip=False) around SGD, as the reference code's
    main_pixel_attention.py), which scales each step to trust x lr of the weights' norm (hence
    its lr 6.0 on S50); sgd: plain SGD with momentum."""
    name = acfg["optimizer"]
    lr, wd = acfg["base_lr"], acfg["weight_decay"]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    if name == "lars":
        return LARS(params, lr=lr, momentum=0.9, weight_decay=wd)
    raise LusscoreError(f"attention.optimizer must be one of {OPTIMIZERS}, not {name!r}")


def prior_loss(mean_attention: torch.Tensor, priors: list, device) -> torch.Tensor:
    """BCE between the crops' channel-mean attention (N, h, w) and their saliency crops
    [(B, S, S) per crop], area-averaged to (h, w)."""
    target = torch.cat(priors).to(device, non_blocking=True).float()[:, None]
    target = F.adaptive_avg_pool2d(target, mean_attention.shape[-2:])[:, 0]
    return F.binary_cross_entropy(mean_attention.float().clamp(1e-6, 1 - 1e-6), target)


class AttentionTrainer(Trainer):
    """The SwAV loss on attention-pooled features of the frozen pretrained backbone; the
    queue (attention.queue_length) is used from epoch 0."""

    name = "attention"

    def __init__(self, cfg: dict, rt: Runtime, samples, pretrain_state: dict | None,
                 priors: list | None = None):
        """priors: a saliency map per sample, supervising the attention (prior_weight)."""
        acfg, pcfg = cfg["attention"], cfg["pretrain"]
        self.pcfg, self.rt = pcfg, rt
        self.prior_weight = float(acfg["prior_weight"]) if priors is not None else 0.0
        crop = acfg["crop"] or pcfg["crops"]["sizes"][0]
        transform = MultiCropTransform([crop], [N_LARGE], [acfg["min_scale"]], [1.0],
                                       std_quirk=pcfg["std_quirk"],
                                       **augment_options(pcfg["augment"]))
        per_rank = max(1, acfg["batch_size"] // rt.world_size)
        dataset = ImageFiles(samples, transform, priors if self.prior_weight > 0 else None)
        self.loader = make_loader(dataset, per_rank, rt, int(cfg["seed"]),
                                  workers=cfg["data"]["workers"], collate_fn=transform.collate)
        core = AttentionModel(cfg)
        if pretrain_state is not None:
            core.load_pretrain(pretrain_state)
        self.model = prepare_model(core, rt)
        self.core = unwrap(self.model)
        to_channels_last_on_cpu(self.core.backbone, rt)
        self.optimizer = attention_optimizer([p for p in core.parameters() if p.requires_grad], acfg)
        self.epochs = int(acfg["epochs"])
        self.lrs = cosine_schedule(acfg["base_lr"], acfg["final_lr"], self.epochs * len(self.loader))
        length = queue_length(acfg["queue_length"], rt, per_rank)
        self.queue = SwAVQueue(length, cfg["model"]["feat_dim"], rt.device) if length > 0 else None

    def loss(self, batch):
        supervised = self.prior_weight > 0
        out, bs = multicrop_forward(self.model, self.core, batch, self.rt, with_attention=supervised)
        loss, parts = pass_losses(out, bs, N_LARGE, {"swav": 1.0}, self.pcfg, self.queue,
                                  self.core.prototypes.weight)
        if not supervised:
            return loss, {}, bs
        parts["prior"] = prior_loss(out["mean_attention"], batch.priors, self.rt.device)
        return loss + self.prior_weight * parts["prior"], parts, bs

    def state(self) -> dict:
        return {"backbone": self.core.backbone.state_dict(),
                "attention": self.core.attention.state_dict(), **queue_state(self.queue, self.rt)}

    def load(self, state: dict) -> None:
        if self.queue is not None and state.get("queue") is not None:
            self.queue.load(state, self.rt)


@ops_from_config
def train_attention(ctx: StageContext, samples=None) -> AttentionModel:
    """Train (or resume) <run>/attention.pt from <run>/pretrain.pt on samples (default: the
    train split)."""
    samples = ctx.dataset.image_samples("train") if samples is None else samples
    pretrain_state = read_pretrain(ctx.run.checkpoint("pretrain"))
    priors = None
    if ctx.cfg["label"]["prior"] != "none" and ctx.cfg["attention"]["prior_weight"] > 0:
        folder = run_prior_folder(ctx, "train")
        priors = prior_paths(ctx.dataset, "train", folder, [p for p, _ in samples])
    ctx.seed_stage("attention")
    model = train_epochs(AttentionTrainer(ctx.cfg, ctx.rt, samples, pretrain_state, priors),
                         ctx.run, ctx.rt, ctx.cfg)
    record_step(ctx, "attention")
    return model


add_arguments = add_run_arguments


def main(args):
    train_stage(start_run(args), "attention", train_attention)
