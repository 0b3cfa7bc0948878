"""A synthetic dataset in the ImageNet-S layout, small enough for a CPU demo.

Each image holds one primary object (its folder's class) on an 'other' background, and
about 8% hold a second, smaller object of another class. A class is a (shape family,
texture family) pair and nothing else: every colour in an image (the objects' two texture
colours, the background gradient, the clutter) is drawn from one shared palette,
independently of the class, so colour alone cannot tell a class from another or an object
from the background. Distractor clutter shares the palette and some of the textures, at a
lower contrast than the objects.

Everything an image shows is a function of (seed, split, index): the output does not depend
on the number of workers or the order of generation. Layout written under `out`::

    categories.txt                         K synthetic wnids 'n9' + 7 digits (sorted = class id)
    train/<wnid>/<wnid>_<i>.JPEG           unlabeled training images
    train-segmentation/<wnid>/*.png        their labels (for pseudo-label evaluation only)
    train-semi/<wnid>/*.JPEG + train-semi-segmentation/<wnid>/*.png
    validation/<wnid>/*.JPEG + validation-segmentation/<wnid>/*.png
    test/<wnid>/*.JPEG + test-segmentation/<wnid>/*.png   held out: never used for a choice
    names/validation.txt, names/train-semi.txt, names/test.txt
    synth.json                             config + summary, written last (marks completion)
"""
from __future__ import annotations

import colorsys
import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from lusscore.data.imagenet_s import write_categories, write_names
from lusscore.data.label_io import IGNORE_INDEX, write_label_png
from lusscore.utils import LusscoreError, atomic_path, atomic_write_text, progress_bar

# Bump when the drawing changes, so an old dataset is not taken for a new one.
GENERATOR_VERSION = 2
SUMMARY_FILE = "synth.json"
PENDING_FILE = ".synth-pending.json"
JPEG_QUALITY = 90

SPLITS = ("train", "train-semi", "validation", "test")
_SPLIT_CODE = {"train": 0, "train-semi": 1, "validation": 2, "test": 3}
LABEL_FOLDERS = {"train": "train-segmentation", "train-semi": "train-semi-segmentation",
                 "validation": "validation-segmentation", "test": "test-segmentation"}
NAMED_SPLITS = ("validation", "train-semi", "test")  # the splits with a names file

SIZE_BUCKETS = ("<=5%", "<=25%", "<=50%", ">50%")
# Primary-object area (share of the image) aimed at per bucket, kept clear of the bucket
# edges so clipping and occlusion rarely move an object to a neighbouring bucket.
_TARGET_AREAS = ((0.015, 0.04), (0.08, 0.22), (0.29, 0.46), (0.56, 0.80))
# Mostly large objects: a small CNN learns them quickly; small ones still cover bucket 1.
# With the loose centring below, this keeps the centre-disc floor under 15 mIoU.
_BUCKET_WEIGHTS = (0.10, 0.20, 0.30, 0.40)
MULTI_CLASS_SHARE = 0.08
# An object's centre keeps this many radii from the image edge (or sits in the middle):
# loose, so that objects are not where a centred disc puts them without looking.
_CENTRE_MARGIN = 0.3
# Objects stand out by texture contrast: their two colours differ in value (brightness) by a
# gap in this range. Clutter shows the same textures faintly: its second colour lies this
# share of the way from its first towards another palette colour.
_OBJECT_CONTRAST = (0.3, 0.55)
_CLUTTER_CONTRAST = (0.1, 0.25)
_IGNORE_BAND_PROB = 0.35  # per object

SHAPES = ("ellipse", "triangle", "square", "star", "ring", "cross", "hexagon", "blob", "crescent")
# The most distinct textures first: a small class count uses them.
TEXTURES = ("stripes", "checkers", "dots", "rings", "zigzag", "grid", "noise", "solid")
# Texture period in pixels at size 96 (scaled with the image size).
_PERIODS = {"stripes": 7.0, "checkers": 8.0, "dots": 7.0, "noise": 6.0, "rings": 6.0,
            "solid": 8.0, "zigzag": 9.0, "grid": 7.0}

