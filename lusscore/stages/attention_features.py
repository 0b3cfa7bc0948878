"""Image-level features for the clustering stage (PASS step 3a, without the k-means).

Every image is resized (shorter side 256), centre-cropped (224), ImageNet-normalised and
passed through the backbone; PixelAttention pools the stage-4 map with its attention and the
pooled feature is L2-normalised. pool_features picks what is pooled: "raw" (the upsampled,
unnormalised map: the reference code's clustering, DESIGN.md section 6, the default here) or
"normalized" (the paper). The k-means driver then clusters these (N, L) rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lusscore.data.transforms import load_center_crop


class _CropSet(torch.utils.data.Dataset):
    def __init__(self, paths, resize, crop):
        self.paths, self.resize, self.crop = list(paths), resize, crop

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_center_crop(self.paths[i], self.resize, self.crop)


def pool_map(z: torch.Tensor, attention, pool_features: str) -> torch.Tensor:
    """(B, L) L2-normalised image features of stage-4 maps z: attention-pooled, or (attention
    None: image-level pooling, the ablation without attention) a plain spatial mean."""
    if attention is None:
        pooled = z.float().mean(dim=(2, 3))
    else:
        pooled = attention(z.float(), return_attention=False, pool_features=pool_features)
    return F.normalize(pooled.float(), dim=1)


@torch.inference_mode()
def pooled_features(backbone, attention, image_paths, device="cpu", batch_size: int = 64,
                    workers: int = 0, resize: int = 256, crop: int = 224,
                    pool_features: str = "raw", amp: bool = False, progress: bool = False) -> torch.Tensor:
    """(N, L) float32 CPU tensor of L2-normalised attention-pooled features, in input order.

    attention=None pools the stage-4 map by a plain spatial mean (image-level pooling)."""
    device = torch.device(device)
    backbone.to(device).eval()
    if attention is not None:
        attention.to(device).eval()
    loader = torch.utils.data.DataLoader(_CropSet(image_paths, resize, crop), batch_size=batch_size,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    out = []
    batches = loader
    if progress:
        from lusscore.utils import progress_bar
        batches = progress_bar(loader, desc="features", unit="batch")
    for images in batches:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            z = backbone(images)
        out.append(pool_map(z, attention, pool_features).cpu())
    if not out:
        return torch.zeros(0, attention.channels if attention is not None else backbone.out_channels)
    return torch.cat(out)


@torch.inference_mode()
def pixel_features(backbone, image_paths, device="cpu", batch_size: int = 64, workers: int = 0,
                   resize: int = 256, crop: int = 224, amp: bool = False,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Every stage-4 pixel of every image's centre crop, L2-normalised: (N * h * w, L) float32
    on the CPU, and whether each pixel lies on its map's border (N * h * w) bool: what the
    pixel-level clustering of label.method pixel_kmeans clusters."""
    device = torch.device(device)
    backbone.to(device).eval()
    loader = torch.utils.data.DataLoader(_CropSet(image_paths, resize, crop), batch_size=batch_size,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    batches = loader
    if progress:
        from lusscore.utils import progress_bar
        batches = progress_bar(loader, desc="pixel features", unit="batch")
    feats, borders = [], []
    for images in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            z = backbone(images.to(device, non_blocking=True))
        z = F.normalize(z.float(), dim=1)
        b, c, h, w = z.shape
        feats.append(z.permute(0, 2, 3, 1).reshape(-1, c).cpu())
        edge = torch.zeros(h, w, dtype=torch.bool)
        edge[0], edge[-1], edge[:, 0], edge[:, -1] = True, True, True, True
        borders.append(edge.flatten().repeat(b))
    if not feats:
        return torch.zeros(0, backbone.out_channels), torch.zeros(0, dtype=torch.bool)
    return torch.cat(feats), torch.cat(borders)
