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


# --- seg_metrics ---------------------------------------------------------------------------

def blocky_label_map(h: int, w: int, labels, block: int = 8, seed: int = 0,
                     ignore_frac: float = 0.0, ignore_index: int = 1000) -> torch.Tensor:
    """An (H, W) int64 map of rectangular blocks drawn from `labels` (plus ignore pixels)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(list(labels), dtype=torch.int64)
    bh, bw = -(-h // block), -(-w // block)
    pick = torch.randint(0, labels.numel(), (bh, bw), generator=g)
    out = labels[pick].repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w]
    if ignore_frac > 0:
        out = out.clone()
        out[torch.rand(h, w, generator=g) < ignore_frac] = ignore_index
    return out.contiguous()


def segmentation_pair(h: int = 375, w: int = 500, num_labels: int = 2, num_classes: int = 919,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred, gt) with about `num_labels` ids per map: 'other' plus classes, noisy borders."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randperm(num_classes, generator=g)[:max(num_labels - 1, 1)] + 1
    ids = [0] + classes.tolist()
    block = max(4, int((h * w / max(num_labels, 1)) ** 0.5) // 2)
    gt = blocky_label_map(h, w, ids, block=block, seed=seed, ignore_frac=0.01)
    pred = blocky_label_map(h, w, ids, block=block, seed=seed)
    flip = torch.rand(h, w, generator=g) < 0.05
    pred = torch.where(flip, torch.roll(pred, 3, dims=1), pred)
    return pred.contiguous(), gt
