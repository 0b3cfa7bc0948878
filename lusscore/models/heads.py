"""Heads of PASS: SwAV projection, deep-to-shallow (D2S) branch, segmentation head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """Linear-BN-ReLU-Linear-BN(no affine): the SwAV projection MLP of PASS."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out_dim), nn.BatchNorm1d(out_dim, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class D2SHead(nn.Module):
    """A shallow stage's map -> 1x1-conv MLP -> global pool -> projection MLP -> L2 (unit
    vectors)."""

    def __init__(self, in_channels: int, mid_channels: int, hidden: int, out_dim: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True))
        self.project = ProjectionHead(mid_channels, hidden, out_dim)

    def forward(self, shallow: torch.Tensor) -> torch.Tensor:
        pooled = self.conv(shallow).mean(dim=(2, 3))
        return F.normalize(self.project(pooled), dim=1)


class SegmentationHead(nn.Module):
    """1x1 conv to K+1 logits (0 = other) on the stage-4 map."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Conv2d(in_channels, num_classes + 1, 1)

    def forward(self, stage4: torch.Tensor) -> torch.Tensor:
        return self.classifier(stage4)
