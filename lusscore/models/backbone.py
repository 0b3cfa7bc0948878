"""Backbones for the label stages (a ResNet trunk giving the stage-4 map) and the loader of
the attention-stage checkpoint."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lusscore.models.pixel_attention import PixelAttention
from lusscore.models.resnet import ARCHS, ResNetTrunk
from lusscore.utils import LusscoreError, atomic_path

def resnet_backbone(arch: str, width: int = 64, output_stride: int = 32) -> nn.Module:
    """A randomly initialised ResNet trunk mapping images (B, 3, H, W) to its stage-4 map
    (B, L, H/s, W/s), with `out_channels` = L; its state_dict keys are torchvision's
    (conv1.*, layer1.*, ...)."""
    if arch not in ARCHS:
        raise LusscoreError(f"unknown backbone {arch!r}; one of {sorted(ARCHS)}")
    return ResNetTrunk(arch, width=width, output_stride=output_stride, stage4_only=True)


def model_section(config: dict) -> dict:
    """The backbone keys of a checkpoint config: a run config's `model` section, or the
    flat form {'arch', 'width'?, 'output_stride'?, 'attention'?}."""
    return config.get("model", config)


def build_attention(config: dict, channels: int) -> PixelAttention:
    cfg = config.get("attention", {}) or {}
    return PixelAttention(channels, hidden=cfg.get("hidden"), upsample=cfg.get("upsample", 4),
                          pool_features=cfg.get("pool_features", "normalized"),
                          shared=cfg.get("shared", False))


def save_attention_checkpoint(path: str | os.PathLike, backbone: nn.Module,
                              attention: PixelAttention, config: dict) -> None:
    """{'backbone', 'attention', 'config'}, written to a temporary file and renamed."""
    with atomic_path(path) as tmp:
        torch.save({"backbone": backbone.state_dict(), "attention": attention.state_dict(),
                    "config": dict(config)}, tmp)


def load_attention_checkpoint(path: str | os.PathLike, map_location="cpu"):
    """-> (backbone, attention, config) from a checkpoint holding {'backbone': state_dict,
    'attention': state_dict, 'config': {'arch': 'resnet50', 'attention': {...}, ...}}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise LusscoreError(f"{path}: cannot read the checkpoint ({e})") from None
    missing = [k for k in ("backbone", "attention", "config") if k not in ckpt]
    if missing:
        raise LusscoreError(f"{path}: the checkpoint lacks {missing} "
                            "(expected {'backbone', 'attention', 'config'})")
    config = dict(ckpt["config"])
    model = model_section(config)
    arch = model.get("arch")
    if arch is None:
        raise LusscoreError(f"{path}: config has no 'arch' (e.g. 'resnet50')")
    backbone = resnet_backbone(arch, model.get("width", 64), model.get("output_stride", 32))
    attention = build_attention(config, backbone.out_channels)
    for name, module, state in (("backbone", backbone, ckpt["backbone"]),
                                ("attention", attention, ckpt["attention"])):
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise LusscoreError(f"{path}: the {name} weights do not fit {arch}: {e}") from None
    return backbone, attention, config
