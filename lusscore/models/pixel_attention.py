"""PASS's pixel-attention module M_A (DESIGN.md section 2).

The stage-4 map z (B, L, h, w) is upsampled x4 (bilinear) and L2-normalised over channels:
x. The attention logits are a = M_A(x) with M_A = 1x1 conv-BN-ReLU-1x1 conv-BN, the
attention c = sigmoid(a + theta) with theta per channel (initialised 0), and the pooled
feature mean_hw(c * x) comes from the fused lusscore attention_pool op, which also gives the
per-pixel channel-mean attention used for the 'other' mask.

shared=True gives one attention map for every channel (M_A's last conv has one output, theta
one entry), the ablation of the paper's Tab 10c; the default is one map per channel.

Pooling variants (pool_features): "normalized" pools the L2-normalised x (the paper, and
the attention-training stage of the reference code); "raw" pools the upsampled but
unnormalised map, which is what the reference code's clustering step does (DESIGN.md
section 6). The attention itself is always computed from the normalised map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lusscore.ops.attention_pool import attention_pool

POOL_FEATURES = ("normalized", "raw")


NORMALIZE_EPS = 1e-12  # F.normalize's default

# The CPU route of upsample_bilinear below (a switch for benchmarks to measure it against).
CPU_UPSAMPLE_VIA_CHANNELS_LAST = True


def upsample_bilinear(z: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear x factor upsampling (align_corners=False). On the CPU a contiguous map goes
    through channels-last and back: 1.6-2.3x faster on stage-4 maps (6x6 to 14x14, 256 to 2048
    channels), whose contiguous kernel converts its input and output itself; the values are
    the same there and equal up to rounding elsewhere."""
    if CPU_UPSAMPLE_VIA_CHANNELS_LAST and z.device.type == "cpu" and z.is_contiguous():
        up = F.interpolate(z.contiguous(memory_format=torch.channels_last), scale_factor=factor,
                           mode="bilinear", align_corners=False)
        return up.contiguous()
    return F.interpolate(z, scale_factor=factor, mode="bilinear", align_corners=False)


class PixelAttention(nn.Module):
    def __init__(self, channels: int, hidden: int | None = None, upsample: int = 4,
                 pool_features: str = "normalized", shared: bool = False):
        super().__init__()
        if channels <= 0:
            raise ValueError(f"channels must be positive, got {channels}")
        if pool_features not in POOL_FEATURES:
            raise ValueError(f"pool_features must be one of {POOL_FEATURES}, got {pool_features!r}")
        if upsample < 1:
            raise ValueError(f"upsample must be >= 1, got {upsample}")
        hidden = channels if hidden is None else hidden
        self.channels, self.hidden, self.upsample = channels, hidden, upsample
        self.pool_features, self.shared = pool_features, bool(shared)
        maps = 1 if self.shared else channels
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, maps, 1, bias=False), nn.BatchNorm2d(maps))
        self.theta = nn.Parameter(torch.zeros(maps))

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, hidden={self.hidden}, upsample={self.upsample}, "
                f"pool_features={self.pool_features!r}, shared={self.shared}")

    def channel_theta(self) -> torch.Tensor:
        """theta per feature channel (L): the shared map's one entry repeated."""
        return self.theta.expand(self.channels) if self.shared else self.theta

    def parameter_groups(self) -> list[dict]:
        """The trainable groups: the M_A weights (convs and BNs) and theta."""
        return [{"name": "attention_mlp", "params": list(self.mlp.parameters())},
                {"name": "theta", "params": [self.theta]}]

    def pixel_features(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(upsampled map, its L2-normalised version x, the logits a = M_A(x) without theta),
        each (B, L, up*h, up*w); a shared map is repeated over the L channels.

        M_A's first layer, a 1x1 conv without bias, mixes channels pixel by pixel: it
        commutes with the bilinear upsampling and with the division by each pixel's norm. It
        therefore runs on the h x w map, up^2 times fewer pixels, and its output is upsampled
        and divided instead (the same values up to rounding)."""
        if z.dim() != 4 or z.shape[1] != self.channels:
            raise ValueError(f"expected a stage-4 map (B, {self.channels}, h, w), got {tuple(z.shape)}")
        up = z if self.upsample == 1 else upsample_bilinear(z, self.upsample)
        norm = up.norm(dim=1, keepdim=True).clamp_min(NORMALIZE_EPS)  # as F.normalize
        first = self.mlp[0](z)
        if self.upsample > 1:
            first = upsample_bilinear(first, self.upsample)
        a = self.mlp[1:](first / norm)
        return up, up / norm, a.expand(-1, self.channels, -1, -1) if self.shared else a

    def forward(self, z: torch.Tensor, return_attention: bool | None = None,
                pool_features: str | None = None):
        """z: stage-4 map (B, L, h, w) -> pooled (B, L), and the mean attention
        (B, up*h, up*w) as a second output when return_attention (default: in eval mode)."""
        if return_attention is None:
            return_attention = not self.training
        pool_features = self.pool_features if pool_features is None else pool_features
        if pool_features not in POOL_FEATURES:
            raise ValueError(f"pool_features must be one of {POOL_FEATURES}, got {pool_features!r}")
        up, x, a = self.pixel_features(z)
        feats = x if pool_features == "normalized" else up
        # Under autocast the logits come out in the low-precision dtype: pool in that dtype.
        pooled, mean = attention_pool(feats.to(a.dtype), a, self.channel_theta(), return_attention)
        return (pooled, mean) if return_attention else pooled