MAX_CLASSES = 999  # ids must stay below the ignore id 1000
MIN_SIZE, MAX_SIZE = 32, 4096


@dataclass(frozen=True)
class SynthConfig:
    classes: int = 6
    train_per_class: int = 80
    val_per_class: int = 12
    semi_per_class: int = 4
    test_per_class: int = 20
    size: int = 96
    seed: int = 0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise LusscoreError(f"SynthConfig.{f.name} must be an integer, got {v!r}")
            object.__setattr__(self, f.name, int(v))
        if not 1 <= self.classes <= MAX_CLASSES:
            raise LusscoreError(f"classes must lie in 1..{MAX_CLASSES}, got {self.classes}")
        if self.train_per_class < 1:
            raise LusscoreError(f"train_per_class must be >= 1, got {self.train_per_class}")
        if min(self.val_per_class, self.semi_per_class, self.test_per_class) < 0:
            raise LusscoreError(
                f"val_per_class, semi_per_class and test_per_class must be >= 0, got "
                f"{self.val_per_class}, {self.semi_per_class} and {self.test_per_class}")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise LusscoreError(f"size must lie in {MIN_SIZE}..{MAX_SIZE} pixels, got {self.size}")
        if self.seed < 0:
            raise LusscoreError(f"seed must be >= 0, got {self.seed}")

    def per_class(self, split: str) -> int:
        return {"train": self.train_per_class, "train-semi": self.semi_per_class,
                "validation": self.val_per_class, "test": self.test_per_class}[split]

    @property
    def num_images(self) -> int:
        return self.classes * sum(self.per_class(s) for s in SPLITS)


def wnids(num_classes: int) -> list[str]:
    """Synthetic WordNet-like ids; sorted order = class index (id k -> k-th wnid)."""
    return [f"n9{k:07d}" for k in range(1, num_classes + 1)]


def size_bucket(n_k: int, n_valid: int) -> int:
    """ImageNet-S object-size bucket 0..3 of ceil(100 * n_k / N): <=5, <=25, <=50, >50."""
    ratio = math.ceil(100 * n_k / n_valid)
    return 0 if ratio <= 5 else 1 if ratio <= 25 else 2 if ratio <= 50 else 3


def image_name(config: SynthConfig, split: str, class_index: int, i: int) -> str:
    """File stem, following the official naming (val images numbered over the split)."""
    wnid = wnids(config.classes)[class_index]
    if split == "validation":
        return f"ILSVRC2012_val_{class_index * config.val_per_class + i + 1:08d}"
    if split == "test":
        return f"ILSVRC2012_test_{class_index * config.test_per_class + i + 1:08d}"
    if split == "train-semi":  # distinct train images, as in the benchmark
        return f"{wnid}_{config.train_per_class + i}"
    return f"{wnid}_{i}"


# ----------------------------------------------------------------------------- classes

@dataclass(frozen=True)
class ClassStyle:
    shape: str
    texture: str
    angle: float  # texture orientation in the image: part of the texture family


@lru_cache(maxsize=None)
def class_styles(num_classes: int) -> tuple[ClassStyle, ...]:
    """Shape and texture of each class (no colour); a function of the class count only."""
    styles = []
    for k in range(num_classes):
        shape = SHAPES[k % len(SHAPES)]
        # Shift textures every len(SHAPES) classes so (shape, texture) pairs repeat late.
        texture = TEXTURES[(k + k // len(SHAPES)) % len(TEXTURES)]
        styles.append(ClassStyle(shape, texture, angle=(k * 0.618034 % 1.0) * math.pi))
    return tuple(styles)


# ----------------------------------------------------------------------------- plan

@lru_cache(maxsize=16)
def split_plan(config: SynthConfig, split: str) -> tuple[tuple[int, int, bool], ...]:
    """(class index, target size bucket, multi-class?) per image of a split.

    Systematic sampling keeps the bucket mix and the multi-class share close to their
    targets even for small splits, without a per-class bias from rounding.
    """
    m, k = config.per_class(split), config.classes
    rng = np.random.default_rng([config.seed, _SPLIT_CODE[split], 0])
    cdf = np.cumsum(_BUCKET_WEIGHTS)
    buckets = []
    for _ in range(k):
        u = (rng.random() + np.arange(m)) / max(m, 1)
        buckets.append(rng.permutation(np.minimum(np.searchsorted(cdf, u, side="right"), 3)))
    n = m * k
    multi = rng.permutation((rng.random() + np.arange(n)) / max(n, 1) < MULTI_CLASS_SHARE)
    if k < 2:
        multi[:] = False
    return tuple((j // m, int(buckets[j // m][j % m]), bool(multi[j])) for j in range(n))


# ----------------------------------------------------------------------------- drawing

def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))),
                    dtype=np.float32)


