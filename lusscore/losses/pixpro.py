"""PixPro's pixel-to-propagation consistency (Xie et al., CVPR 2021): L_e of PASS_p.

Each large crop's stage-4 map goes through a pixel projector (1x1 conv MLP) in the online
network and in a momentum (EMA) copy of backbone and projector. The pixel propagation module
(PPM) turns the online projection x into y_i = sum_j max(cos(x_i, x_j), 0)^gamma g(x_j), g a
1x1 conv (transform_layers 1; 0: identity, 2: conv-BN-ReLU-conv). Positives are the pixel
pairs of the two views whose bin centres, in original-image pixels, lie closer than
`threshold` bin diagonals; the loss is -2 mean_pairs cos(y_i, x'_j) per direction, x' the
momentum projection, summed over both directions (PixPro's regression loss).

The geometry comes from the crop records P2P uses (MultiCropTransform's boxes and flips), in
pixels rather than PixPro's per-axis normalised coordinates, so distances are isotropic on
non-square images. At stage-4 sizes the mask and the propagation are small batched matmuls
(B x hw x hw), so they stay in PyTorch; lusscore/reference/pixpro.py holds their per-pixel
loop twins that the tests compare with.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

TRANSFORM_LAYERS = (0, 1, 2)


def bin_centres(boxes: torch.Tensor, flips: torch.Tensor, h: int, w: int):
    """Original-image centres of an (h, w) map's bins for crops (B, 4) = (left, top, width,
    height) in pixels, mirrored ones read right to left. -> (cx, cy) each (B, h*w), and the
    bin diagonal (B)."""
    boxes = boxes.to(torch.float32)
    left, top, width, height = boxes.unbind(1)
    bin_w, bin_h = width / w, height / h
    xs = torch.arange(w, dtype=torch.float32, device=boxes.device) + 0.5
    ys = torch.arange(h, dtype=torch.float32, device=boxes.device) + 0.5
    cx = left[:, None] + xs[None] * bin_w[:, None]                       # (B, w)
    cx = torch.where(flips.to(boxes.device)[:, None].bool(), 2 * left[:, None] + width[:, None] - cx, cx)
    cy = top[:, None] + ys[None] * bin_h[:, None]                        # (B, h)
    cx = cx[:, None, :].expand(-1, h, -1).reshape(len(boxes), h * w)
    cy = cy[:, :, None].expand(-1, -1, w).reshape(len(boxes), h * w)
    return cx, cy, torch.sqrt(bin_w ** 2 + bin_h ** 2)


def pixpro_positive_mask(boxes1: torch.Tensor, flips1: torch.Tensor, boxes2: torch.Tensor,
                         flips2: torch.Tensor, h: int, w: int, threshold: float = 0.7) -> torch.Tensor:
    """(B, h*w, h*w) float mask: 1 where bin i of view 1 and bin j of view 2 lie closer than
    threshold x the larger of the two views' bin diagonals."""
    x1, y1, d1 = bin_centres(boxes1, flips1, h, w)
    x2, y2, d2 = bin_centres(boxes2, flips2, h, w)
    dist = torch.sqrt((x1[:, :, None] - x2[:, None, :]) ** 2 + (y1[:, :, None] - y2[:, None, :]) ** 2)
    return (dist / torch.maximum(d1, d2)[:, None, None] < threshold).float()


def pixpro_regression_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-2 x the mean over images of the mean cosine over positive pairs (an image without
    positive pairs counts 0): pred, target (B, C, h, w), mask (B, h*w, h*w)."""
    p = F.normalize(pred.flatten(2), dim=1)
    t = F.normalize(target.flatten(2), dim=1)
    cos = torch.bmm(p.transpose(1, 2), t)                                # (B, hw, hw)
    per_image = (cos * mask).sum(dim=(1, 2)) / (mask.sum(dim=(1, 2)) + 1e-6)
    return -2 * per_image.mean()


def projector(in_channels: int, hidden: int, out_dim: int) -> nn.Sequential:
    """PixPro's pixel projector: 1x1 conv - BN - ReLU - 1x1 conv."""
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.BatchNorm2d(hidden),
                         nn.ReLU(inplace=True), nn.Conv2d(hidden, out_dim, 1))


