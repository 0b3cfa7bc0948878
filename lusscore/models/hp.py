"""HP's heads on a frozen backbone (Seong et al., CVPR 2023).

- HPHead, the segmentation head S (STEGO's): a linear 1x1 map plus a two-layer ReLU MLP of
  1x1 convolutions, summed; its momentum (EMA) copy S' gives the task-specific features.
- HPProjection, the projection Z: a 1x1 linear map whose output is L2-normalised per pixel
  (the codes z of the contrastive loss).
- ClusterProbe: K centroids on the sphere, trained online on the detached codes (spherical
  k-means by gradient: each code pulls its nearest centroid); its argmax is the prediction.
- HPLinearProbe: a 1x1 linear classifier on the frozen backbone and head, trained on labelled
  pixels (HP's linear probe, a diagnostic of the codes).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class HPHead(nn.Module):
    def __init__(self, in_channels: int, dim: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.linear = nn.Conv2d(in_channels, dim, 1)
        self.mlp = nn.Sequential(nn.Conv2d(in_channels, in_channels, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(in_channels, dim, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.dropout(features)
        return self.linear(features) + self.mlp(features)


class HPProjection(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Conv2d(dim, dim, 1)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(s), dim=1)


class ClusterProbe(nn.Module):
    def __init__(self, dim: int, clusters: int):
        super().__init__()
        self.centroids = nn.Parameter(torch.randn(clusters, dim))

    def logits(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, dim, h, w) -> (B, K, h, w) cosine similarities to the centroids."""
        return torch.einsum("bchw,kc->bkhw", F.normalize(codes, dim=1),
                            F.normalize(self.centroids, dim=1))

    def loss(self, codes: torch.Tensor) -> torch.Tensor:
        """Minus the mean cosine of each (detached) code to its nearest centroid."""
        return -self.logits(codes.detach()).max(1).values.mean()


class HPModel(nn.Module):
    """What HP trains (the backbone stays outside, frozen): S, its EMA copy S', Z and the
    cluster probe."""

    def __init__(self, in_channels: int, dim: int, clusters: int, dropout: float = 0.1):
        super().__init__()
        self.head = HPHead(in_channels, dim, dropout)
        self.projection = HPProjection(dim)
        self.ema_head = copy.deepcopy(self.head).requires_grad_(False)
        self.probe = ClusterProbe(dim, clusters)

    @torch.no_grad()
    def update_ema(self, momentum: float) -> None:
        for ema, online in zip(self.ema_head.parameters(), self.head.parameters()):
            ema.mul_(momentum).add_(online.detach(), alpha=1 - momentum)

    def train(self, mode: bool = True):
        super().train(mode)
        self.ema_head.eval()  # no dropout in the reference features
        return self


class HPPredictor(nn.Module):
    """Frozen backbone -> S -> cluster probe: (B, 3, H, W) -> (B, K, h, w) logits whose
    argmax is the predicted id (the centroids ordered so that id 0 is 'other')."""

    def __init__(self, backbone: nn.Module, model: HPModel, order: list[int]):
        super().__init__()
        self.backbone, self.head, self.probe = backbone, model.head, model.probe
        self.register_buffer("order", torch.as_tensor(order, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe.logits(self.head(self.backbone(x)))[:, self.order]


class HPLinearProbe(nn.Module):
    """Frozen backbone -> frozen S -> a trainable 1x1 linear map to `classes` logits:
    (B, 3, H, W) -> (B, classes, h, w). The frozen parts stay in eval mode (no dropout)."""

    def __init__(self, backbone: nn.Module, head: HPHead, dim: int, classes: int):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.head = head.requires_grad_(False)
        self.linear = nn.Conv2d(dim, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            codes = self.head(self.backbone(x))
        return self.linear(codes.float())

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        self.head.eval()
        return self
