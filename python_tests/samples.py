"""Input samples shared by the tests and the benchmarks (one place to define shapes)."""
from __future__ import annotations

import torch


def rgb_label_image(h: int, w: int, channels: int = 3, max_id: int = 1000, seed: int = 0,
                    device="cpu") -> torch.Tensor:
    """A random (H, W, channels) uint8 image encoding label ids in 0..max_id."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, max_id + 1, (h, w), generator=g)
    rgb = torch.zeros(h, w, channels, dtype=torch.uint8)
    rgb[..., 0] = (ids % 256).to(torch.uint8)
    rgb[..., 1] = (ids // 256).to(torch.uint8)
    if channels > 2:
        rgb[..., 2:] = torch.randint(0, 256, (h, w, channels - 2), generator=g).to(torch.uint8)
    return rgb.to(device)
