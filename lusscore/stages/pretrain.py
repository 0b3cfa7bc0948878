"""Representation learning from scratch: SwAV + pixel-to-pixel (P2P) + deep-to-shallow (D2S).

Loss = w_swav * L_swav + w_d2s * L_d2s + w_p2p * L_p2p (1/2, 1/2, 1 by default; a weight of 0
switches a part off, for ablations). Writes <run>/pretrain.pt with the backbone and heads.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from lusscore.data.label_io import read_image
from lusscore.data.views import MultiCropTransform, augment_options, collate_multicrop
from lusscore.engine import (
    JsonlLog,
    Runtime,
    StageCheckpoint,
    autocast,
    make_loader,
    prepare_model,
    set_lr,
    unwrap,
)
from lusscore.losses.p2p import P2PLoss
from lusscore.losses.swav import Prototypes, sinkhorn, swapped_prediction_loss
from lusscore.models import D2SHead, ProjectionHead, ResNetTrunk
from lusscore.ops.switch import ops_from_config
from lusscore.optim import LARS, cosine_schedule
from lusscore.stages.common import add_run_arguments, dataset_of, run_training_stage

N_LARGE = 2  # codes come from the two large crops


class ImageFiles(Dataset):
    """Images (and their folder class ids) through a transform, e.g. MultiCropTransform."""

    def __init__(self, samples: list[tuple[Path, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(read_image(path)), label


class PASSPretrainModel(nn.Module):
    """Backbone + SwAV projection and prototypes + optional D2S and P2P branches."""

    def __init__(self, model_cfg: dict, weights: dict, p2p_lattice: int = 7):
        super().__init__()
        self.backbone = ResNetTrunk(model_cfg["arch"], width=model_cfg.get("width", 64),
                                    output_stride=model_cfg.get("output_stride", 32))
        c3, c4 = self.backbone.stage3_channels, self.backbone.stage4_channels
        hidden, dim = model_cfg["hidden_mlp"], model_cfg["feat_dim"]
        self.projection = ProjectionHead(c4, hidden, dim)
        self.prototypes = Prototypes(dim, model_cfg["num_prototypes"])
        self.d2s = D2SHead(c3, c4, hidden, dim) if weights.get("d2s", 0) > 0 else None
        self.p2p = (P2PLoss(c4, hidden_dim=hidden, out_dim=dim, size=p2p_lattice)
                    if weights.get("p2p", 0) > 0 else None)

    def forward(self, groups: list[torch.Tensor]) -> dict:
        """groups: crops concatenated per resolution (MultiCropBatch.by_size())."""
        emb, d2s, stage4 = [], [], []
        for x in groups:
            maps = self.backbone(x)
            emb.append(F.normalize(self.projection(maps["stage4"].mean(dim=(2, 3))), dim=1))
            if self.d2s is not None:
                d2s.append(self.d2s(maps["stage3"]))
            stage4.append(maps["stage4"])
        emb = torch.cat(emb)
        out = {"embedding": emb, "scores": self.prototypes(emb), "large_maps": stage4[0]}
        if self.d2s is not None:
            # Scores against the detached prototypes: D2S trains the shallow layers only.
            out["d2s_scores"] = F.linear(torch.cat(d2s), self.prototypes.weight.detach())
        return out


class SwAVQueue:
    """Per large crop, a FIFO of the last embeddings (SwAV's queue), used once it is full."""

    def __init__(self, length: int, dim: int, device):
        self.tensor = torch.zeros(N_LARGE, length, dim, device=device)
        self.in_use = False

    @torch.no_grad()
    def codes_input(self, crop: int, scores: torch.Tensor, embedding: torch.Tensor,
                    prototypes: torch.Tensor) -> torch.Tensor:
        """As SwAV: scores of the queued embeddings (before this batch) + this batch's; then push."""
        q = self.tensor[crop]
        if self.in_use or not torch.all(q[-1] == 0):
            self.in_use = True
            scores = torch.cat([q @ prototypes.t(), scores])
        bs = embedding.shape[0]
        q[bs:] = q[:-bs].clone()
        q[:bs] = embedding
        return scores

    def state(self, rt: Runtime) -> dict:
        """Every rank's queue (gathered) for the checkpoint."""
        parts = [self.tensor.clone()]
        if rt.distributed:
            parts = [torch.empty_like(self.tensor) for _ in range(rt.world_size)]
            torch.distributed.all_gather(parts, self.tensor)
        return {"queue": torch.stack(parts).cpu(), "queue_in_use": self.in_use}

    def load(self, state: dict, rt: Runtime) -> None:
        self.tensor.copy_(state["queue"][rt.rank])
        self.in_use = bool(state["queue_in_use"])


def queue_state(queue: SwAVQueue | None, rt: Runtime) -> dict:
    return queue.state(rt) if queue is not None else {"queue": None, "queue_in_use": False}


def pass_losses(out: dict, batch_size: int, n_crops: int, weights: dict, pcfg: dict,
                queue: SwAVQueue | None, prototypes: torch.Tensor) -> tuple[torch.Tensor, dict]:
    bs = batch_size
    scores = [s for s in out["scores"].float().split(bs)]
    emb = out["embedding"].float().split(bs)
    codes: list = [None] * n_crops
    for c in range(N_LARGE):
        s = scores[c].detach()
        if queue is not None:
            s = queue.codes_input(c, s, emb[c].detach(), prototypes.float())
        codes[c] = sinkhorn(s, pcfg["epsilon"], pcfg["sinkhorn_iterations"])[-bs:]
    temp = pcfg["temperature"]
    parts = {"swav": swapped_prediction_loss(scores, codes, temp)}
    if "d2s_scores" in out:
        parts["d2s"] = swapped_prediction_loss(list(out["d2s_scores"].float().split(bs)), codes, temp)
    total = sum(weights.get(k, 0.0) * v for k, v in parts.items())
    return total, parts


def multicrop_forward(model, core, batch, rt: Runtime):
    """One SwAV-style forward of a multi-crop batch: prototypes re-normalised first, crops of
    each size as one group on the device. -> (model output, images per crop)."""
    core.prototypes.normalize_()
    groups = [g.to(rt.device, non_blocking=True) for g in batch.by_size()]
    with autocast(rt):
        out = model(groups)
    return out, batch.images[0].shape[0]


def add_p2p(model: PASSPretrainModel, out: dict, batch, bs: int, weights: dict, total, parts):
    if model.p2p is None:
        return total
    maps = out["large_maps"]
    z1, z2 = maps[:bs], maps[bs:2 * bs]
    parts["p2p"] = model.p2p(z1.float(), z2.float(), batch.boxes[0], batch.boxes[1],
                             batch.flips[0], batch.flips[1])
    return total + weights["p2p"] * parts["p2p"]


@ops_from_config
def pretrain(cfg: dict, run_dir: Path, rt: Runtime, samples: list[tuple[Path, int]]) -> nn.Module:
    pcfg, mcfg = cfg["pretrain"], cfg["model"]
    seed = int(cfg.get("seed", 0))
    weights = dict(pcfg.get("loss_weights", {"swav": 0.5, "d2s": 0.5, "p2p": 1.0}))
    crops = pcfg["crops"]
    transform = MultiCropTransform(crops["sizes"], crops["counts"], crops["min_scale"],
                                   crops["max_scale"], std_quirk=pcfg.get("std_quirk", True),
                                   **augment_options(pcfg.get("augment")))
    n_crops = sum(crops["counts"])
    per_rank = max(1, pcfg["batch_size"] // rt.world_size)
    loader = make_loader(ImageFiles(samples, transform), per_rank, rt, seed,
                         workers=cfg["data"].get("workers", 0), collate_fn=collate_multicrop)
    model = prepare_model(PASSPretrainModel(mcfg, weights, pcfg.get("p2p_lattice", 7)), rt)
    core = unwrap(model)
    optimizer = LARS(model.parameters(), lr=pcfg["base_lr"], momentum=0.9,
                     weight_decay=pcfg.get("weight_decay", 1e-6))
    epochs, iters = int(pcfg["epochs"]), len(loader)
    lrs = cosine_schedule(pcfg["base_lr"], pcfg["final_lr"], epochs * iters,
                          warmup_iters=int(pcfg.get("warmup_epochs", 0) * iters))
    queue_len = int(pcfg.get("queue_length", 0)) // rt.world_size
    queue_len -= queue_len % per_rank
    ck = StageCheckpoint(run_dir, "pretrain", rt, cfg)
    log = JsonlLog(run_dir / "pretrain.jsonl", rt)
    start, queue = 0, None
    state = ck.load()
    if state is not None:
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"]
        if state.get("queue") is not None:
            queue = SwAVQueue(queue_len, mcfg["feat_dim"], rt.device)
            queue.load(state, rt)
    for epoch in range(start, epochs):
        loader.sampler.set_epoch(epoch)
        if queue is None and queue_len > 0 and epoch >= pcfg.get("epoch_queue_starts", 0):
            queue = SwAVQueue(queue_len, mcfg["feat_dim"], rt.device)
        model.train()
        bar = tqdm(loader, desc=f"pretrain {epoch + 1}/{epochs}", disable=not rt.is_main, leave=False)
        for it, batch in enumerate(bar):
            t0 = time.perf_counter()
            step = epoch * iters + it
            set_lr(optimizer, lrs[step])
            out, bs = multicrop_forward(model, core, batch, rt)
            total, parts = pass_losses(out, bs, n_crops, weights, pcfg, queue, core.prototypes.weight)
            total = add_p2p(core, out, batch, bs, weights, total, parts)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if step < pcfg.get("freeze_prototypes_iters", 0):
                core.prototypes.weight.grad = None
            optimizer.step()
            rate = bs * rt.world_size / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{total.item():.3f}", img_s=f"{rate:.0f}")
            log.write(stage="pretrain", epoch=epoch, iter=step, loss=total.item(), lr=lrs[step],
                      img_s=rate, **{f"loss_{k}": v.item() for k, v in parts.items()})
        ck.save({"model": core.state_dict(), "backbone": core.backbone.state_dict(),
                 "optimizer": optimizer.state_dict(), "epoch": epoch + 1, **queue_state(queue, rt)},
                done=epoch + 1 == epochs)
    return core


add_arguments = add_run_arguments


def main(args):
    run_training_stage(args, "pretrain", lambda cfg, run_dir, rt: pretrain(
        cfg, run_dir, rt, dataset_of(cfg).image_samples("train")))
