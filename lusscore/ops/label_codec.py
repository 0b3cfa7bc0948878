"""rgb_to_label: decode ImageNet-S label PNG pixels (id = R + 256*G) on CPU or CUDA."""
from __future__ import annotations

import torch

from lusscore.ops.switch import reference_enabled
from lusscore.reference import label_codec as _reference


@torch.library.register_fake("lusscore::rgb_to_label")
def _rgb_to_label_fake(rgb):
    torch._check(rgb.dtype == torch.uint8, lambda: f"rgb must be uint8, got {rgb.dtype}")
    torch._check(rgb.dim() >= 1 and rgb.shape[-1] in (3, 4),
                 lambda: f"rgb must end in 3 or 4 channels, got shape {tuple(rgb.shape)}")
    return rgb.new_empty(rgb.shape[:-1], dtype=torch.int64)


def rgb_to_label(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3|4) uint8 -> (...) int64 label ids."""
    if reference_enabled():
        _rgb_to_label_fake(rgb)
        return _reference.rgb_to_label(rgb)
    return torch.ops.lusscore.rgb_to_label(rgb)