def _smooth_noise(rng, h: int, w: int, cell: float) -> np.ndarray:
    """Value noise in [0, 1]: random lattice values, smoothstep-interpolated (H, W)."""
    gh, gw = int(h / cell) + 3, int(w / cell) + 3
    grid = rng.random((gh, gw), dtype=np.float32)
    ys = np.arange(h, dtype=np.float32) / cell + rng.random()
    xs = np.arange(w, dtype=np.float32) / cell + rng.random()
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _polar_polygon(rho, phi, n: int, r: float):
    """Inside a regular n-gon of circumradius r (angle measured from a vertex)."""
    sector = 2 * np.pi / n
    local = np.mod(phi, sector) - sector / 2
    return rho * np.cos(local) <= r * math.cos(math.pi / n)


@dataclass
class _Geom:
    cx: float
    cy: float
    r: float
    rot: float
    stretch: float  # sqrt(aspect): area-preserving elongation
    lobes: tuple    # blob harmonics (amplitude, phase) for j = 2, 3, 4


def _local(X, Y, g: _Geom):
    dx, dy = X - g.cx, Y - g.cy
    c, s = math.cos(g.rot), math.sin(g.rot)
    return (dx * c + dy * s) / g.stretch, (dy * c - dx * s) * g.stretch


def _shape_mask(shape: str, X, Y, g: _Geom) -> np.ndarray:
    u, v = _local(X, Y, g)
    r = g.r
    if shape in ("ellipse", "bar"):
        return u * u + v * v <= r * r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.886 * r
    if shape == "cross":
        arm = 0.34 * r
        return ((np.abs(u) <= r) & (np.abs(v) <= arm)) | ((np.abs(v) <= r) & (np.abs(u) <= arm))
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    if shape == "triangle":
        return _polar_polygon(rho, phi, 3, 1.3 * r)
    if shape == "hexagon":
        return _polar_polygon(rho, phi, 6, r)
    if shape == "star":
        tri = np.abs(np.mod(phi * (5 / (2 * np.pi)), 1.0) * 2 - 1)  # 1 at the points
        return rho <= r * (0.5 + 0.75 * tri)
    if shape == "ring":
        return (rho <= r) & (rho >= 0.55 * r)
    if shape == "blob":
        edge = 1.0 + sum(a * np.cos(j * phi + p) for j, (a, p) in enumerate(g.lobes, 2))
        return rho <= r * edge
    if shape == "crescent":
        return (rho <= r) & (np.hypot(u - 0.5 * r, v) > 0.8 * r)
    raise LusscoreError(f"unknown shape {shape!r}")


