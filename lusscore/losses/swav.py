"""SwAV: prototypes, (distributed) Sinkhorn-Knopp codes and the swapped-prediction loss."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lusscore.engine import rank_world


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Soft codes Q (B, K) from prototype scores (B, K), equipartitioned over the global batch.

    In fp32 whatever the input dtype; under torch.distributed the row/column sums are
    all-reduced so every rank computes its shard of the same global solution.
    """
    world = rank_world()[1]
    distributed = world > 1
    q = torch.exp(scores.float() / epsilon).t()  # (K, B)
    k, b_local = q.shape
    b = b_local * world
    total = q.sum()
    if distributed:
        dist.all_reduce(total)
    q /= total
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(rows)
        q /= rows
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


class Prototypes(nn.Module):
    """Bias-free linear layer whose rows are re-normalised to unit length each step."""

    def __init__(self, dim: int, num_prototypes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_prototypes, dim))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.weight)


def swapped_prediction_loss(scores: list[torch.Tensor], codes: list[torch.Tensor | None],
                            temperature: float = 0.1) -> torch.Tensor:
    """Mean over code crops i of the mean over the other crops v of CE(codes_i, softmax(s_v/T)).

    scores: per crop (B, K) prototype scores; codes: per crop (B, K) Sinkhorn codes, or None
    for crops that are not used to compute codes (SwAV: only the two large crops).
    """
    loss, n_code = scores[0].new_zeros(()), 0
    for i, q in enumerate(codes):
        if q is None:
            continue
        others = [v for v in range(len(scores)) if v != i]
        sub = sum(-(q * F.log_softmax(scores[v].float() / temperature, dim=1)).sum(dim=1).mean()
                  for v in others)
        loss = loss + sub / len(others)
        n_code += 1
    if n_code == 0:
        raise ValueError("swapped_prediction_loss needs codes for at least one crop")
    return loss / n_code
