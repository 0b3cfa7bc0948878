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
them to every crop of a size at once (`apply`): vectorised over the batch, it is several
times faster than torchvision's per-image calls on small crops, and nothing is rounded to
uint8 between operations.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)
N_UNIFORMS = 13
# The columns of a crop's uniforms.
JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3, 4
ORDER = slice(5, 9)  # argsort of these four: the jitter operations' order
GRAY, INVERT, BLUR, SIGMA = 9, 10, 11, 12


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1]; factor (N,)."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of (N, 3, H, W) in [0, 1] by shift (N,) turns."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    chroma = maxc - minc
    sat = chroma / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    c = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / c, (maxc - g) / c, (maxc - b) / c
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.remainder(hue / 6.0 + shift.view(-1, 1, 1), 1.0)
    # Back to RGB: each channel is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6.
    h6 = hue * 6.0
    vs = maxc * sat
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        out.append(maxc - vs * torch.minimum(k, 4.0 - k).clamp_(0, 1))
    return torch.stack(out, dim=1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each image of (N, C, H, W) with its own sigma (N,): separable, reflect padding."""
    n, c, h, w = x.shape
    half = kernel_size // 2
    if min(h, w) <= half:
        raise ValueError(f"gaussian_blur: {kernel_size}-tap kernel needs crops over {half} px "
                         f"a side (reflect padding), got {h}x{w}")
    taps = torch.arange(kernel_size, dtype=x.dtype, device=x.device) - half
    kernel = torch.exp(-0.5 * (taps / sigma.to(x.dtype).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N C, k)
    flat = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return flat.view(n, c, h, w)


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
        x = crops.float() / 255.0 if crops.dtype == torch.uint8 else crops.float().clone()
        u = uniforms.float()
        lo, hi = self.factor_range
        factors = torch.cat([lo + (hi - lo) * u[:, BRIGHTNESS:HUE],
                             (self.hue_range[0] + (self.hue_range[1] - self.hue_range[0])
                              * u[:, HUE:HUE + 1])], dim=1)
        jitter = u[:, JITTER] < self.color_p
        order = u[:, ORDER].argsort(dim=1)
        for slot in range(len(JITTER_OPS)):
            for op_id, op in enumerate(JITTER_OPS):
                self._apply_where(x, jitter & (order[:, slot] == op_id),
                                  lambda part, idx: op(part, factors[idx, op_id]))
        self._apply_where(x, u[:, GRAY] < self.grayscale_p,
                          lambda part, idx: grayscale(part).expand(-1, 3, -1, -1))
        self._apply_where(x, u[:, INVERT] < self.invert_p, lambda part, idx: 1.0 - part)
        lo, hi = self.blur_sigma
        sigma = lo + (hi - lo) * u[:, SIGMA]
        self._apply_where(x, u[:, BLUR] < self.blur_p,
                          lambda part, idx: gaussian_blur(part, sigma[idx], self.kernel_size))
        return x

    @staticmethod
    def _apply_where(x: torch.Tensor, mask: torch.Tensor, fn) -> None:
        """x[mask] = fn(x[mask], indices) in place, skipped when no crop is selected."""
        idx = mask.nonzero().flatten()
        if idx.numel():
            x[idx] = fn(x[idx], idx)
