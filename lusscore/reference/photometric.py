"""Pure-PyTorch reference of photometric_augment: torchvision's ColorJitter operations,
grayscale, inversion and a per-crop Gaussian blur on float images in [0, 1], each applied to
the crops that draw it, batched."""
from __future__ import annotations

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


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


def _apply_where(x: torch.Tensor, mask: torch.Tensor, fn) -> None:
    """x[mask] = fn(x[mask], indices) in place, skipped when no crop is selected."""
    idx = mask.nonzero().flatten()
    if idx.numel():
        x[idx] = fn(x[idx], idx)


def photometric_augment(crops: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                        flags: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """lusscore.ops.photometric_augment: each operation on the crops that draw it, batched."""
    x = crops.float() / 255.0 if crops.dtype == torch.uint8 else crops.float().clone()
    jitter, gray, invert = flags.unbind(1)
    for slot in range(len(JITTER_OPS)):
        for op_id, op in enumerate(JITTER_OPS):
            _apply_where(x, jitter & (order[:, slot] == op_id),
                         lambda part, idx: op(part, factors[idx, op_id]))
    _apply_where(x, gray, lambda part, idx: grayscale(part).expand(-1, 3, -1, -1))
    _apply_where(x, invert, lambda part, idx: 1.0 - part)
    _apply_where(x, sigma > 0, lambda part, idx: gaussian_blur(part, sigma[idx], kernel_size))
    return x
