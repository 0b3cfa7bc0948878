"""The ImageNet-S dataset layout: category lists, names files, splits and samples.

Root layout (that of the official benchmark)::

    train/<wnid>/*.JPEG                      unlabeled training images (class = folder)
    train-semi/<wnid>/*.JPEG                 pixel-annotated training images
    train-semi-segmentation/<wnid>/*.png     their label PNGs
    validation/<wnid>/*.JPEG                 validation images
    validation-segmentation/<wnid>/*.png     their label PNGs
    test/<wnid>/*.JPEG                       held-out test images
    test-segmentation/<wnid>/*.png           their label PNGs (synthetic sets only: the
                                             benchmark keeps its test GT on its server)

Class id k is the k-th wnid of the sorted category list (1..K); 0 = other, 1000 = ignore.
A root may carry `categories.txt` (one wnid a line) and names files
`names/<split>.txt` (`image-path label-path` lines, relative to the split's image and
segmentation folders); without them the packaged benchmark lists or a folder scan are used.
`has_labels(split)` tells whether a split has GT; `split_images(split)` lists a split's
images with the names their label (or prediction) PNGs take, GT or not.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from lusscore.data.label_io import image_size, read_image, read_label_png
from lusscore.utils import LusscoreError, atomic_write_text, files_under

SUBSETS = (50, 300, 919)
IMAGE_SPLITS = ("train", "train-semi", "validation", "test")
SEGMENTATION_SPLITS = {"train-semi": "train-semi-segmentation",
                       "validation": "validation-segmentation",
                       "test": "test-segmentation"}
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
CATEGORIES_FILE = "categories.txt"


def _packaged_list(name: str) -> str:
    return resources.files("lusscore.data").joinpath("lists", name).read_text()


def benchmark_categories(num_classes: int) -> list[str]:
    """The official wnid list of ImageNet-S{50,300,919}, sorted (class id = index + 1)."""
    if num_classes not in SUBSETS:
        raise LusscoreError(f"ImageNet-S subsets have {SUBSETS} classes, not {num_classes}")
    return _packaged_list(f"ImageNetS_categories_im{num_classes}.txt").split()


def benchmark_names(num_classes: int, split: str) -> list[tuple[str, str]]:
    """The official names list of a subset: 'validation' or 'train-semi'."""
    if num_classes not in SUBSETS:
        raise LusscoreError(f"ImageNet-S subsets have {SUBSETS} classes, not {num_classes}")
    files = {"validation": f"ImageNetS_im{num_classes}_validation.txt",
             "train-semi": f"ImageNetSemi_im{num_classes}_train.txt"}
    if split not in files:
        raise LusscoreError(f"the benchmark has names lists for {sorted(files)}, not {split!r}")
    return parse_names(_packaged_list(files[split]), source=files[split])


def read_categories(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"category list not found: {path}")
    wnids = path.read_text().split()
    if not wnids:
        raise LusscoreError(f"{path}: the category list is empty")
    if wnids != sorted(wnids) or len(set(wnids)) != len(wnids):
        raise LusscoreError(f"{path}: the category list must be sorted and without repeats")
    return wnids


def write_categories(path: str | os.PathLike, wnids: list[str]) -> None:
    atomic_write_text(path, "".join(f"{w}\n" for w in sorted(wnids)))


def parse_names(text: str, source: str = "<names>") -> list[tuple[str, str]]:
    pairs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise LusscoreError(
                f"{source}:{lineno}: expected 'image-path label-path', got {line!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def read_names(path: str | os.PathLike) -> list[tuple[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"names file not found: {path}")
    return parse_names(path.read_text(), source=str(path))


def write_names(path: str | os.PathLike, pairs: list[tuple[str, str]]) -> None:
    atomic_write_text(path, "".join(f"{img} {lab}\n" for img, lab in pairs))


def _iter_images(folder: Path):
    return files_under(folder, tuple(IMAGE_EXTENSIONS))


def _scan_images(folder: Path) -> list[Path]:
    return sorted(_iter_images(folder))


def image_folder_samples(root: str | os.PathLike) -> list[tuple[Path, int]]:
    """(image, index of its class folder) of an ImageFolder tree: ROOT/train/<class>/* when
    ROOT has a train folder (e.g. the full ImageNet-1k), else ROOT/<class>/*."""
    root = Path(root)
    folder = root / "train" if (root / "train").is_dir() else root
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples = [(p, i) for i, d in enumerate(classes) for p in _scan_images(d)]
    if not samples:
        raise LusscoreError(f"{folder}: no images in class folders (expected {folder}/<class>/*.JPEG)")
    return samples


@dataclass(frozen=True)
class ImageSample:
    """An image of a split, GT or not: what a prediction needs."""
    image: Path
    name: str  # its label (prediction) path relative to a label folder: 'n01443537/x.png'


@dataclass(frozen=True)
class SegmentationSample:
    image: Path
    label: Path
    name: str  # label path relative to the segmentation folder, e.g. 'n01443537/x.png'


class ImageNetS:
    """An ImageNet-S root on disk (the benchmark or a synthetic set in its layout).

    num_classes picks the packaged category list when the root has no categories.txt.
    """

    def __init__(self, root: str | os.PathLike, num_classes: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root not found: {self.root}")
        own = self.root / CATEGORIES_FILE
        if own.is_file():
            self.wnids = read_categories(own)
            if num_classes is not None and num_classes != len(self.wnids):
                raise LusscoreError(
                    f"{own} lists {len(self.wnids)} classes but num_classes={num_classes}")
        elif num_classes is not None:
            self.wnids = benchmark_categories(num_classes)
        elif (self.root / "train").is_dir():
            self.wnids = sorted(p.name for p in (self.root / "train").iterdir() if p.is_dir())
        else:
            raise LusscoreError(
                f"{self.root}: no {CATEGORIES_FILE}, no train/ folder and no num_classes given; "
                "cannot tell the class list")
        self._class_ids = {w: i + 1 for i, w in enumerate(self.wnids)}

    @property
    def num_classes(self) -> int:
        return len(self.wnids)

    def class_id(self, wnid: str) -> int:
        try:
            return self._class_ids[wnid]
        except KeyError:
            raise LusscoreError(f"{wnid!r} is not one of the {self.num_classes} categories") from None

    def split_dir(self, split: str) -> Path:
        if split not in IMAGE_SPLITS and split not in SEGMENTATION_SPLITS.values():
            raise LusscoreError(f"unknown split {split!r}; one of {IMAGE_SPLITS}")
        return self.root / split

    def image_samples(self, split: str = "train") -> list[tuple[Path, int]]:
        """(image path, class id of its folder) for every image of an image split."""
        folder = self.split_dir(split)
        if not folder.is_dir():
            raise FileNotFoundError(f"split folder not found: {folder}")
        samples = []
        for wnid in self.wnids:
            sub = folder / wnid
            if sub.is_dir():
                samples.extend((p, self._class_ids[wnid]) for p in _scan_images(sub))
        if not samples:
            raise LusscoreError(f"{folder}: no images found in the category folders")
        return samples

    def names_path(self, split: str) -> Path:
        return self.root / "names" / f"{split}.txt"

    def labels_dir(self, split: str) -> Path:
        """The GT folder of a split with labels (e.g. validation-segmentation)."""
        if split not in SEGMENTATION_SPLITS:
            raise LusscoreError(f"splits with labels are {sorted(SEGMENTATION_SPLITS)}, not {split!r}")
        return self.root / SEGMENTATION_SPLITS[split]

    def has_images(self, split: str) -> bool:
        folder = self.split_dir(split)
        return folder.is_dir() and next(_iter_images(folder), None) is not None

    def has_labels(self, split: str) -> bool:
        """Whether the split's GT folder exists and holds label PNGs (the benchmark's test
        split has none: its GT stays on the evaluation server)."""
        if split not in SEGMENTATION_SPLITS:
            return False
        folder = self.labels_dir(split)
        return folder.is_dir() and next(files_under(folder, (".png",)), None) is not None

    def split_images(self, split: str, names: str | os.PathLike | None = None) -> list[ImageSample]:
        """Every image of a split with its label name ('wnid/x.png'), whether or not the split
        has GT: the names file's pairs (names, else names/<split>.txt) or a scan of the split
        folder (the image path with a .png suffix)."""
        img_dir = self.split_dir(split)
        names_file = Path(names) if names is not None else self.names_path(split)
        if names_file.is_file():
            pairs = read_names(names_file)
        elif names is None and img_dir.is_dir():
            pairs = [(p.relative_to(img_dir).as_posix(),
                      p.relative_to(img_dir).with_suffix(".png").as_posix())
                     for p in _scan_images(img_dir)]
        elif names is not None:
            raise FileNotFoundError(f"names file not found: {names_file}")
        else:
            raise FileNotFoundError(f"split folder not found: {img_dir}")
        if not pairs:
            raise LusscoreError(f"{names_file if names_file.is_file() else img_dir}: no {split} images")
        seen: dict[str, str] = {}
        for img, lab in pairs:  # two images with one label name would share a prediction
            if lab in seen:
                raise LusscoreError(f"{split}: images {seen[lab]} and {img} both map to {lab}")
            seen[lab] = img
        return [ImageSample(img_dir / i, l) for i, l in pairs]

    def segmentation_samples(self, split: str = "validation",
                             names: str | os.PathLike | None = None) -> list[SegmentationSample]:
        """Image/label pairs of 'validation', 'train-semi' or 'test', from a names file or a scan."""
        img_dir, seg_dir = self.root / split, self.labels_dir(split)
        if not seg_dir.is_dir():  # e.g. the benchmark's test split: split_images lists its images
            raise FileNotFoundError(f"GT folder not found: {seg_dir}")
        names_file = Path(names) if names is not None else self.names_path(split)
        if names_file.is_file():
            pairs = read_names(names_file)
        elif names is None:
            pairs = []
            for lab in _scan_images(seg_dir):
                rel = lab.relative_to(seg_dir).with_suffix("")
                img = next((img_dir / rel.with_suffix(e) for e in (".JPEG", ".jpg", ".jpeg", ".png")
                            if (img_dir / rel.with_suffix(e)).is_file()), None)
                if img is not None:
                    pairs.append((img.relative_to(img_dir).as_posix(),
                                  lab.relative_to(seg_dir).as_posix()))
        else:
            raise FileNotFoundError(f"names file not found: {names_file}")
        return [SegmentationSample(img_dir / i, seg_dir / l, l) for i, l in pairs]

    def train_semi_samples(self) -> list[SegmentationSample]:
        """The pixel-annotated train-semi pairs that the semi-supervised and distance-matching
        protocols learn from; an error naming what is missing when there are none."""
        try:
            samples = self.segmentation_samples("train-semi")
        except FileNotFoundError:
            samples = []
        if not samples:
            raise LusscoreError(f"{self.root}: no train-semi images (train-semi/ with "
                                "train-semi-segmentation/ label PNGs); the semi-supervised and "
                                "distance-matching protocols need them")
        return samples

    def prediction_samples(self, split: str) -> list[ImageSample] | list[SegmentationSample]:
        """What to predict for a split: its image/label pairs when it has GT, else its images."""
        return self.segmentation_samples(split) if self.has_labels(split) else self.split_images(split)


def load_segmentation_pair(sample: SegmentationSample):
    """(PIL RGB image, (H, W) int64 label) with the sizes checked against each other."""
    img = read_image(sample.image)
    label = read_label_png(sample.label, expected_size=(img.height, img.width))
    return img, label


def check_same_size(label_path, image_path) -> None:
    lh, lw = image_size(label_path)
    ih, iw = image_size(image_path)
    if (lh, lw) != (ih, iw):
        raise LusscoreError(
            f"size mismatch: label {label_path} is {lh}x{lw} but image {image_path} is {ih}x{iw} (HxW)")


def class_presence(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Sorted class ids 1..num_classes present in a label map (0 and ignore excluded)."""
    ids = np.unique(label)
    return ids[(ids >= 1) & (ids <= num_classes)]
