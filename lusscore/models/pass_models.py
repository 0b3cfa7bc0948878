"""The networks of the PASS stages and the loaders of their run checkpoints.

PASSPretrainModel: backbone + SwAV projection and prototypes + optional D2S and P2P branches.
AttentionModel: that frozen backbone and projection + trainable pixel attention and prototypes.
SegmentationModel: backbone + a (K+1)-way 1x1 head (fine-tuning, the semi protocol).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lusscore.checkpoint import load_checkpoint
from lusscore.losses.p2p import P2PLoss
from lusscore.losses.pixpro import PixProBranch
from lusscore.losses.swav import Prototypes
from lusscore.models.heads import D2SHead, ProjectionHead, SegmentationHead
from lusscore.models.pixel_attention import PixelAttention
from lusscore.models.resnet import build_trunk
from lusscore.utils import LusscoreError


class PASSPretrainModel(nn.Module):
    """Backbone + SwAV projection and prototypes + optional D2S, P2P and PixPro branches.

    D2S has one head per supervised shallow stage (d2s_stages, default {3}); as in the paper
    (Eq. 3-4) and the reference code it sees the two large crops only. pixpro (the options of
    pretrain.pixpro) adds PASS_p's PixPro branch with its momentum network."""

    def __init__(self, model_cfg: dict, weights: dict, p2p_lattice: int = 7,
                 d2s_stages=(3,), p2p: dict | None = None, pixpro: dict | None = None):
        super().__init__()
        self.backbone = build_trunk(model_cfg)
        channels = self.backbone.stage_channels
        c4 = channels[4]
        hidden, dim = model_cfg["hidden_mlp"], model_cfg["feat_dim"]
        self.projection = ProjectionHead(c4, hidden, dim)
        self.prototypes = Prototypes(dim, model_cfg["num_prototypes"])
        self.d2s = None
        if weights.get("d2s", 0) > 0:
            bad = [s for s in d2s_stages if s not in (1, 2, 3)]
            if bad or not d2s_stages:
                raise LusscoreError(f"pretrain.d2s.stages must list shallow stages among 1, 2, 3; "
                                    f"got {list(d2s_stages)}")
            self.d2s = nn.ModuleDict({f"stage{s}": D2SHead(channels[s], c4, hidden, dim)
                                      for s in d2s_stages})
        p2p = p2p or {}  # pretrain.p2p: kind, pixel_mlp, temperature (Tab 8a-b)
        self.p2p = (P2PLoss(c4, hidden_dim=hidden, out_dim=dim, size=p2p_lattice,
                            kind=p2p.get("kind", "noncontrastive"),
                            use_pixel_mlp=p2p.get("pixel_mlp", True),
                            temperature=p2p.get("temperature", 0.1))
                    if weights.get("p2p", 0) > 0 else None)
        self.pixpro = (PixProBranch(self.backbone, c4, hidden, dim, **pixpro)
                       if pixpro is not None else None)

    def forward(self, groups: list[torch.Tensor]) -> dict:
        """groups: crops concatenated per resolution (MultiCropBatch.by_size()); the first
        holds the large crops."""
        emb, stage4 = [], []
        for g, x in enumerate(groups):
            maps = self.backbone(x)
            emb.append(F.normalize(self.projection(maps["stage4"].mean(dim=(2, 3))), dim=1))
            stage4.append(maps["stage4"])
            if g == 0 and self.d2s is not None:
                # Scores against the detached prototypes: D2S trains the shallow layers only.
                shallow = {name: F.linear(head(maps[name]), self.prototypes.weight.detach())
                           for name, head in self.d2s.items()}
        emb = torch.cat(emb)
        out = {"embedding": emb, "scores": self.prototypes(emb), "large_maps": stage4[0],
               "large_images": groups[0]}
        if self.d2s is not None:
            out["d2s_scores"] = shallow  # {"stage3": (2B, K) of the two large crops, ...}
        return out


