import torch


def rgb_to_label(rgb: torch.Tensor) -> torch.Tensor:
    return rgb[..., 0].long() + 256 * rgb[..., 1].long()
