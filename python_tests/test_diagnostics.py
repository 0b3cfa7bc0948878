"""The attention-vs-foreground score: AUC and best-threshold IoU against brute-force
definitions, ties, degenerate inputs, and reading saved maps beside GT PNGs."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from lusscore.data.label_io import IGNORE_INDEX, write_label_png
from lusscore.diagnostics import attention_foreground, foreground_scores, format_foreground
from lusscore.utils import LusscoreError


def _brute_auc(att, fg):
    pos, neg = att[fg], att[~fg]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def _brute_best_iou(att, fg):
    best = (-1.0, None)
    for t in np.unique(att):
        pred = att >= t
        iou = (pred & fg).sum() / (pred | fg).sum()
        if iou > best[0]:
            best = (iou, t)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    fg = rng.random(300) < 0.3
    # Rounded values make many ties; foreground slightly higher on average.
    att = np.round(rng.random(300) * 0.6 + 0.3 * fg, 1)
    s = foreground_scores(att, fg, tau=0.5)
    assert s["auc"] == pytest.approx(_brute_auc(att, fg), abs=1e-12)
    iou, t = _brute_best_iou(att, fg)
    assert s["best_iou"] == pytest.approx(iou, abs=1e-12)
    assert s["best_threshold"] == pytest.approx(t)
    pred = att >= 0.5
    assert s["iou_at_tau"] == pytest.approx((pred & fg).sum() / (pred | fg).sum())
    assert s["fg_mean"] == pytest.approx(att[fg].mean())
    assert s["bg_mean"] == pytest.approx(att[~fg].mean())


def test_perfect_flat_and_inverted_maps():
    fg = np.array([True, True, False, False, False])
    perfect = foreground_scores(np.array([0.9, 0.8, 0.1, 0.2, 0.3]), fg)
    assert perfect["auc"] == 1.0 and perfect["best_iou"] == 1.0
    assert perfect["best_threshold"] == pytest.approx(0.8)
    flat = foreground_scores(np.full(5, 0.5), fg)
    assert flat["auc"] == 0.5
    assert flat["best_iou"] == pytest.approx(2 / 5)  # everything predicted foreground
    inverted = foreground_scores(np.array([0.1, 0.2, 0.9, 0.8, 0.7]), fg)
    assert inverted["auc"] == 0.0


def test_degenerate_and_bad_inputs():
    s = foreground_scores(np.array([0.2, 0.4]), np.array([False, False]))
    assert np.isnan(s["auc"]) and np.isnan(s["best_iou"]) and s["foreground_share"] == 0.0
    with pytest.raises(LusscoreError, match="same size"):
        foreground_scores(np.zeros(3), np.zeros(4, dtype=bool))
    with pytest.raises(LusscoreError, match="non-finite"):
        foreground_scores(np.array([0.1, np.nan]), np.array([True, False]))


@dataclass
class _Sample:
    label: Path
    name: str


def test_reads_saved_maps_and_skips_ignore(tmp_path):
    gt = np.zeros((16, 16), dtype=np.int64)
    gt[4:12, 4:12] = 3
    gt[0, :] = IGNORE_INDEX
    write_label_png(tmp_path / "gt" / "a.png", gt)
    labels = tmp_path / "labels"
    labels.mkdir()
    # A stride-4 map whose bright centre upsamples onto the object.
    att = np.full((4, 4), 0.1, dtype=np.float32)
    att[1:3, 1:3] = 0.9
    np.save(labels / "a.npy", att)
    samples = [_Sample(tmp_path / "gt" / "a.png", "a.png")]
    s = attention_foreground(samples, labels, tau=0.5)
    assert s["pixels"] == 16 * 15
    assert s["auc"] > 0.95 and s["iou_at_tau"] > 0.7
    assert s["fg_mean"] > s["bg_mean"]
    assert "AUC" in format_foreground(s)
    (labels / "a.npy").unlink()
    with pytest.raises(FileNotFoundError, match="save-attention"):
        attention_foreground(samples, labels)
    with pytest.raises(LusscoreError, match="no validation samples"):
        attention_foreground([], labels)


def test_object_hue_bins_on_hand_made_images(tmp_path):
    """Each image's object hue lands in its bin; the background and the other class's object
    do not count; no train GT gives None."""
    import colorsys

    from PIL import Image

    from lusscore.data.label_io import write_label_png
    from lusscore.diagnostics import object_hue_bins
    assert object_hue_bins(tmp_path, []) is None
    samples, expected = [], []
    for i, (hue, class_id) in enumerate([(0.05, 1), (0.25, 2), (0.55, 1), (0.9, 2)]):
        rgb = np.zeros((20, 30, 3), np.uint8)
        rgb[:] = (255, 255, 255)  # white background: hue 0, must not count
        rgb[5:15, 5:12] = [int(255 * c) for c in colorsys.hsv_to_rgb(hue, 1.0, 1.0)]
        rgb[5:15, 20:25] = [int(255 * c) for c in colorsys.hsv_to_rgb((hue + 0.5) % 1, 1.0, 1.0)]
        label = np.zeros((20, 30), np.int64)
        label[5:15, 5:12] = class_id
        label[5:15, 20:25] = 3 - class_id  # another class: not the folder's
        wnid = f"n9000000{class_id}"
        image = tmp_path / "train" / wnid / f"{wnid}_{i}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(image)
        write_label_png(tmp_path / "train-segmentation" / wnid / f"{wnid}_{i}.png", label)
        samples.append((image, class_id))
        expected.append(int(hue * 6))
    assert object_hue_bins(tmp_path, samples).tolist() == expected
