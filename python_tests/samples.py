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


# --- overlap_gather -------------------------------------------------------------------------

def overlap_boxes(batch: int, image_hw=(240, 320), seed: int = 0, disjoint_every: int = 4,
                  dtype=torch.float32, device="cpu"):
    """Random crop boxes of two views (left, top, width, height) inside an image, fractional
    coordinates included; every disjoint_every-th pair is made disjoint. Returns boxes1,
    boxes2 (B, 4) and flips1, flips2 (B) bool."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_hw
    out = []
    for _ in range(2):
        size = torch.rand(batch, 2, generator=g, dtype=torch.float64) * 0.6 + 0.3
        bw, bh = size[:, 0] * w, size[:, 1] * h
        left = torch.rand(batch, generator=g, dtype=torch.float64) * (w - bw)
        top = torch.rand(batch, generator=g, dtype=torch.float64) * (h - bh)
        out.append(torch.stack([left, top, bw, bh], dim=1))
    boxes1, boxes2 = out
    if disjoint_every:
        idx = torch.arange(0, batch, disjoint_every)
        boxes1[idx] = torch.tensor([0.0, 0.0, w * 0.3, h * 0.3], dtype=torch.float64)
        boxes2[idx] = torch.tensor([w * 0.5, h * 0.5, w * 0.4, h * 0.4], dtype=torch.float64)
    flips1 = torch.rand(batch, generator=g) < 0.5
    flips2 = torch.rand(batch, generator=g) < 0.5
    return (boxes1.to(dtype).to(device), boxes2.to(dtype).to(device), flips1.to(device),
            flips2.to(device))


def overlap_maps(batch: int, channels: int, h: int, w: int, seed: int = 0,
                 dtype=torch.float32, device="cpu", channels_last: bool = False) -> torch.Tensor:
    """A random (B, C, H, W) feature map."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(batch, channels, h, w, generator=g, dtype=torch.float64).to(dtype).to(device)
    return f.contiguous(memory_format=torch.channels_last) if channels_last else f
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


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """got within rel of want, the absolute slack scaled by want's largest magnitude: a fixed
    atol would pass an all-zero result where the values are small (e.g. bf16 gradients)."""
    scale = want.detach().abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.float(), want.float(), atol=rel * max(scale, 1e-30), rtol=rel)


# --- multi-crop batches -----------------------------------------------------------------------

def multicrop_batch(batch: int = 4, seed: int = 0):
    """A seeded pretrain batch of noise images: 2 x 48 px + 2 x 24 px crops, the reference std."""
    import numpy as np
    from PIL import Image

    from lusscore.data.views import MultiCropTransform
    torch.manual_seed(seed)
    transform = MultiCropTransform([48, 24], [2, 2], [0.3, 0.1], [1.0, 0.3], std_quirk=True)
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
              for _ in range(batch)]
    return transform.collate([transform(im) for im in images])
