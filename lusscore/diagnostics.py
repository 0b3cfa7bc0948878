"""How well the pixel attention separates objects from background (a measuring stick).

The mean attention maps that labelling saves beside the validation pseudo labels
(<run>/labels/validation/*.npy, at the network's pixel stride) are upsampled (bilinear) to
the GT size and scored against foreground = GT not in {0 'other', 1000 ignore}, over all
validation pixels together (ignore pixels left out):

- auc: ROC area of attention as a foreground score (0.5 = no separation, 1 = perfect);
- best_iou / best_threshold: the foreground IoU of the best threshold "attention >= t";
- iou_at_tau: the foreground IoU at a given tau (when one is given);
- fg_mean / bg_mean: the mean attention on foreground and background pixels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lusscore.data.label_io import IGNORE_INDEX, read_label_png
from lusscore.utils import LusscoreError


def foreground_scores(attention: np.ndarray, foreground: np.ndarray, tau: float | None = None) -> dict:
    """attention: float values; foreground: bools of the same shape (pixels to score only)."""
    att = np.asarray(attention, dtype=np.float64).ravel()
    fg = np.asarray(foreground, dtype=bool).ravel()
    if att.shape != fg.shape:
        raise LusscoreError(f"attention and foreground must have the same size, got {att.size} "
                            f"and {fg.size}")
    if not np.isfinite(att).all():
        raise LusscoreError("the attention maps hold non-finite values")
    n_fg, n_bg = int(fg.sum()), int((~fg).sum())
    out = {"pixels": int(att.size), "foreground_share": n_fg / att.size if att.size else float("nan"),
           "fg_mean": float(att[fg].mean()) if n_fg else float("nan"),
           "bg_mean": float(att[~fg].mean()) if n_bg else float("nan")}
    if n_fg == 0 or n_bg == 0:
        out.update(auc=float("nan"), best_iou=float("nan"), best_threshold=float("nan"))
    else:
        # Mann-Whitney U with tied values counted one half: rank each distinct value once.
        values, inverse, counts = np.unique(att, return_inverse=True, return_counts=True)
        mid_rank = np.cumsum(counts) - (counts - 1) / 2.0  # average 1-based rank of each value
        rank_sum = mid_rank[inverse[fg]].sum()
        out["auc"] = float((rank_sum - n_fg * (n_fg + 1) / 2.0) / (n_fg * n_bg))
        # Thresholds at every distinct value: foreground predicted where attention >= value.
        fg_per_value = np.bincount(inverse, weights=fg, minlength=len(values))
        tp = np.cumsum(fg_per_value[::-1])[::-1]          # fg pixels with attention >= value
        predicted = np.cumsum(counts[::-1])[::-1]         # all pixels with attention >= value
        iou = tp / (n_fg + predicted - tp)
        best = int(np.argmax(iou))
        out.update(best_iou=float(iou[best]), best_threshold=float(values[best]))
    if tau is not None:
        pred = att >= tau
        inter, union = int((pred & fg).sum()), int((pred | fg).sum())
        out["tau"] = float(tau)
        out["iou_at_tau"] = inter / union if union else float("nan")
    return out


def attention_foreground(samples, labels_dir: Path, tau: float | None = None) -> dict:
    """Scores of the saved mean-attention maps of `samples` (SegmentationSample: .label, .name)."""
    atts, fgs = [], []
    for s in samples:
        gt = read_label_png(s.label)
        npy = (Path(labels_dir) / s.name).with_suffix(".npy")
        if not npy.is_file():
            raise FileNotFoundError(f"mean-attention map not found: {npy} (label validation with "
                                    "--save-attention)")
        att = torch.from_numpy(np.load(npy))[None, None].float()
        full = F.interpolate(att, size=gt.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
        keep = gt != IGNORE_INDEX
        atts.append(full[keep])
        fgs.append(gt[keep] != 0)
    if not atts:
        raise LusscoreError(f"no validation samples to score the attention of ({labels_dir})")
    return foreground_scores(np.concatenate(atts), np.concatenate(fgs), tau)


def format_foreground(scores: dict, mask: str = "attention") -> str:
    """One line; mask: what the scored maps are (the attention, or a shape prior in its place)."""
    text = (f"{mask} vs foreground: AUC {scores['auc']:.3f}, best IoU {100 * scores['best_iou']:.1f}% "
            f"at {scores['best_threshold']:.3f}; mean {mask} fg {scores['fg_mean']:.3f}, "
            f"bg {scores['bg_mean']:.3f}")
    if "iou_at_tau" in scores:
        text += f"; IoU at tau {scores['tau']:.3f}: {100 * scores['iou_at_tau']:.1f}%"
    return text


# ----------------------------------------------------------------------------- clusters

TRAIN_LABELS = "train-segmentation"  # the synthetic sets' train GT (the benchmark has none)


def object_hue_bins(root, samples, bins: int = 6) -> np.ndarray | None:
    """Per train image, the hue bin (0..bins-1) of its folder-class object: the circular mean
    hue of the object's pixels in the train GT (<root>/train-segmentation/<wnid>/<name>.png).
    None when that GT is absent. With the image clusters' NMI against the class, the NMI
    against this says whether the clusters follow the class or the object's colour."""
    from PIL import Image
    labels = Path(root) / TRAIN_LABELS
    if not labels.is_dir():
        return None
    out = np.empty(len(samples), dtype=np.int64)
    for i, (path, class_id) in enumerate(samples):
        path = Path(path)
        label = read_label_png(labels / path.parent.name / (path.stem + ".png"))
        with Image.open(path) as im:
            hsv = np.asarray(im.convert("RGB").convert("HSV"), dtype=np.float64)
        if hsv.shape[:2] != label.shape:
            raise LusscoreError(f"size mismatch: {path} and its train label are not the same size")
        hue = hsv[..., 0][label == class_id] * (2 * np.pi / 256)
        if hue.size == 0:
            hue = hsv[..., 0].ravel() * (2 * np.pi / 256)
        mean = np.angle(np.exp(1j * hue).mean()) % (2 * np.pi)
        out[i] = int(mean / (2 * np.pi) * bins) % bins
    return out
