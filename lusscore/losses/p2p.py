"""P2P: the non-contrastive pixel-to-pixel loss of PASS, and the alignments it is compared with.

The pixel MLP M_p (1x1 convs) maps each view's stage-4 map; overlap_gather samples both on
the S x S lattice spanning the two crops' overlap; the pixel predictor P (1x1 convs) maps
each lattice; the loss is -1/2 [cos(P(v1), sg(v2)) + cos(P(v2), sg(v1))] per lattice point.
Reduction: mean over every pair's lattice (faithful to the reference code: pairs without
overlap have zero features and count as zero), or over valid pairs only (valid_only=True).

The ablations of the paper's Tab 8a-b (pretrain.p2p): kind "contrastive" (InfoNCE: the same
lattice point of the other view is the positive, every other lattice point of the batch a
negative), "clustering" (SwAV's swapped prediction per lattice point, against the shared
prototypes), and pixel_mlp false (the lattices of the stage-4 maps themselves, no M_p).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lusscore.losses.swav import sinkhorn
from lusscore.ops.overlap_gather import overlap_gather

P2P_KINDS = ("noncontrastive", "contrastive", "clustering")


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


def _points(v: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) lattices -> (B * S * S, C) unit vectors (zero rows stay zero)."""
    return F.normalize(v.flatten(2).transpose(1, 2).reshape(-1, v.shape[1]), dim=1)


def p2p_infonce_loss(v1: torch.Tensor, v2: torch.Tensor, valid: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """Contrastive P2P: symmetric InfoNCE over the valid pairs' lattice points, the same point
    of the other view the positive (0 when no pair overlaps)."""
    a, b = _points(v1[valid]), _points(v2[valid])
    if a.shape[0] == 0:
        return v1.sum() * 0
    logits = a @ b.t() / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def p2p_swapped_loss(v1: torch.Tensor, v2: torch.Tensor, valid: torch.Tensor,
                     prototypes: torch.Tensor, temperature: float, epsilon: float,
                     iterations: int) -> torch.Tensor:
    """Clustering P2P: each lattice point's Sinkhorn codes predicted from the other view's
    point, as SwAV's swapped prediction; mean over the valid pairs' points. Every pair enters
    Sinkhorn (zero rows for pairs without overlap) so that all ranks solve equal batches."""
    a, b = _points(v1.float()), _points(v2.float())
    s1, s2 = a @ prototypes.t(), b @ prototypes.t()
    q1, q2 = (sinkhorn(s.detach(), epsilon, iterations) for s in (s1, s2))
    per_point = -0.5 * ((q1 * F.log_softmax(s2 / temperature, dim=1)).sum(1)
                        + (q2 * F.log_softmax(s1 / temperature, dim=1)).sum(1))
    mask = valid.repeat_interleave(v1.shape[2] * v1.shape[3]).to(per_point.dtype)
    return (per_point * mask).sum() / mask.sum().clamp_min(1)


class P2PLoss(nn.Module):
    """Pixel-to-pixel loss on the overlap of two views' stage-4 maps.

    in_channels: channels of the stage-4 map (512 for ResNet-18, 2048 for ResNet-50);
    hidden_dim: width of M_p's hidden layer; out_dim: pixel embedding width;
    pred_hidden_dim: width of the predictor's hidden layer (default hidden_dim);
    size: lattice size S; cell_centers: lattice at cell centres instead of edge to edge;
    valid_only: average over overlapping pairs only instead of all pairs (noncontrastive);
    kind: noncontrastive (PASS) | contrastive | clustering; use_pixel_mlp: False drops M_p;
    temperature: of the contrastive and clustering kinds.
    """

    def __init__(self, in_channels: int, hidden_dim: int = 2048, out_dim: int = 128,
                 pred_hidden_dim: int | None = None, size: int = 7, cell_centers: bool = False,
                 valid_only: bool = False, kind: str = "noncontrastive",
                 use_pixel_mlp: bool = True, temperature: float = 0.1):
        super().__init__()
        if kind not in P2P_KINDS:
            raise ValueError(f"P2P kind must be one of {P2P_KINDS}, got {kind!r}")
        if kind == "clustering" and not use_pixel_mlp and in_channels != out_dim:
            raise ValueError("clustering P2P without M_p needs stage-4 channels equal to the "
                             f"prototypes' width ({in_channels} != {out_dim})")
        self.pixel_mlp = (pixel_mlp(in_channels, hidden_dim, out_dim, final_bn=True)
                          if use_pixel_mlp else nn.Identity())
        width = out_dim if use_pixel_mlp else in_channels
        self.predictor = (pixel_mlp(width, pred_hidden_dim or hidden_dim, width, final_bn=False)
                          if kind == "noncontrastive" else None)
        self.size, self.cell_centers, self.valid_only = size, cell_centers, valid_only
        self.kind, self.temperature = kind, temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, boxes1: torch.Tensor,
                boxes2: torch.Tensor, flips1: torch.Tensor, flips2: torch.Tensor,
                prototypes: torch.Tensor | None = None, epsilon: float = 0.05,
                sinkhorn_iterations: int = 3) -> torch.Tensor:
        """z1, z2: (B, L, H, W) maps of the two large crops; boxes (B, 4) and flips (B) of the
        crops as MultiCropTransform records them; prototypes (K, D), epsilon and
        sinkhorn_iterations: the clustering kind's."""
        e1, e2 = self.pixel_mlp(z1), self.pixel_mlp(z2)
        v1, v2, valid = overlap_gather(e1, e2, boxes1, boxes2, flips1, flips2, self.size,
                                       self.cell_centers)
        if self.kind == "contrastive":
            return p2p_infonce_loss(v1, v2, valid, self.temperature)
        if self.kind == "clustering":
            if prototypes is None:
                raise ValueError("clustering P2P needs the prototypes")
            return p2p_swapped_loss(v1, v2, valid, prototypes, self.temperature, epsilon,
                                    sinkhorn_iterations)
        p1, p2 = self.predictor(v1), self.predictor(v2)
        return p2p_cosine_loss(p1, p2, v1, v2, valid, self.valid_only)
