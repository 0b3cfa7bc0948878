"""Shape priors for label generation (the paper's Tab 5 "+RC" and "+Sal"): saliency maps in
[0, 1] per image, computed with no learning (region contrast) or read from a user's folder.

Region contrast (RC; Cheng et al., "Global contrast based salient region detection", the
paper's [117]): a Felzenszwalb graph over-segmentation (scikit-image); the image's colours
quantised to 12 levels per channel, keeping the most frequent ones that cover 95 % of the
pixels (the rest take the nearest kept colour); per region a histogram over those colours;
region k scores

    S(k) = sum_{i != k} exp(-D_s(k, i) / sigma_s^2) * w(i) * D_r(k, i)

with D_r the expected Lab distance between the two regions' colour histograms, D_s the
distance of their centroids (coordinates divided by the longer side) and w(i) region i's
share of the pixels; S is min-max normalised over the image (a map without contrast is 0).

A saliency folder holds <folder>/<split>/<wnid>/<name>.png, 8-bit grayscale (0..255 for
0..1), one per image of the split, its size the image's: what `luss saliency` writes and what
label.prior maps reads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lusscore.data.label_io import IGNORE_INDEX
from lusscore.utils import LusscoreError, atomic_path

PRIORS = ("none", "rc", "maps")


@dataclass(frozen=True)
class RegionContrast:
    """The settings of region-contrast saliency (the `saliency` config section)."""
    scale: float = 50.0       # Felzenszwalb's k (larger: larger regions)
    sigma: float = 0.5        # its pre-smoothing
    min_size: int = 50        # its smallest region, pixels
    sigma_s2: float = 0.4     # the spatial weighting's sigma_s^2
    levels: int = 12          # colour quantisation levels per channel
    coverage: float = 0.95    # the share of pixels the kept colours cover

    def __post_init__(self):
        if not (self.scale > 0 and self.sigma >= 0 and self.min_size >= 1 and self.sigma_s2 > 0
                and 2 <= self.levels <= 256 and 0 < self.coverage <= 1):
            raise LusscoreError(f"saliency: invalid region-contrast settings {self}")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) float32 saliency in [0, 1]."""
        from skimage.color import rgb2lab
        from skimage.segmentation import felzenszwalb

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise LusscoreError(f"region contrast needs an (H, W, 3) uint8 image, got "
                                f"{image.shape} {image.dtype}")
        h, w = image.shape[:2]
        segments = felzenszwalb(image, scale=self.scale, sigma=self.sigma, min_size=self.min_size)
        regions = int(segments.max()) + 1
        colour, palette = self.quantise(image)
        hist = np.zeros((regions, len(palette)))
        np.add.at(hist, (segments.ravel(), colour.ravel()), 1.0)
        size = hist.sum(1)
        hist /= size[:, None]
        lab = rgb2lab(palette[None].astype(np.float64) / 255.0)[0]
        colour_dist = np.linalg.norm(lab[:, None] - lab[None], axis=2)
        region_dist = hist @ colour_dist @ hist.T                        # D_r (R, R)
        ys, xs = np.mgrid[0:h, 0:w]
        side = float(max(h, w))
        cy = np.bincount(segments.ravel(), ys.ravel(), regions) / size / side
        cx = np.bincount(segments.ravel(), xs.ravel(), regions) / size / side
        spatial = np.hypot(cy[:, None] - cy[None], cx[:, None] - cx[None])
        weight = np.exp(-spatial / self.sigma_s2) * (size / size.sum())[None]
        np.fill_diagonal(weight, 0.0)
        score = (weight * region_dist).sum(1)
        span = score.max() - score.min()
        score = (score - score.min()) / span if span > 1e-9 else np.zeros_like(score)
        return score[segments].astype(np.float32)

    def quantise(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) index into the kept colours, and the kept colours (P, 3) as RGB bin centres."""
        step = 256.0 / self.levels
        q = np.minimum((image / step).astype(np.int64), self.levels - 1)
        code = (q[..., 0] * self.levels + q[..., 1]) * self.levels + q[..., 2]
        codes, inverse, counts = np.unique(code.ravel(), return_inverse=True, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        kept = int(np.searchsorted(np.cumsum(counts[order]), self.coverage * code.size) + 1)
        kept_codes = codes[order[:kept]]
        rgb = np.stack([kept_codes // (self.levels ** 2), kept_codes // self.levels % self.levels,
                        kept_codes % self.levels], axis=1)
        palette = (rgb + 0.5) * step
        all_rgb = (np.stack([codes // (self.levels ** 2), codes // self.levels % self.levels,
                             codes % self.levels], axis=1) + 0.5) * step
        nearest = np.argmin(((all_rgb[:, None] - palette[None]) ** 2).sum(2), axis=1)
        return nearest[inverse].reshape(code.shape), palette


def foreground_prior(label: np.ndarray, blur: float = 0.03, threshold: float = 0.5) -> np.ndarray:
    """An upper-bound prior from GT: the foreground (ids 1..999; the ignore band counts as
    foreground), Gaussian-blurred (sigma = blur x the shorter side) and thresholded, as {0, 1}
    float32."""
    from scipy.ndimage import gaussian_filter
    fg = (label > 0).astype(np.float64)
    soft = gaussian_filter(fg, sigma=blur * min(label.shape))
    return (soft >= threshold).astype(np.float32)


def write_saliency_png(path: str | os.PathLike, saliency: np.ndarray) -> None:
    """(H, W) saliency in [0, 1] as an 8-bit grayscale PNG, atomically."""
    values = np.clip(np.rint(np.asarray(saliency, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(values, mode="L").save(tmp, format="PNG")


def read_saliency_png(path: str | os.PathLike, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """An 8-bit grayscale saliency PNG as (H, W) float32 in [0, 1]; a missing file, another
    mode or a size other than expected_size (H, W) is an error naming the file."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise LusscoreError(f"{path}: a {im.format} file; saliency maps must be PNGs")
            if im.mode != "L":
                raise LusscoreError(f"{path}: saliency maps must be 8-bit grayscale PNGs (mode "
                                    f"'L'), got mode {im.mode!r}")
            values = np.asarray(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"saliency map not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise LusscoreError(f"{path}: cannot read saliency PNG ({e})") from None
    if expected_size is not None and values.shape != tuple(expected_size):
        raise LusscoreError(f"{path}: saliency map is {values.shape[0]}x{values.shape[1]} (HxW) "
                            f"but its image is {expected_size[0]}x{expected_size[1]}")
    return values.astype(np.float32) / 255.0


def saliency_valid(path: Path, expected_size: tuple[int, int]) -> bool:
    """True when path reads whole as a saliency map of that size (resume skips it)."""
    try:
        read_saliency_png(path, expected_size)
    except (FileNotFoundError, LusscoreError):
        return False
    return True


def score_saliency(saliency: np.ndarray, label: np.ndarray, threshold: float = 0.5) -> tuple[float, float]:
    """(F-beta with beta^2 = 0.3 of saliency >= threshold against the GT foreground, MAE of
    the map against it), ignore pixels left out; an image without GT foreground has F 0, as
    the benchmark's F-measure."""
    keep = label != IGNORE_INDEX
    fg = (label > 0) & keep
    pred = (saliency >= threshold) & keep
    tp = float((pred & fg).sum())
    precision, recall = tp / (pred.sum() + 1e-20), tp / (fg.sum() + 1e-20)
    f = 1.3 * precision * recall / (0.3 * precision + recall + 1e-20)
    mae = float(np.abs(saliency[keep] - fg[keep]).mean()) if keep.any() else 0.0
    return f, mae

