"""Image + label-map datasets for fine-tuning and inference (joint geometric transforms)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from lusscore.data.label_io import read_image, read_label_png
from lusscore.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_normalized_tensor


class LabeledImages(Dataset):
    """(image, label) pairs; training takes one random resized crop (scale range, aspect
    3/4..4/3) of both and mirrors both with p 0.5.

    The image crop is resized to `crop` (bilinear, antialiased), the label's to label_size
    (nearest), as PASS trains on half-resolution labels: each in one PIL call from the same
    box. Label ids pass through unchanged (ignore = 1000 stays 1000).
    """

    def __init__(self, pairs: list[tuple[str | os.PathLike, str | os.PathLike]], crop: int = 224,
                 label_size: int = 112, scale=(0.08, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.pairs = [(Path(i), Path(l)) for i, l in pairs]
        self.crop, self.label_size = int(crop), int(label_size)
        self.scale, self.ratio = [float(v) for v in scale], [3 / 4, 4 / 3]
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        img_path, lab_path = self.pairs[i]
        img = read_image(img_path)
        label = read_label_png(lab_path, dtype=np.int32, expected_size=(img.height, img.width))
        top, left, height, width = v2.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        box = (left, top, left + width, top + height)
        image = img.resize((self.crop, self.crop), Image.BILINEAR, box=box)
        mask = Image.fromarray(label).resize((self.label_size, self.label_size), Image.NEAREST,
                                             box=box)
        if torch.rand(()) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return (to_normalized_tensor(image, self.mean, self.std),
                torch.from_numpy(np.asarray(mask, dtype=np.int64)))


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
