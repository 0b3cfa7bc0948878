"""Per-pixel loop references of PixPro's positive mask and pixel propagation (float64), for
lusscore.losses.pixpro: written from the definitions, one pair or pixel at a time."""
from __future__ import annotations

import math

import torch


def bin_centre(box, flipped: bool, h: int, w: int, row: int, col: int) -> tuple[float, float]:
    """Where bin (row, col) of an (h, w) map of a crop (left, top, width, height) sits in the
    original image; a mirrored crop's column k shows the original's column w - 1 - k."""
    left, top, width, height = (float(v) for v in box)
    src_col = w - 1 - col if flipped else col
    return left + (src_col + 0.5) * width / w, top + (row + 0.5) * height / h


def positive_mask(boxes1, flips1, boxes2, flips2, h: int, w: int, threshold: float) -> torch.Tensor:
    """(B, h*w, h*w) float64."""
    b = len(boxes1)
    out = torch.zeros(b, h * w, h * w, dtype=torch.float64)
    for n in range(b):
        d1 = math.hypot(float(boxes1[n][2]) / w, float(boxes1[n][3]) / h)
        d2 = math.hypot(float(boxes2[n][2]) / w, float(boxes2[n][3]) / h)
        for i in range(h * w):
            x1, y1 = bin_centre(boxes1[n], bool(flips1[n]), h, w, i // w, i % w)
            for j in range(h * w):
                x2, y2 = bin_centre(boxes2[n], bool(flips2[n]), h, w, j // w, j % w)
                out[n, i, j] = float(math.hypot(x1 - x2, y1 - y2) / max(d1, d2) < threshold)
    return out


def propagate(x: torch.Tensor, value: torch.Tensor, gamma: float) -> torch.Tensor:
    """y_i = sum_j max(cos(x_i, x_j), 0)^gamma * value_j / |value_j| for (B, C, h, w) maps."""
    b, c, h, w = x.shape
    xs = x.double().reshape(b, c, h * w)
    vs = value.double().reshape(b, c, h * w)
    out = torch.zeros(b, c, h * w, dtype=torch.float64)
    for n in range(b):
        for i in range(h * w):
            for j in range(h * w):
                xi, xj = xs[n, :, i], xs[n, :, j]
                cos = float(xi @ xj) / max(float(xi.norm() * xj.norm()), 1e-12)
                if gamma < 1:
                    cos = max(cos, 0.0) + 1e-6
                out[n, :, i] += max(cos, 0.0) ** gamma * vs[n, :, j] / max(float(vs[n, :, j].norm()), 1e-12)
    return out.reshape(b, c, h, w)
