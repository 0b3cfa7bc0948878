"""seg_metrics_update_: streaming ImageNet-S metrics into in-place int64 accumulators.

One call per label map or batch of equal-size maps. The accumulators keep raw predicted ids,
so any matching is applied afterwards (lusscore.metrics.SegEvaluator does that). Layout:

- region_conf   (5, R+1, C+1): [set, pred row, gt id] pixel counts over valid pixels;
- boundary_conf (5, R+1, C+2): [set, pred band row, gt band col]; a pixel outside the
  prediction's band goes to row R, one outside the GT's band to column C+1;
- set 0 = every valid pixel, set 1+b = size bucket b (S, MS, ML, L) of the image;
- pred row = the predicted id when 0 <= id < R, else R;
- pred_stats (B, 2, R+1), written: per image, pred-row histogram over valid pixels and over
  valid pixels whose GT is not 0; gt_hist (B, C+2), written: GT histogram over valid pixels,
  column C+1 counting GT ids outside 0..C.
"""
from __future__ import annotations

import math

import torch

from lusscore.ops.switch import reference_enabled
from lusscore.reference import seg_metrics as _reference

NUM_SETS = 5
BUCKETS = ("S", "MS", "ML", "L")


@torch.library.register_fake("lusscore::seg_metrics_update_")
def _seg_metrics_update_fake(pred, gt, num_classes, ignore_index, boundary_ratio, pred_lut,
                             region_conf, boundary_conf, pred_stats, gt_hist):
    torch._check(pred.shape == gt.shape, lambda: "pred and gt must have the same shape")
    torch._check(pred.dim() in (2, 3), lambda: "pred must be (H, W) or (B, H, W)")
    return None


def new_accumulators(num_classes: int, rows: int | None = None, batch: int = 1,
                     device="cpu") -> dict[str, torch.Tensor]:
    """Zeroed accumulators for `seg_metrics_update_` (rows: R, at least num_classes + 1)."""
    rows = num_classes + 1 if rows is None else rows
    if rows < num_classes + 1:
        raise ValueError(f"rows must be >= num_classes + 1 = {num_classes + 1}, got {rows}")
    kw = dict(dtype=torch.int64, device=device)
    return {
        "region_conf": torch.zeros(NUM_SETS, rows + 1, num_classes + 1, **kw),
        "boundary_conf": torch.zeros(NUM_SETS, rows + 1, num_classes + 2, **kw),
        "pred_stats": torch.zeros(batch, 2, rows + 1, **kw),
        "gt_hist": torch.zeros(batch, num_classes + 2, **kw),
    }


def seg_metrics_update_(pred: torch.Tensor, gt: torch.Tensor, num_classes: int,
                        region_conf: torch.Tensor, boundary_conf: torch.Tensor,
                        pred_stats: torch.Tensor, gt_hist: torch.Tensor,
                        ignore_index: int = 1000, boundary_ratio: float = 0.03,
                        pred_lut: torch.Tensor | None = None) -> None:
    """Accumulate one (H, W) map pair or a (B, H, W) batch into the accumulators in place.

    pred and gt may have any integer dtype (uint8, int8, int16, int32, int64, uint16, uint32,
    uint64; the two may differ) on either device; ids are compared as int64.
    """
    if reference_enabled():
        _reference_update_(pred, gt, num_classes, ignore_index, boundary_ratio, pred_lut,
                           region_conf, boundary_conf, pred_stats, gt_hist)
        return
    torch.ops.lusscore.seg_metrics_update_(pred, gt, num_classes, ignore_index, boundary_ratio,
                                           pred_lut, region_conf, boundary_conf, pred_stats,
                                           gt_hist)


def _reference_update_(pred, gt, num_classes, ignore_index, boundary_ratio, pred_lut,
                       region_conf, boundary_conf, pred_stats, gt_hist) -> None:
    """The op's contract on lusscore.reference.seg_metrics, one image at a time."""
    _seg_metrics_update_fake(pred, gt, num_classes, ignore_index, boundary_ratio, pred_lut,
                             region_conf, boundary_conf, pred_stats, gt_hist)
    rows = region_conf.shape[1] - 1
    pairs = zip(pred, gt) if pred.dim() == 3 else [(pred, gt)]
    for b, (p, g) in enumerate(pairs):
        want = _reference.seg_metrics_update(p, g, num_classes, rows, ignore_index, boundary_ratio,
                                             pred_lut)
        region_conf += want["region_conf"].to(region_conf.device)
        boundary_conf += want["boundary_conf"].to(boundary_conf.device)
        pred_stats.view(-1, *want["pred_stats"].shape)[b].copy_(want["pred_stats"])
        gt_hist.view(-1, *want["gt_hist"].shape)[b].copy_(want["gt_hist"])


def band_dilation(height: int, width: int, boundary_ratio: float = 0.03) -> int:
    """d = max(1, round(ratio * diagonal)) with Python's half-to-even rounding, capped at
    max(H, W) as in the kernels (from there on every pixel is in the band)."""
    x = boundary_ratio * math.sqrt(height * height + width * width)
    cap = max(height, width)
    return max(1, cap) if x >= cap else max(1, round(x))