class PixelPropagation(nn.Module):
    """The PPM: y_i = sum_j s(x_i, x_j) g(x_j) with s = max(cos, 0)^gamma; g normalised per
    pixel, as PixPro."""

    def __init__(self, dim: int, gamma: float = 2.0, transform_layers: int = 1):
        super().__init__()
        if transform_layers not in TRANSFORM_LAYERS:
            raise ValueError(f"transform_layers must be one of {TRANSFORM_LAYERS}, got {transform_layers}")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.gamma = float(gamma)
        self.transform = (nn.Identity() if transform_layers == 0 else nn.Conv2d(dim, dim, 1)
                          if transform_layers == 1 else projector(dim, dim, dim))

    def similarity(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, hw, hw) = max(cos(x_i, x_j), 0)^gamma."""
        u = F.normalize(x.flatten(2), dim=1)
        s = torch.bmm(u.transpose(1, 2), u).clamp_min(0)
        # gamma < 1 has an infinite slope at 0: PixPro shifts the base off it.
        return (s + 1e-6 if self.gamma < 1 else s) ** self.gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        value = F.normalize(self.transform(x).flatten(2), dim=1)         # (B, C, hw)
        return torch.bmm(value, self.similarity(x).transpose(1, 2)).view(b, c, h, w)


def momentum_at(base: float, step: int, total_steps: int) -> float:
    """PixPro's EMA momentum: from base up to 1 on a cosine over the training steps."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2


class PixProBranch(nn.Module):
    """The online pixel projector and PPM, and the momentum copies of the backbone and the
    projector (no gradients; updated by `momentum_update` after each optimizer step)."""

    def __init__(self, backbone: nn.Module, in_channels: int, hidden: int, dim: int,
                 gamma: float = 2.0, transform_layers: int = 1, threshold: float = 0.7,
                 momentum: float = 0.99):
        super().__init__()
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        self.projector = projector(in_channels, hidden, dim)
        self.propagation = PixelPropagation(dim, gamma, transform_layers)
        self.momentum_backbone = copy.deepcopy(backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in (*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()):
            p.requires_grad_(False)
        self.threshold, self.momentum = float(threshold), float(momentum)

    @torch.no_grad()
    def momentum_update(self, backbone: nn.Module, step: int, total_steps: int) -> None:
        """EMA of the online backbone and projector into the momentum copies (PixPro's
        schedule); buffers (BN statistics) stay the momentum network's own."""
        m = momentum_at(self.momentum, step, total_steps)
        for online, target in ((backbone, self.momentum_backbone),
                               (self.projector, self.momentum_projector)):
            for p, q in zip(online.parameters(), target.parameters()):
                q.mul_(m).add_(p.detach(), alpha=1 - m)

    def loss(self, online_maps: torch.Tensor, large_images: torch.Tensor, boxes, flips) -> torch.Tensor:
        """online_maps: stage-4 maps (2B, L, h, w) of the two large crops (view 1 then view 2),
        large_images: those crops (2B, 3, S, S) for the momentum network; boxes, flips: the
        two crops' records. The symmetric PixPro loss."""
        with torch.no_grad():
            target = self.momentum_projector(self.momentum_backbone(large_images)["stage4"].float())
        pred = self.propagation(self.projector(online_maps.float()))
        b, (h, w) = len(boxes[0]), online_maps.shape[2:]
        mask = pixpro_positive_mask(boxes[0], flips[0], boxes[1], flips[1], h, w, self.threshold)
        return (pixpro_regression_loss(pred[:b], target[b:], mask)
                + pixpro_regression_loss(pred[b:], target[:b], mask.transpose(1, 2)))
