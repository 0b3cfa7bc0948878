"""Image + label-map datasets for fine-tuning and inference (joint geometric transforms)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from lusscore.data.label_io import read_image, read_label_png
from lusscore.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_normalized_tensor


class LabeledImages(Dataset):
    """(image, label) pairs; training applies random-resized-crop + flip to both at once.

    The label is then resized (nearest) to label_size, as PASS trains on half-resolution
    labels. Label ids pass through unchanged (ignore = 1000 stays 1000).
    """

    def __init__(self, pairs: list[tuple[str | os.PathLike, str | os.PathLike]], crop: int = 224,
                 label_size: int = 112, scale=(0.08, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.pairs = [(Path(i), Path(l)) for i, l in pairs]
        self.joint = v2.Compose([v2.RandomResizedCrop(crop, scale=tuple(scale), antialias=True),
                                 v2.RandomHorizontalFlip(0.5)])
        self.label_size, self.mean, self.std = label_size, mean, std

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        img_path, lab_path = self.pairs[i]
        img = read_image(img_path)
        label = read_label_png(lab_path, expected_size=(img.height, img.width))
        image = tv_tensors.Image(TF.pil_to_tensor(img))
        mask = tv_tensors.Mask(torch.from_numpy(label))
        image, mask = self.joint(image, mask)
        mask = TF.resize(mask[None], [self.label_size, self.label_size],
                         interpolation=v2.InterpolationMode.NEAREST)[0]
        return to_normalized_tensor(image.as_subclass(torch.Tensor), self.mean, self.std), mask.long()


class InferenceImages(Dataset):
    """Images resized (shorter side) for inference; returns (tensor, index, original (H, W))."""

    def __init__(self, paths: list[str | os.PathLike], resize: int = 256, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        self.paths = [Path(p) for p in paths]
        self.resize, self.mean, self.std = resize, mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = read_image(self.paths[i])
        size = (img.height, img.width)
        img = TF.resize(img, self.resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        return to_normalized_tensor(img, self.mean, self.std), i, torch.tensor(size)
