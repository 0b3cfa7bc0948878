"""Pure-PyTorch reference of overlap_gather: the lattice grid built in float64 with the same
formulas as csrc/overlap_gather/overlap_gather_kernel.h, then F.grid_sample (bilinear, zero
padding, align_corners=False) in the features' dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lattice_fractions(size: int, cell_centers: bool = False, device=None) -> torch.Tensor:
    """Where the S lattice points sit along the overlap, as fractions in [0, 1] (float64).

    Edge to edge inclusive: k / (S - 1), with the centre 1/2 when S = 1; cell centres:
    (k + 1/2) / S."""
    k = torch.arange(size, dtype=torch.float64, device=device)
    if cell_centers:
        return (k + 0.5) / size
    if size == 1:
        return torch.full((1,), 0.5, dtype=torch.float64, device=device)
    return k / (size - 1)


def overlap_valid(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """(B) bool: the two boxes (left, top, width, height) overlap with a positive area."""
    b1, b2 = boxes1.double(), boxes2.double()
    valid = torch.ones(b1.shape[0], dtype=torch.bool, device=b1.device)
    for axis in (0, 1):
        s1, l1, s2, l2 = b1[:, axis], b1[:, axis + 2], b2[:, axis], b2[:, axis + 2]
        lo = torch.maximum(s1, s2)
        hi = torch.minimum(s1 + l1, s2 + l2)
        valid &= (l1 > 0) & (l2 > 0) & (hi > lo) & (s1 == s1) & (s2 == s2)
    return valid


def overlap_coordinates(boxes1, boxes2, flips1, flips2, size: int = 7,
                        cell_centers: bool = False):
    """The lattice in each view's normalised frame: (u1, u2) each (B, 2, S) float64 with
    axis 0 = x (mirrored for flipped views) and axis 1 = y; zeros for invalid pairs."""
    b1, b2 = boxes1.double(), boxes2.double()
    t = lattice_fractions(size, cell_centers, device=b1.device)
    valid = overlap_valid(boxes1, boxes2)
    out = []
    for own, flips in ((b1, flips1), (b2, flips2)):
        axes = []
        for axis in (0, 1):
            lo = torch.maximum(b1[:, axis], b2[:, axis])
            hi = torch.minimum(b1[:, axis] + b1[:, axis + 2], b2[:, axis] + b2[:, axis + 2])
            a = (lo - own[:, axis]) / own[:, axis + 2]
            b = (hi - own[:, axis]) / own[:, axis + 2]
            u = a[:, None] + (b - a)[:, None] * t[None, :]
            if axis == 0:
                u = torch.where(flips.bool()[:, None], 1.0 - u, u)
            axes.append(torch.where(valid[:, None], u, torch.zeros_like(u)))
        out.append(torch.stack(axes, dim=1))
    return out[0], out[1], valid


def overlap_grids(boxes1, boxes2, flips1, flips2, size: int = 7, cell_centers: bool = False):
    """grid_sample grids (B, S, S, 2) float64 (grid value 2u - 1) for both views, and valid."""
    u1, u2, valid = overlap_coordinates(boxes1, boxes2, flips1, flips2, size, cell_centers)

    def grid(u):
        gx = 2.0 * u[:, 0] - 1.0  # (B, S) along columns
        gy = 2.0 * u[:, 1] - 1.0  # (B, S) along rows
        s = u.shape[-1]
        return torch.stack([gx[:, None, :].expand(-1, s, -1), gy[:, :, None].expand(-1, -1, s)],
                           dim=-1)

    return grid(u1), grid(u2), valid


def overlap_gather(f1, f2, boxes1, boxes2, flips1, flips2, size: int = 7,
                   cell_centers: bool = False):
    """(g1, g2, valid): both maps sampled on the overlap lattice; invalid pairs give zeros."""
    grid1, grid2, valid = overlap_grids(boxes1, boxes2, flips1, flips2, size, cell_centers)
    mask = valid[:, None, None, None]

    def sample(f, grid):
        g = F.grid_sample(f, grid.to(f.dtype), mode="bilinear", padding_mode="zeros",
                          align_corners=False)
        return g * mask.to(g.dtype)

    return sample(f1, grid1), sample(f2, grid2), valid
