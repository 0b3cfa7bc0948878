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


# ---- kmeans

def kmeans_points(n: int, d: int, dtype=torch.float32, seed: int = 0, device="cpu") -> torch.Tensor:
    """(n, d) standard-normal rows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(device=device, dtype=dtype)


def kmeans_blobs(n: int, d: int, k: int, spread: float = 0.1, seed: int = 0, device="cpu"):
    """(n, d) float32 rows around k well-separated random centres, and the true centre ids."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 4
    ids = torch.arange(n) % k
    x = centres[ids] + spread * torch.randn(n, d, generator=g)
    return x.to(device), ids.to(device)
