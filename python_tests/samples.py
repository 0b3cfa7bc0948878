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


# --- attention_pool -------------------------------------------------------------------------

# (B, L, H, W, dtype) of the benchmark: PASS's ResNet-50 global pooling, its attention
# resolution (stage 4 upsampled x4), and ResNet-18 in fp32.
ATTENTION_POOL_BENCH_SHAPES = [
    (256, 2048, 7, 7, torch.bfloat16),
    (64, 2048, 28, 28, torch.bfloat16),
    (256, 512, 7, 7, torch.float32),
]
ATTENTION_POOL_QUICK_SHAPES = [(4, 64, 7, 7, torch.float32), (2, 32, 12, 12, torch.float32)]


def attention_pool_inputs(b: int, l: int, h: int, w: int, dtype=torch.float32, seed: int = 0,
                          device="cpu", requires_grad: bool = False):
    """x: L2-normalised features (as PASS feeds it), a: attention logits ~ N(0, 2), theta ~ N(0, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(b, l, h, w, generator=g), dim=1)
    a = 2 * torch.randn(b, l, h, w, generator=g)
    theta = 0.5 * torch.randn(l, generator=g)
    out = [t.to(device=device, dtype=dtype) for t in (x, a, theta)]
    if requires_grad:
        for t in out:
            t.requires_grad_(True)
    return tuple(out)
