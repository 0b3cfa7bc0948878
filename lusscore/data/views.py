"""Geometry-aware multi-crop views (the SwAV recipe) for PASS.

Each crop remembers where it came from: its box (left, top, width, height) in original-image
pixels and whether it was mirrored, which is what overlap_gather needs to align the same
physical pixels in two views.

Recipe per crop (SwAV's multicropdataset): random resized crop (per-crop-size scale range,
aspect ratio 3/4..4/3, bilinear), horizontal flip p 0.5, then the photometric augmentation
(photometric.py: colour jitter, grayscale, optional polarity inversion, Gaussian blur), to
float in [0, 1] and normalised. The loader crops each image and draws its crops' photometric
parameters; `MultiCropTransform.collate` applies them to the whole batch at once.

Normalisation: ImageNet mean/std by default; std_quirk=True uses the reference code's std
(0.228, 0.224, 0.225) (its first channel is 0.228 instead of 0.229).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from lusscore.data.photometric import PhotometricAugment
from lusscore.data.transforms import IMAGENET_MEAN, IMAGENET_STD

REFERENCE_STD = (0.228, 0.224, 0.225)  # the reference code's pretrain std (quirk)


@dataclass
class MultiCropSample:
    """The crops of one image before their photometric augmentation: crops[k] (3, s_k, s_k)
    in the image's dtype (uint8, or float in [0, 1]), boxes (n, 4) float32 (left, top, width,
    height) in original pixels, flips (n) bool, photometric (n, N_UNIFORMS) each crop's draw
    (PhotometricAugment.draw); priors[k] (s_k, s_k) the same crops of the image's saliency
    map, when it has one (crop_like)."""
    crops: list
    boxes: torch.Tensor
    flips: torch.Tensor
    photometric: torch.Tensor
    priors: list | None = None


@dataclass
class MultiCropBatch:
    """A batch: images[k] (B, 3, s_k, s_k) (float, augmented and normalised when
    MultiCropTransform.collate made it), boxes[k] (B, 4), flips[k] (B) per crop k; labels (B)
    when the dataset gave them; priors[k] (B, s_k, s_k) when the samples had them."""
    images: list
    boxes: list
    flips: list
    labels: torch.Tensor | None = None
    priors: list | None = None

    def by_size(self) -> list:
        """Crops concatenated per run of equal sizes (for one backbone pass per resolution):
        [(n_s * B, 3, s, s), ...] in crop order."""
        groups, current = [], []
        for img in self.images:
            if current and img.shape[-2:] != current[-1].shape[-2:]:
                groups.append(torch.cat(current))
                current = []
            current.append(img)
        if current:
            groups.append(torch.cat(current))
        return groups


def _check_lists(size_crops, nmb_crops, min_scale_crops, max_scale_crops):
    n = len(size_crops)
    if not (len(nmb_crops) == len(min_scale_crops) == len(max_scale_crops) == n) or n == 0:
        raise ValueError("MultiCropTransform: size_crops, nmb_crops, min_scale_crops and "
                         "max_scale_crops must be non-empty lists of the same length, got "
                         f"{size_crops}, {nmb_crops}, {min_scale_crops}, {max_scale_crops}")
    for lo, hi in zip(min_scale_crops, max_scale_crops):
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"MultiCropTransform: scale range ({lo}, {hi}) must satisfy "
                             "0 < min <= max <= 1")


class MultiCropTransform:
    """image (PIL or (C, H, W) tensor) -> MultiCropSample of sum(nmb_crops) crops.

    Defaults are PASS's S300/S919 setting: 2 x 224 crops at scale (0.08, 1). S50 uses
    size_crops=(224, 96), nmb_crops=(2, 6), min_scale_crops=(0.14, 0.05),
    max_scale_crops=(1.0, 0.14).
    """

    def __init__(self, size_crops: Sequence[int] = (224,), nmb_crops: Sequence[int] = (2,),
                 min_scale_crops: Sequence[float] = (0.08,),
                 max_scale_crops: Sequence[float] = (1.0,),
                 ratio: tuple = (3 / 4, 4 / 3), mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] | None = None, std_quirk: bool = False,
                 flip_p: float = 0.5, jitter_strength: float = 1.0, color_p: float = 0.8,
                 grayscale_p: float = 0.2, blur_p: float = 0.5,
                 blur_sigma: tuple = (0.1, 2.0), invert_p: float = 0.0):
        _check_lists(size_crops, nmb_crops, min_scale_crops, max_scale_crops)
        self.crop_specs = [(int(s), (float(lo), float(hi)))
                           for s, n, lo, hi in zip(size_crops, nmb_crops, min_scale_crops,
                                                   max_scale_crops) for _ in range(n)]
        self.size_runs = [(int(s), int(n)) for s, n in zip(size_crops, nmb_crops)]
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_p = flip_p
        self.photometric = PhotometricAugment(jitter_strength, color_p, grayscale_p, blur_p,
                                              blur_sigma, invert_p)
        std = tuple(std) if std is not None else (REFERENCE_STD if std_quirk else IMAGENET_STD)
        self.mean = torch.tensor([float(v) for v in mean]).view(1, 3, 1, 1)
        self.std = torch.tensor([float(v) for v in std]).view(1, 3, 1, 1)

    def crop(self, image: torch.Tensor, size: int, scale: tuple):
        """One crop of a (C, H, W) image tensor: (crop, (left, top, width, height), flipped)."""
        top, left, height, width = T.RandomResizedCrop.get_params(image, list(scale),
                                                                  list(self.ratio))
        out = TF.resized_crop(image, top, left, height, width, [size, size],
                              interpolation=T.InterpolationMode.BILINEAR, antialias=True)
        flipped = bool(torch.rand(()) < self.flip_p)
        if flipped:
            out = TF.horizontal_flip(out)
        return out, (float(left), float(top), float(width), float(height)), flipped

    def __call__(self, image) -> MultiCropSample:
        image = TF.to_image(image) if not isinstance(image, torch.Tensor) else image
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"MultiCropTransform: expected an RGB image, PIL or a (3, H, W) "
                             f"tensor (uint8, or float in [0, 1]), got shape {tuple(image.shape)}")
        crops, boxes, flips, photometric = [], [], [], []
        for size, scale in self.crop_specs:
            out, box, flipped = self.crop(image, size, scale)
            crops.append(out)
            boxes.append(box)
            flips.append(flipped)
            photometric.append(self.photometric.draw())
        return MultiCropSample(crops, torch.tensor(boxes, dtype=torch.float32),
                               torch.tensor(flips, dtype=torch.bool), torch.stack(photometric))

    def finish(self, crops: torch.Tensor, photometric: torch.Tensor) -> torch.Tensor:
        """(N, 3, s, s) crops and their draws -> augmented, normalised float crops."""
        return self.photometric.apply(crops, photometric).sub_(self.mean).div_(self.std)

    def collate(self, samples: list) -> MultiCropBatch:
        """Samples of this transform (or (sample, label) pairs) -> a batch, every crop of a
        position augmented at once (the loader's collate_fn)."""
        batch = collate_multicrop(samples)
        draws = torch.stack([s.photometric for s in _samples(samples)], dim=1)  # (n, B, U)
        images, start = [], 0
        for size, count in self.size_runs:  # one call per run of equal sizes: fewer, larger ops
            crops = torch.cat(batch.images[start:start + count])
            done = self.finish(crops, draws[start:start + count].flatten(0, 1))
            images += list(done.view(count, -1, 3, size, size).unbind(0))
            start += count
        batch.images = images
        return batch


def crop_like(sample: MultiCropSample, prior: torch.Tensor) -> MultiCropSample:
    """The sample with priors: each crop's box and flip applied to a (H, W) map in [0, 1] of
    the original image (bilinear, as the crop itself; clamped to [0, 1], which the
    antialiasing filter's rounding can leave by a few ulps)."""
    priors = []
    for crop, (left, top, width, height), flipped in zip(sample.crops, sample.boxes.tolist(),
                                                         sample.flips.tolist()):
        out = TF.resized_crop(prior[None], int(top), int(left), int(height), int(width),
                              list(crop.shape[-2:]), interpolation=T.InterpolationMode.BILINEAR,
                              antialias=True)[0].clamp(0, 1)
        priors.append(TF.horizontal_flip(out) if flipped else out)
    return MultiCropSample(sample.crops, sample.boxes, sample.flips, sample.photometric, priors)


AUGMENT_KEYS = ("jitter_strength", "color_p", "grayscale_p", "blur_p", "blur_sigma", "invert_p")


def augment_options(section: dict | None) -> dict:
    """MultiCropTransform's photometric keyword arguments from a config's `augment` section
    (SwAV's values for the keys it leaves out); an unknown key is an error."""
    section = dict(section or {})
    unknown = sorted(set(section) - set(AUGMENT_KEYS))
    if unknown:
        raise ValueError(f"augment: unknown keys {unknown}; known: {list(AUGMENT_KEYS)}")
    if "blur_sigma" in section:
        lo, hi = (float(v) for v in section["blur_sigma"])
        if not 0 < lo <= hi:
            raise ValueError(f"augment.blur_sigma must be [min, max] with 0 < min <= max, "
                             f"got {section['blur_sigma']}")
        section["blur_sigma"] = (lo, hi)
    for key in ("color_p", "grayscale_p", "blur_p", "invert_p"):
        if key in section and not 0 <= float(section[key]) <= 1:
            raise ValueError(f"augment.{key} must lie in [0, 1], got {section[key]}")
    return section


def _samples(samples: list) -> list:
    """The MultiCropSample items of a list of samples or (sample, label) pairs."""
    return samples if isinstance(samples[0], MultiCropSample) else [s[0] for s in samples]


def collate_multicrop(samples: list) -> MultiCropBatch:
    """Stack MultiCropSample items (or (MultiCropSample, label) pairs) into a batch of their
    crops as they are (MultiCropTransform.collate also augments them)."""
    if not samples:
        raise ValueError("collate_multicrop: empty batch")
    labels = None
    if not isinstance(samples[0], MultiCropSample):
        labels = torch.as_tensor([s[1] for s in samples])
    samples = _samples(samples)
    n = len(samples[0].crops)
    if any(len(s.crops) != n for s in samples):
        raise ValueError("collate_multicrop: every sample must have the same number of crops")
    images = [torch.stack([s.crops[k] for s in samples]) for k in range(n)]
    boxes = [torch.stack([s.boxes[k] for s in samples]) for k in range(n)]
    flips = [torch.stack([s.flips[k] for s in samples]) for k in range(n)]
    priors = None
    if samples[0].priors is not None:
        priors = [torch.stack([s.priors[k] for s in samples]) for k in range(n)]
    return MultiCropBatch(images, boxes, flips, labels, priors)
