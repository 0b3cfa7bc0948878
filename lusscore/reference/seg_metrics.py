"""Reference of seg_metrics_update_: the official per-label band maps (erosions as max-pools)
and plain histograms, written for clarity, not speed."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def band_dilation(h: int, w: int, ratio: float = 0.03) -> int:
    # Capped at max(H, W): more erosions change nothing (every pixel is in the band already).
    x = ratio * math.sqrt(h * h + w * w)
    return max(1, max(h, w)) if x >= max(h, w) else max(1, round(x))


def label_band(mask: torch.Tensor, d: int) -> torch.Tensor:
    """Official mask_to_boundary: pad by 1 with zeros, erode d times with a 3x3 ones kernel,
    crop, keep mask and not eroded. mask: (H, W) bool."""
    m = F.pad(mask.float()[None, None], (1, 1, 1, 1), value=0.0)
    for _ in range(d):
        # cv2.erode keeps its own border out of the minimum: pad the complement with 0.
        m = 1.0 - F.max_pool2d(F.pad(1.0 - m, (1, 1, 1, 1), value=0.0), 3, stride=1)
    eroded = m[0, 0, 1:-1, 1:-1] > 0.5
    return mask & ~eroded


def band_map(label: torch.Tensor, ratio: float = 0.03) -> torch.Tensor:
    """(H, W) bool: pixels in the band of their own label (every label, ignore included)."""
    h, w = label.shape
    d = band_dilation(h, w, ratio)
    band = torch.zeros(h, w, dtype=torch.bool, device=label.device)
    for u in torch.unique(label).tolist():
        band |= label_band(label == u, d)
    return band


def size_bucket(n: int, total: int) -> int:
    """Official bucket: ceil(100.0 * n / N) computed on float32 tensors."""
    s = math.ceil((torch.tensor(n, dtype=torch.float32) * 100.0 / torch.tensor(
        total, dtype=torch.float32)).item())
    return 0 if s <= 5 else 1 if s <= 25 else 2 if s <= 50 else 3


def seg_metrics_update(pred: torch.Tensor, gt: torch.Tensor, num_classes: int, rows: int,
                       ignore_index: int = 1000, boundary_ratio: float = 0.03,
                       pred_lut: torch.Tensor | None = None):
    """Accumulators of one (H, W) map pair, laid out as seg_metrics_update_'s."""
    c = num_classes
    pred, gt = pred.long().cpu(), gt.long().cpu()
    if pred_lut is not None:
        lut = pred_lut.long().cpu()
        inside = (pred >= 0) & (pred < lut.numel())
        pred = torch.where(inside, lut[pred.clamp(0, max(lut.numel() - 1, 0))], pred)
    band_p, band_g = band_map(pred, boundary_ratio), band_map(gt, boundary_ratio)
    valid = gt != ignore_index
    p, g, bp, bg = pred[valid], gt[valid], band_p[valid], band_g[valid]
    row = torch.where((p >= 0) & (p < rows), p, torch.full_like(p, rows))
    gt_hist = torch.zeros(c + 2, dtype=torch.int64)
    gt_hist += torch.bincount(torch.where((g >= 0) & (g <= c), g, c + 1), minlength=c + 2)
    pred_stats = torch.zeros(2, rows + 1, dtype=torch.int64)
    pred_stats[0] = torch.bincount(row, minlength=rows + 1)
    pred_stats[1] = torch.bincount(row[g != 0], minlength=rows + 1)
    region = torch.zeros(5, rows + 1, c + 1, dtype=torch.int64)
    boundary = torch.zeros(5, rows + 1, c + 2, dtype=torch.int64)
    keep = (g >= 0) & (g <= c)
    total = int(gt_hist.sum())
    bucket = {k: size_bucket(int(gt_hist[k]), total) for k in range(1, c + 1) if gt_hist[k] > 0}
    row_b = torch.where(bp & (row < rows), row, torch.full_like(row, rows))
    col_b = torch.where(bg, g, torch.full_like(g, c + 1))
    for s in range(5):
        if s == 0:
            sel = keep
        else:
            classes = [k for k, b in bucket.items() if b == s - 1]
            if not classes:
                continue
            sel = keep & ((g == 0) | torch.isin(g, torch.tensor(classes)))
        region[s].view(-1).index_add_(0, row[sel] * (c + 1) + g[sel],
                                      torch.ones(int(sel.sum()), dtype=torch.int64))
        boundary[s].view(-1).index_add_(0, row_b[sel] * (c + 2) + col_b[sel],
                                        torch.ones(int(sel.sum()), dtype=torch.int64))
    return {"region_conf": region, "boundary_conf": boundary, "pred_stats": pred_stats,
            "gt_hist": gt_hist}
