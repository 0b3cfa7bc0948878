"""SwAV's photometric augmentation of multi-crop views, drawn per crop and applied to a batch.

Per crop (the recipe of views.py): colour jitter with p color_p (brightness, contrast and
saturation factors uniform in [max(0, 1 - 0.8 s), 1 + 0.8 s], a hue shift uniform in
[-0.2 s, 0.2 s], s the jitter strength, the four in a random order), grayscale with p
grayscale_p, polarity inversion (1 - value) with p invert_p (0 by default: a colour-blind
set's textures come in either order of their two values), Gaussian blur with p blur_p and
sigma uniform in blur_sigma (SwAV blurs with PIL's radius = sigma; here a true Gaussian kernel
of 2 * ceil(3 * sigma_max) + 1 taps, reflect padding).
The operations are torchvision's ColorJitter, RandomGrayscale, RandomInvert and GaussianBlur
on float images in [0, 1].

The loader draws each crop's parameters (`draw`: 13 uniforms, a fixed count whatever the
settings, so one setting never shifts the random stream of the others) and collation applies
them to a batch of crops at once (`apply`, through the photometric_augment op: one pass per
crop, its steps in cache; lusscore.reference.photometric is the batched PyTorch version).
Nothing is rounded to uint8 between operations.
"""
from __future__ import annotations

import math

import torch

from lusscore.ops import photometric_augment

N_UNIFORMS = 13
# The columns of a crop's uniforms.
JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3, 4
ORDER = slice(5, 9)  # argsort of these four: the jitter operations' order
GRAY, INVERT, BLUR, SIGMA = 9, 10, 11, 12


class PhotometricAugment:
    """Draws each crop's photometric parameters and applies a batch of them."""

    def __init__(self, jitter_strength: float = 1.0, color_p: float = 0.8,
                 grayscale_p: float = 0.2, blur_p: float = 0.5, blur_sigma: tuple = (0.1, 2.0),
                 invert_p: float = 0.0):
        self.jitter_strength = s = float(jitter_strength)
        self.factor_range = (max(0.0, 1 - 0.8 * s), 1 + 0.8 * s)
        self.hue_range = (-0.2 * s, 0.2 * s)
        self.color_p, self.grayscale_p, self.invert_p = color_p, grayscale_p, invert_p
        self.blur_p = blur_p
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.kernel_size = 2 * math.ceil(3 * self.blur_sigma[1]) + 1

    @staticmethod
    def draw() -> torch.Tensor:
        """One crop's parameters: N_UNIFORMS uniforms in [0, 1) from torch's generator."""
        return torch.rand(N_UNIFORMS)

    def apply(self, crops: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """crops (N, 3, H, W) uint8 or float in [0, 1], uniforms (N, N_UNIFORMS) -> the
        augmented crops, float in [0, 1]."""
        if crops.dim() != 4 or crops.shape[1] != 3:
            raise ValueError(f"PhotometricAugment: expected RGB crops (N, 3, H, W), got "
                             f"{tuple(crops.shape)}")
        if uniforms.shape != (crops.shape[0], N_UNIFORMS):
            raise ValueError(f"PhotometricAugment: expected uniforms ({crops.shape[0]}, "
                             f"{N_UNIFORMS}), got {tuple(uniforms.shape)}")
        u = uniforms.float()
        lo, hi = self.factor_range
        factors = torch.cat([lo + (hi - lo) * u[:, BRIGHTNESS:HUE],
                             (self.hue_range[0] + (self.hue_range[1] - self.hue_range[0])
                              * u[:, HUE:HUE + 1])], dim=1)
        flags = torch.stack([u[:, JITTER] < self.color_p, u[:, GRAY] < self.grayscale_p,
                             u[:, INVERT] < self.invert_p], dim=1)
        lo, hi = self.blur_sigma
        blur = u[:, BLUR] < self.blur_p
        sigma = torch.where(blur, lo + (hi - lo) * u[:, SIGMA], 0.0)
        half = self.kernel_size // 2
        if bool(blur.any()) and min(crops.shape[-2:]) <= half:
            raise ValueError(f"PhotometricAugment: the {self.kernel_size}-tap blur needs crops "
                             f"over {half} px a side (reflect padding), got "
                             f"{tuple(crops.shape[-2:])}")
        return photometric_augment(crops, factors.contiguous(), u[:, ORDER].argsort(dim=1),
                                   flags, sigma, self.kernel_size)
