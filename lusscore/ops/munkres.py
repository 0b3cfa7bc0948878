"""munkres_assign: the Hungarian matching of the ImageNet-S evaluator, a host-side exact port
of the `munkres` 1.1.4 package (same steps and tie-breaking), in csrc/munkres/. CPU only: the
matrices are at most a few thousand wide; a CUDA tensor is copied to the host.
"""
from __future__ import annotations

import torch


@torch.library.register_fake("lusscore::munkres_assign")
def _munkres_assign_fake(cost):
    torch._check(cost.dim() == 2, lambda: "cost must be 2-D")
    return cost.new_empty((cost.shape[0],), dtype=torch.int64)


def munkres_assign(cost: torch.Tensor) -> torch.Tensor:
    """Column assigned to each row by Munkres 1.1.4 (minimum cost; -1 for padded rows)."""
    return torch.ops.lusscore.munkres_assign(cost.cpu())
