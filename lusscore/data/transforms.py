"""Image loading, resizing and normalisation for the network inputs outside the training
augmentations (those are in views.py and segmentation.py).

Two pipelines, kept apart because their numbers differ slightly and each stage's results
depend on its own: the PIL one (bilinear PIL resize, no antialias: labelling, clustering,
distance matching) and the torchvision one (`to_normalized_tensor`: fine-tuning, inference).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from lusscore.data.label_io import read_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resized_size(h: int, w: int, short: int) -> tuple[int, int]:
    """(H, W) after resizing the shorter side to `short` (torchvision's Resize(int) rule)."""
    if h <= w:
        return short, int(short * w / h)
    return int(short * h / w), short


def _normalised(img: Image.Image) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (t - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def load_image_tensor(path, short: int) -> torch.Tensor:
    """The network input of one image: resized, (3, H, W) float, ImageNet-normalised."""
    img = read_image(path)
    h, w = resized_size(img.height, img.width, short)
    return _normalised(img.resize((w, h), Image.BILINEAR))


def load_center_crop(path, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """(3, crop, crop) float, ImageNet-normalised: shorter side to `resize`, centre crop."""
    img = read_image(path)
    h, w = resized_size(img.height, img.width, resize)
    img = img.resize((w, h), Image.BILINEAR)
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return _normalised(img.crop((left, top, left + crop, top + crop)))


def to_normalized_tensor(img, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """A PIL image or uint8 (3, H, W) tensor as float, normalised (torchvision's ops)."""
    t = TF.to_dtype(TF.pil_to_tensor(img) if not isinstance(img, torch.Tensor) else img,
                    torch.float32, scale=True)
    return TF.normalize(t, mean=list(mean), std=list(std))