def _place(rng, shape: str, X, Y, h: int, w: int, area: float, stretch_max: float = 1.35):
    """A shape mask covering about `area` of the image, mostly inside it."""
    target = area * h * w
    r = math.sqrt(target / math.pi)
    # Centres keep most of the object in view; large objects stay near the middle.
    mx, my = min(_CENTRE_MARGIN * r, w / 2), min(_CENTRE_MARGIN * r, h / 2)
    g = _Geom(cx=rng.uniform(mx, w - mx), cy=rng.uniform(my, h - my), r=r,
              rot=rng.uniform(0, 2 * math.pi), stretch=math.sqrt(rng.uniform(1.0, stretch_max)),
              lobes=tuple((rng.uniform(0.06, 0.18), rng.uniform(0, 2 * math.pi)) for _ in range(3)))
    mask = _shape_mask(shape, X, Y, g)
    for _ in range(2):  # area scales with r^2; clipping makes one step inexact
        got = int(mask.sum())
        ratio = target / max(got, 1)
        if abs(ratio - 1) < 0.04:
            break
        g.r = min(g.r * math.sqrt(ratio), 2.0 * max(h, w))
        mask = _shape_mask(shape, X, Y, g)
    return mask, g


def _texture(name: str, X, Y, g: _Geom, angle: float, period: float, rng) -> np.ndarray:
    """Mixing weight in [0, 1] between a class's two colours."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = X - g.cx, Y - g.cy
    u, v = (dx * c + dy * s) / period, (dy * c - dx * s) / period
    phase = rng.random()
    if name == "stripes":
        return (np.mod(u + phase, 1.0) < 0.5).astype(np.float32)
    if name == "checkers":
        return (np.mod(np.floor(u + phase) + np.floor(v + phase), 2) == 1).astype(np.float32)
    if name == "dots":
        du, dv = np.mod(u + phase, 1.0) - 0.5, np.mod(v + phase, 1.0) - 0.5
        return (du * du + dv * dv < 0.09).astype(np.float32)
    if name == "noise":
        n = _smooth_noise(rng, X.shape[0], X.shape[1], period * 0.7)
        return np.clip((n - 0.5) * 3.0 + 0.5, 0, 1)
    if name == "rings":
        return (np.mod(np.hypot(dx, dy) / period + phase, 1.0) < 0.5).astype(np.float32)
    if name == "solid":
        return np.zeros_like(X)
    if name == "zigzag":
        tri = np.abs(np.mod(v, 1.0) * 2 - 1)
        return (np.mod(u + 0.6 * tri + phase, 1.0) < 0.5).astype(np.float32)
    if name == "grid":
        lines = (np.mod(u + phase, 1.0) < 0.25) | (np.mod(v + phase, 1.0) < 0.25)
        return lines.astype(np.float32)
    raise LusscoreError(f"unknown texture {name!r}")


def _paint(img, mask, colour_a, colour_b, weight, shade):
    """Blend two colours by weight, with a shading ramp, into img where mask holds."""
    t = weight[mask][:, None]
    img[mask] = (colour_a * (1 - t) + colour_b * t) * shade[mask][:, None]


def palette_colour(rng, value: float | None = None) -> np.ndarray:
    """One colour of the shared palette: the only colour law of the dataset (objects of every
    class, background, clutter). `value` fixes the brightness, else it is drawn too."""
    v = rng.uniform(0.2, 0.95) if value is None else value
    return _hsv(rng.random(), rng.uniform(0.15, 0.9), v)


def _object_colours(rng) -> tuple[np.ndarray, np.ndarray]:
    """Two palette colours of independent hue and saturation whose values differ by a gap
    drawn from _OBJECT_CONTRAST, in random order."""
    gap = rng.uniform(*_OBJECT_CONTRAST)
    low = rng.uniform(0.15, 0.95 - gap)
    a, b = palette_colour(rng, low), palette_colour(rng, low + gap)
    return (a, b) if rng.random() < 0.5 else (b, a)


def _clutter_colours(rng) -> tuple[np.ndarray, np.ndarray]:
    """A palette colour and a faint variant of it (a low-contrast texture)."""
    a = palette_colour(rng)
    return a, a + rng.uniform(*_CLUTTER_CONTRAST) * (palette_colour(rng) - a)


def _draw_background(rng, X, Y, h: int, w: int) -> np.ndarray:
    """Gradient between two palette colours, smooth noise and faint textured clutter; the same
    law for every class."""
    a, b = palette_colour(rng), palette_colour(rng)
    ang = rng.uniform(0, 2 * math.pi)
    ramp = ((X - w / 2) * math.cos(ang) + (Y - h / 2) * math.sin(ang)) / max(h, w) + 0.5
    ramp = np.clip(ramp, 0, 1)[..., None]
    img = a * (1 - ramp) + b * ramp
    img = img * (0.85 + 0.3 * _smooth_noise(rng, h, w, max(h, w) / 4))[..., None]
    size = max(h, w)
    for _ in range(int(rng.integers(1, 6))):
        shape = ("ellipse", "square", "bar")[int(rng.integers(0, 3))]
        stretch = 6.0 if shape == "bar" else 1.6
        mask, g = _place(rng, shape, X, Y, h, w, rng.uniform(0.005, 0.04), stretch_max=stretch)
        texture = TEXTURES[int(rng.integers(0, len(TEXTURES)))]
        col_a, col_b = _clutter_colours(rng)
        period = _PERIODS[texture] * (size / 96) * rng.uniform(0.85, 1.15)
        weight = _texture(texture, X, Y, g, rng.uniform(0, math.pi), period, rng)
        _paint(img, mask, col_a, col_b, weight, np.ones_like(X))
    return img


def _draw_object(rng, img, X, Y, style: ClassStyle, h: int, w: int, area: float, size: int):
    mask, g = _place(rng, style.shape, X, Y, h, w, area)
    col_a, col_b = _object_colours(rng)  # independent of the class
    period = _PERIODS[style.texture] * (size / 96) * rng.uniform(0.85, 1.15)
    weight = _texture(style.texture, X, Y, g, style.angle + rng.normal(0, 0.15), period, rng)
    ang = rng.uniform(0, 2 * math.pi)
    ramp = ((X - g.cx) * math.cos(ang) + (Y - g.cy) * math.sin(ang)) / max(g.r, 1.0)
    shade = 1.0 + rng.uniform(0.0, 0.15) * np.clip(ramp, -1, 1)
    _paint(img, mask, col_a, col_b, weight, shade)
    return mask


_BAND = ndimage.generate_binary_structure(2, 1)


def _ignore_band(region: np.ndarray) -> np.ndarray | None:
    """A ~2 px band across a region's border (not along the image edge), or None when the
    region is too thin to keep most of its pixels."""
    inner = ndimage.binary_erosion(region, _BAND, border_value=1)
    if inner.sum() < 0.5 * region.sum():
        return None
    return ndimage.binary_dilation(region, _BAND) & ~inner


def _jitter(rng, img: np.ndarray) -> np.ndarray:
    """Mild photometric jitter and sensor noise, then 8-bit."""
    img = img * (1 + rng.uniform(-0.06, 0.06, size=3).astype(np.float32))  # white balance
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.85, 1.15) + mean * rng.uniform(0.88, 1.12)
    # Uniform noise of the same spread as Gaussian sensor noise, at a quarter of the cost.
    sigma = rng.uniform(1.5, 4.5) * math.sqrt(12.0)
    img = img * 255 + sigma * (rng.random(img.shape, dtype=np.float32) - 0.5)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_sample(config: SynthConfig, split: str, index: int):
    """(RGB uint8 image (H, W, 3), int32 label (H, W), class index of the folder).

    Labels: 0 = other, 1..K = class ids, 1000 = ignore band.
    """
    if split not in SPLITS:
        raise LusscoreError(f"split must be one of {SPLITS}, got {split!r}")
    plan = split_plan(config, split)
    if not 0 <= index < len(plan):
        raise LusscoreError(f"{split} has {len(plan)} images; index {index} is out of range")
    class_index, bucket, multi = plan[index]
    styles = class_styles(config.classes)
    rng = np.random.default_rng([config.seed, _SPLIT_CODE[split], 1, index])
    size = config.size
    h = int(round(size * rng.uniform(0.75, 1.25)))
    w = int(round(size * rng.uniform(0.75, 1.25)))
    Y, X = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5

    img = _draw_background(rng, X, Y, h, w)
    label = np.zeros((h, w), dtype=np.int32)
    area = rng.uniform(*_TARGET_AREAS[bucket])
    primary = class_index + 1
    label[_draw_object(rng, img, X, Y, styles[class_index], h, w, area, size)] = primary
    bands = rng.random(2) < _IGNORE_BAND_PROB

    if multi:
        other = int(rng.integers(0, config.classes - 1))
        other += other >= class_index
        share = rng.uniform(0.25, 0.45) * (label == primary).sum() / (h * w)
        # Drawn on top and smaller, so the primary stays the largest; shrink if clipping or
        # the band would break that, and give up (single-class image) as a last resort.
        for scale in (1.0, 0.6, 0.35):
            img2, label2 = img.copy(), label.copy()
            mask = _draw_object(rng, img2, X, Y, styles[other], h, w, share * scale, size)
            label2[mask] = other + 1
            label2 = _apply_bands(label2, (primary, other + 1), bands)
            counts = np.bincount(label2.ravel(), minlength=max(primary, other + 1) + 1)
            if counts[other + 1] > 0 and counts[primary] > counts[other + 1]:
                return _jitter(rng, img2), label2, class_index
    label = _apply_bands(label, (primary,), bands)
    return _jitter(rng, img), label, class_index


def _apply_bands(label: np.ndarray, ids, flags) -> np.ndarray:
    out = label.copy()
    for k, flag in zip(ids, flags):
        if flag:
            band = _ignore_band(label == k)
            if band is not None:
                out[band] = IGNORE_INDEX
    return out


def label_stats(label: np.ndarray, num_classes: int) -> dict:
    """Per-image statistics: size bucket per class present, ignore pixels."""
    valid = label != IGNORE_INDEX
    n_valid = int(valid.sum())
    counts = np.bincount(label[valid].ravel(), minlength=num_classes + 1)
    objects = {int(k): size_bucket(int(counts[k]), n_valid)
               for k in range(1, num_classes + 1) if counts[k] > 0}
    return {"objects": objects, "ignore_px": int(label.size - n_valid), "px": int(label.size),
            "shares": [float(counts[k]) / n_valid for k in objects]}


# ----------------------------------------------------------------------------- writing

def _write_one(task) -> dict:
    out, config, split, index = task
    img, label, class_index = render_sample(config, split, index)
    wnid = wnids(config.classes)[class_index]
    i = index % config.per_class(split)
    name = image_name(config, split, class_index, i)
    with atomic_path(Path(out) / split / wnid / f"{name}.JPEG") as tmp:
        Image.fromarray(img).save(tmp, format="JPEG", quality=JPEG_QUALITY)
    write_label_png(Path(out) / LABEL_FOLDERS[split] / wnid / f"{name}.png", label)
    stats = label_stats(label, config.classes)
    stats.update(split=split, index=index, h=label.shape[0], w=label.shape[1])
    return stats


def _summarise(config: SynthConfig, records: list[dict]) -> dict:
    def block(recs):
        buckets = [0, 0, 0, 0]
        for r in recs:
            for b in r["objects"].values():
                buckets[b] += 1
        n = max(len(recs), 1)
        return {
            "images": len(recs),
            "size_buckets": dict(zip(SIZE_BUCKETS, buckets)),
            "multi_class_share": sum(len(r["objects"]) >= 2 for r in recs) / n,
            "ignore_band_share": sum(r["ignore_px"] > 0 for r in recs) / n,
            "ignore_pixel_share":
                sum(r["ignore_px"] for r in recs) / max(sum(r["px"] for r in recs), 1),
        }

    records = sorted(records, key=lambda r: (_SPLIT_CODE[r["split"]], r["index"]))
    summary = {"generator_version": GENERATOR_VERSION, "config": asdict(config)}
    summary.update(block(records))
    shares = [s for r in records for s in r["shares"]]
    summary["mean_object_share"] = float(np.mean(shares)) if shares else 0.0
    summary["size_buckets_covered"] = sum(v > 0 for v in summary["size_buckets"].values())
    summary["image_height_range"] = [min(r["h"] for r in records), max(r["h"] for r in records)]
    summary["image_width_range"] = [min(r["w"] for r in records), max(r["w"] for r in records)]
    summary["counts"] = {s: sum(r["split"] == s for r in records) for s in SPLITS}
    summary["splits"] = {s: block([r for r in records if r["split"] == s]) for s in SPLITS}
    return summary


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LusscoreError(f"{path}: cannot read ({e}); delete the folder to regenerate") from None
    if not isinstance(data, dict):
        raise LusscoreError(
            f"{path}: not a synthetic dataset record; delete the folder to regenerate")
    return data


def _config_mismatch(stored: dict, config: SynthConfig) -> str | None:
    want = {"generator_version": GENERATOR_VERSION, **asdict(config)}
    have = {"generator_version": stored.get("generator_version"), **(stored.get("config") or {})}
    diff = [f"{k}: {have.get(k)!r} there, {v!r} asked" for k, v in want.items() if have.get(k) != v]
    diff += [f"{k}: {have[k]!r} there, not a setting now" for k in have if k not in want]
    return "; ".join(diff) or None


def generate_dataset(out, config: SynthConfig | None = None, progress: bool = True,
                     workers: int = 1) -> dict:
    """Write a synthetic ImageNet-S-layout dataset under `out` and return its summary.

    A folder that already holds the same dataset (synth.json) is reused as it is; one holding
    a different dataset, or anything else, is refused rather than overwritten. An interrupted
    run of the same config is redone in place (all writes are atomic).
    """
    config = SynthConfig() if config is None else config
    if not isinstance(config, SynthConfig):
        raise LusscoreError(f"config must be a SynthConfig, got {type(config).__name__}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise LusscoreError(f"workers must be an integer >= 1, got {workers!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LusscoreError(f"{out} exists and is not a folder")

    done, pending = out / SUMMARY_FILE, out / PENDING_FILE
    if done.is_file():
        stored = _read_json(done)
        diff = _config_mismatch(stored, config)
        if diff:
            raise LusscoreError(
                f"{out} already holds a synthetic dataset with a different config ({diff}); "
                "choose another folder or delete this one")
        return stored
    if pending.is_file():
        diff = _config_mismatch(_read_json(pending), config)
        if diff:
            raise LusscoreError(
                f"{out} holds an unfinished synthetic dataset with a different config ({diff}); "
                "choose another folder or delete this one")
    elif out.is_dir() and any(out.iterdir()):
        raise LusscoreError(
            f"{out} is not empty and holds no synthetic dataset ({SUMMARY_FILE} missing); "
            "choose an empty or new folder")

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(pending, json.dumps(
        {"generator_version": GENERATOR_VERSION, "config": asdict(config)}, indent=1))
    names = wnids(config.classes)
    write_categories(out / "categories.txt", names)

    tasks = [(str(out), config, s, j) for s in SPLITS
             for j in range(config.classes * config.per_class(s))]
    bar = progress_bar(total=len(tasks), desc="synth", unit="img", disable=not progress)
    records = []
    try:
        if workers == 1:
            for t in tasks:
                records.append(_write_one(t))
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                chunk = max(1, len(tasks) // (workers * 16))
                for rec in pool.map(_write_one, tasks, chunksize=chunk):
                    records.append(rec)
                    bar.update()
    finally:
        bar.close()

    for split in NAMED_SPLITS:
        if config.per_class(split) == 0:  # no such split: no names file claiming one
            continue
        pairs = []
        for c, wnid in enumerate(names):
            for i in range(config.per_class(split)):
                stem = image_name(config, split, c, i)
                pairs.append((f"{wnid}/{stem}.JPEG", f"{wnid}/{stem}.png"))
        write_names(out / "names" / f"{split}.txt", pairs)

    summary = _summarise(config, records)
    atomic_write_text(done, json.dumps(summary, indent=1, sort_keys=True))
    pending.unlink()
    return summary
