"""photometric_augment: the colour jitter, grayscale, inversion and blur of a batch of crops,
each crop with its own parameters, in one pass per crop (csrc/photometric/). CPU only, as
data loading is; CUDA tensors and the reference mode run lusscore.reference.photometric.
"""
from __future__ import annotations

import torch

from lusscore.ops.switch import reference_enabled
from lusscore.reference import photometric as _reference


@torch.library.register_fake("lusscore::photometric_augment")
def _photometric_augment_fake(crops, factors, order, flags, sigma, kernel_size):
    torch._check(crops.dim() == 4 and crops.shape[1] == 3,
                 lambda: f"crops must be RGB (N, 3, H, W), got shape {tuple(crops.shape)}")
    torch._check(crops.dtype in (torch.uint8, torch.float32),
                 lambda: f"crops must be uint8 or float32, got {crops.dtype}")
    n = crops.shape[0]
    for t, name, cols, dtype in ((factors, "factors", 4, torch.float32),
                                 (order, "order", 4, torch.int64),
                                 (flags, "flags", 3, torch.bool)):
        torch._check(tuple(t.shape) == (n, cols),
                     lambda: f"{name} must be ({n}, {cols}), got {tuple(t.shape)}")
        torch._check(t.dtype == dtype, lambda: f"{name} must be {dtype}, got {t.dtype}")
    torch._check(tuple(sigma.shape) == (n,) and sigma.dtype == torch.float32,
                 lambda: f"sigma must be float32 ({n},), got {sigma.dtype} {tuple(sigma.shape)}")
    torch._check(kernel_size % 2 == 1 and 1 <= kernel_size <= 63,
                 lambda: f"kernel_size must be odd, in [1, 63], got {kernel_size}")
    return crops.new_empty(crops.shape, dtype=torch.float32)


def photometric_augment(crops: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                        flags: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """crops (N, 3, H, W) uint8 (scaled to [0, 1]) or float in [0, 1] -> float32 crops.

    Per crop i, in this order: if flags[i, 0], the colour jitter: brightness, contrast and
    saturation by factors[i, 0:3] and the hue rotated by factors[i, 3] turns, in the order
    order[i] (a permutation of 0..3, those four ops); if flags[i, 1], grayscale; if
    flags[i, 2], inversion (1 - x); if sigma[i] > 0, a Gaussian blur of kernel_size taps
    with reflect padding. Each operation is torchvision's on float images."""
    if reference_enabled() or crops.device.type != "cpu":
        _photometric_augment_fake(crops, factors, order, flags, sigma, kernel_size)
        return _reference.photometric_augment(crops, factors, order, flags, sigma, kernel_size)
    return torch.ops.lusscore.photometric_augment(crops, factors, order, flags, sigma, kernel_size)