class AttentionModel(nn.Module):
    """Frozen backbone + projection; trainable PixelAttention and prototypes."""

    def __init__(self, cfg: dict):
        super().__init__()
        mcfg, acfg = cfg["model"], cfg["attention"]
        self.backbone = build_trunk(mcfg)
        c4 = self.backbone.stage4_channels
        self.projection = ProjectionHead(c4, mcfg["hidden_mlp"], mcfg["feat_dim"])
        self.prototypes = Prototypes(mcfg["feat_dim"], mcfg["num_prototypes"])
        self.attention = PixelAttention(c4, hidden=acfg["hidden"], upsample=acfg["upsample"],
                                        pool_features=acfg["pool_features"],
                                        shared=acfg["shared"])
        self.freeze_bn = bool(acfg["freeze_bn"])
        self.freeze_projection_bn = bool(acfg["freeze_projection_bn"])
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

    def forward(self, groups: list[torch.Tensor], with_attention: bool = False) -> dict:
        """with_attention: the output also holds each crop's channel-mean attention
        (N, 4h, 4w), for the prior's supervision."""
        emb, means = [], []
        for x in groups:
            with torch.no_grad():
                z = self.backbone(x)["stage4"].contiguous()  # M_A runs faster contiguous
            pooled, mean = self.attention(z, return_attention=True) if with_attention else (
                self.attention(z, return_attention=False), None)
            emb.append(F.normalize(self.projection(pooled.float()), dim=1))
            means.append(mean)
        emb = torch.cat(emb)
        out = {"embedding": emb, "scores": self.prototypes(emb)}
        if with_attention:
            out["mean_attention"] = torch.cat(means)
        return out

    def load_pretrain(self, state: dict) -> None:
        model = state["model"]
        for name in ("backbone", "projection", "prototypes"):
            sub = {k[len(name) + 1:]: v for k, v in model.items() if k.startswith(name + ".")}
            if not sub:
                raise LusscoreError(f"the pretrain checkpoint has no {name} weights")
            getattr(self, name).load_state_dict(sub)


class SegmentationModel(nn.Module):
    def __init__(self, model_cfg: dict, num_classes: int):
        super().__init__()
        self.backbone = build_trunk(model_cfg)
        self.head = SegmentationHead(self.backbone.stage4_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)["stage4"])


def read_pretrain(path: Path) -> dict:
    """The pretrain checkpoint that the later stages start from."""
    if not Path(path).is_file():
        raise LusscoreError(f"{path} not found: run `luss pretrain` first")
    return load_checkpoint(path)


def pretrained_trunk(path: Path, model_cfg: dict) -> nn.Module:
    """The stage-4 trunk of a complete pretrain checkpoint (an error for a partial one)."""
    state = read_pretrain(path)
    if not state.get("done", False):
        raise LusscoreError(f"{path} is not complete (epoch {state.get('epoch')}): finish "
                            "`luss pretrain` first")
    trunk = build_trunk(model_cfg, stage4_only=True)
    trunk.load_state_dict(state["backbone"])
    return trunk


def segmentation_model(cfg: dict, pretrain_checkpoint: Path, init: str,
                       section: str = "finetune") -> SegmentationModel:
    """A fresh SegmentationModel, its backbone from the pretrain checkpoint (init: pretrain)
    or random (init: none)."""
    model = SegmentationModel(cfg["model"], cfg["data"]["num_classes"])
    if init == "pretrain":
        if not Path(pretrain_checkpoint).is_file():
            raise LusscoreError(f"{pretrain_checkpoint} not found: run `luss pretrain` first, "
                                f"or set {section}.init=none")
        model.backbone.load_state_dict(load_checkpoint(pretrain_checkpoint)["backbone"])
    elif init != "none":
        raise LusscoreError(f"{section}.init must be 'pretrain' or 'none', not {init!r}")
    return model


def load_segmentation_checkpoint(cfg: dict, path: Path) -> SegmentationModel:
    """The trained SegmentationModel of a finetune or semi checkpoint."""
    model = SegmentationModel(cfg["model"], cfg["data"]["num_classes"])
    model.load_state_dict(load_checkpoint(path)["model"])
    return model
