"""Train the pixel attention: M_A, theta and the prototypes, with the SwAV loss on
attention-pooled features of a frozen backbone (queue from epoch 0).

Starts from <run>/pretrain.pt; writes <run>/attention.pt holding 'backbone', 'attention',
'projection', 'prototypes' and the run config. Faithful to the reference code, the frozen
backbone's and the projection head's BN statistics keep updating (attention.freeze_bn and
attention.freeze_projection_bn: true turn that off), and the optimizer is plain SGD with
momentum (attention.optimizer: sgd; lars is the pretrain optimizer).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lusscore.checkpoint import load_checkpoint
from lusscore.data.views import MultiCropTransform, augment_options, collate_multicrop
from lusscore.engine import (
    JsonlLog,
    Runtime,
    StageCheckpoint,
    make_loader,
    prepare_model,
    set_lr,
    unwrap,
)
from lusscore.losses.swav import Prototypes
from lusscore.models import ProjectionHead, ResNetTrunk
from lusscore.models.pixel_attention import PixelAttention
from lusscore.ops.switch import ops_from_config
from lusscore.optim import LARS, cosine_schedule
from lusscore.stages.common import add_run_arguments, dataset_of, run_training_stage
from lusscore.stages.pretrain import ImageFiles, SwAVQueue, multicrop_forward, pass_losses, queue_state
from lusscore.utils import LusscoreError


class AttentionModel(nn.Module):
    """Frozen backbone + projection; trainable PixelAttention and prototypes."""

    def __init__(self, cfg: dict):
        super().__init__()
        mcfg, acfg = cfg["model"], cfg.get("attention", {})
        self.backbone = ResNetTrunk(mcfg["arch"], width=mcfg.get("width", 64),
                                    output_stride=mcfg.get("output_stride", 32))
        c4 = self.backbone.stage4_channels
        self.projection = ProjectionHead(c4, mcfg["hidden_mlp"], mcfg["feat_dim"])
        self.prototypes = Prototypes(mcfg["feat_dim"], mcfg["num_prototypes"])
        self.attention = PixelAttention(c4, hidden=acfg.get("hidden"), upsample=acfg.get("upsample", 4),
                                        pool_features=acfg.get("pool_features", "normalized"))
        self.freeze_bn = bool(acfg.get("freeze_bn", False))
        self.freeze_projection_bn = bool(acfg.get("freeze_projection_bn", False))
        for module in (self.backbone, self.projection):
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        # As the reference code (model.train()), the frozen head's BNs normalise with batch
        # statistics: the pooled normalised features are on another scale than the
        # pretrain's mean-pooled raw map, so its running statistics would not fit them.
        if self.freeze_projection_bn:
            self.projection.eval()
        if self.freeze_bn:
            self.backbone.eval()
        return self

    def forward(self, groups: list[torch.Tensor]) -> dict:
        emb = []
        for x in groups:
            with torch.no_grad():
                z = self.backbone(x)["stage4"]
            pooled = self.attention(z, return_attention=False)
            emb.append(F.normalize(self.projection(pooled.float()), dim=1))
        emb = torch.cat(emb)
        return {"embedding": emb, "scores": self.prototypes(emb)}

    def load_pretrain(self, state: dict) -> None:
        model = state["model"]
        for name in ("backbone", "projection", "prototypes"):
            sub = {k[len(name) + 1:]: v for k, v in model.items() if k.startswith(name + ".")}
            if not sub:
                raise LusscoreError(f"the pretrain checkpoint has no {name} weights")
            getattr(self, name).load_state_dict(sub)


OPTIMIZERS = ("sgd", "lars")


def attention_optimizer(params, acfg: dict) -> torch.optim.Optimizer:
    """Plain SGD with momentum, as the reference code's attention stage (attention.optimizer:
    sgd, the default). LARS (trust 0.001, the pretrain optimizer) scales each step to ~0.1% of
    the weights' norm times the lr, which leaves the freshly initialised M_A almost untouched."""
    name = acfg.get("optimizer", "sgd")
    lr, wd = acfg["base_lr"], acfg.get("weight_decay", 1e-6)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    if name == "lars":
        return LARS(params, lr=lr, momentum=0.9, weight_decay=wd)
    raise LusscoreError(f"attention.optimizer must be one of {OPTIMIZERS}, not {name!r}")


@ops_from_config
def train_attention(cfg: dict, run_dir: Path, rt: Runtime, samples) -> AttentionModel:
    acfg, pcfg = cfg["attention"], cfg["pretrain"]
    seed = int(cfg.get("seed", 0))
    crop = acfg.get("crop", pcfg["crops"]["sizes"][0])
    transform = MultiCropTransform([crop], [2], [acfg.get("min_scale", 0.14)], [1.0],
                                   std_quirk=pcfg.get("std_quirk", True),
                                   **augment_options(pcfg.get("augment")))
    per_rank = max(1, acfg["batch_size"] // rt.world_size)
    loader = make_loader(ImageFiles(samples, transform), per_rank, rt, seed,
                         workers=cfg["data"].get("workers", 0), collate_fn=collate_multicrop)
    core = AttentionModel(cfg)
    pretrain_ck = run_dir / "pretrain.pt"
    if not pretrain_ck.is_file():
        raise LusscoreError(f"{pretrain_ck} not found: run `luss pretrain` first")
    core.load_pretrain(load_checkpoint(pretrain_ck))
    model = prepare_model(core, rt)
    trainable = [p for p in core.parameters() if p.requires_grad]
    optimizer = attention_optimizer(trainable, acfg)
    epochs, iters = int(acfg["epochs"]), len(loader)
    lrs = cosine_schedule(acfg["base_lr"], acfg["final_lr"], epochs * iters)
    queue_len = int(acfg.get("queue_length", 0)) // rt.world_size
    queue_len -= queue_len % per_rank
    queue = SwAVQueue(queue_len, cfg["model"]["feat_dim"], rt.device) if queue_len > 0 else None
    ck = StageCheckpoint(run_dir, "attention", rt, cfg)
    log = JsonlLog(run_dir / "attention.jsonl", rt)
    start = 0
    state = ck.load()
    if state is not None:
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"]
        if queue is not None and state.get("queue") is not None:
            queue.load(state, rt)
    for epoch in range(start, epochs):
        loader.sampler.set_epoch(epoch)
        model.train()
        bar = tqdm(loader, desc=f"attention {epoch + 1}/{epochs}", disable=not rt.is_main, leave=False)
        for it, batch in enumerate(bar):
            t0 = time.perf_counter()
            step = epoch * iters + it
            set_lr(optimizer, lrs[step])
            out, bs = multicrop_forward(model, core, batch, rt)
            loss, _ = pass_losses(out, bs, 2, {"swav": 1.0}, pcfg, queue, core.prototypes.weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rate = bs * rt.world_size / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}")
            log.write(stage="attention", epoch=epoch, iter=step, loss=loss.item(), lr=lrs[step], img_s=rate)
        ck.save({"model": core.state_dict(), "backbone": core.backbone.state_dict(),
                 "attention": core.attention.state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": epoch + 1, **queue_state(queue, rt)},
                done=epoch + 1 == epochs)
    return unwrap(model)


add_arguments = add_run_arguments


def main(args):
    run_training_stage(args, "attention", lambda cfg, run_dir, rt: train_attention(
        cfg, run_dir, rt, dataset_of(cfg).image_samples("train")))
