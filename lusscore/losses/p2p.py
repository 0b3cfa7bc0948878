"""P2P: the non-contrastive pixel-to-pixel loss of PASS.

The pixel MLP M_p (1x1 convs) maps each view's stage-4 map; overlap_gather samples both on
the S x S lattice spanning the two crops' overlap; the pixel predictor P (1x1 convs) maps
each lattice; the loss is -1/2 [cos(P(v1), sg(v2)) + cos(P(v2), sg(v1))] per lattice point.
Reduction: mean over every pair's lattice (faithful to the reference code: pairs without
overlap have zero features and count as zero), or over valid pairs only (valid_only=True).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lusscore.ops.overlap_gather import overlap_gather


def pixel_mlp(in_channels: int, hidden_dim: int, out_dim: int, final_bn: bool) -> nn.Sequential:
    """1x1 conv - BN - ReLU - 1x1 conv (- BN without affine when final_bn)."""
    layers = [nn.Conv2d(in_channels, hidden_dim, 1), nn.BatchNorm2d(hidden_dim),
              nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, out_dim, 1)]
    if final_bn:
        layers.append(nn.BatchNorm2d(out_dim, affine=False))
    return nn.Sequential(*layers)


def p2p_cosine_loss(p1: torch.Tensor, p2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor,
                    valid: torch.Tensor | None = None, valid_only: bool = False,
                    eps: float = 1e-8) -> torch.Tensor:
    """-1/2 [cos(p1, sg(v2)) + cos(p2, sg(v1))] over the channel dim of (B, C, S, S) lattices.

    Mean over all B x S x S points, or over the valid pairs' points only (0 when none)."""
    per_point = -0.5 * (F.cosine_similarity(p1, v2.detach(), dim=1, eps=eps)
                        + F.cosine_similarity(p2, v1.detach(), dim=1, eps=eps))  # (B, S, S)
    if not valid_only:
        return per_point.mean()
    if valid is None:
        raise ValueError("p2p_cosine_loss: valid_only=True needs the valid (B) mask")
    mask = valid.to(per_point.dtype)[:, None, None]
    count = mask.sum() * per_point.shape[1] * per_point.shape[2]
    return (per_point * mask).sum() / count.clamp_min(1)


class P2PLoss(nn.Module):
    """Pixel-to-pixel loss on the overlap of two views' stage-4 maps.

    in_channels: channels of the stage-4 map (512 for ResNet-18, 2048 for ResNet-50);
    hidden_dim: width of M_p's hidden layer; out_dim: pixel embedding width;
    pred_hidden_dim: width of the predictor's hidden layer (default hidden_dim);
    size: lattice size S; cell_centers: lattice at cell centres instead of edge to edge;
    valid_only: average over overlapping pairs only instead of all pairs.
    """

    def __init__(self, in_channels: int, hidden_dim: int = 2048, out_dim: int = 128,
                 pred_hidden_dim: int | None = None, size: int = 7, cell_centers: bool = False,
                 valid_only: bool = False):
        super().__init__()
        self.pixel_mlp = pixel_mlp(in_channels, hidden_dim, out_dim, final_bn=True)
        self.predictor = pixel_mlp(out_dim, pred_hidden_dim or hidden_dim, out_dim, final_bn=False)
        self.size, self.cell_centers, self.valid_only = size, cell_centers, valid_only

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, boxes1: torch.Tensor,
                boxes2: torch.Tensor, flips1: torch.Tensor, flips2: torch.Tensor) -> torch.Tensor:
        """z1, z2: (B, L, H, W) maps of the two large crops; boxes (B, 4) and flips (B) of the
        crops as MultiCropTransform records them."""
        e1, e2 = self.pixel_mlp(z1), self.pixel_mlp(z2)
        v1, v2, valid = overlap_gather(e1, e2, boxes1, boxes2, flips1, flips2, self.size,
                                       self.cell_centers)
        p1, p2 = self.predictor(v1), self.predictor(v2)
        return p2p_cosine_loss(p1, p2, v1, v2, valid, self.valid_only)
