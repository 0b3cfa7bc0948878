"""Pure-PyTorch k-means steps: float64 brute force (the ground truth of the tests) and the
chunked matmul + argmin + index_add baseline the benchmarks compare against."""
from __future__ import annotations

import torch


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, metric: str = "l2"):
    """Float64 brute force; ties go to the lowest index (torch.min/max return the first)."""
    x64, c64 = x.double(), centroids.double()
    if metric == "ip":
        sim = x64 @ c64.T
        values, labels = sim.max(1) if len(x) else (sim.new_empty(0), sim.new_empty(0).long())
        return labels, values
    dist = ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)
    if len(x) == 0:
        return dist.new_empty(0, dtype=torch.int64), dist.new_empty(0)
    values, labels = dist.min(1)
    return labels, values


def kmeans_assign_gap(x: torch.Tensor, centroids: torch.Tensor, metric: str = "l2"):
    """Float64 gap between each row's best and second-best centroid (inf for K = 1): rows with
    a gap above rounding must get the brute-force label from any implementation."""
    x64, c64 = x.double(), centroids.double()
    score = -(x64 @ c64.T) if metric == "ip" else ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)
    if centroids.shape[0] < 2 or len(x) == 0:
        return torch.full((len(x),), float("inf"), dtype=torch.float64, device=x.device)
    two = score.topk(2, dim=1, largest=False).values
    return two[:, 1] - two[:, 0]


def kmeans_update(x: torch.Tensor, labels: torch.Tensor, k: int):
    """Float64 index_add; sums returned in float32 (float64 for float64 x)."""
    out_type = torch.float64 if x.dtype == torch.float64 else torch.float32
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, labels, x.double())
    counts = torch.bincount(labels, minlength=k) if len(labels) else torch.zeros(k, dtype=torch.int64,
                                                                                   device=x.device)
    return sums.to(out_type), counts


def torch_baseline_step(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536):
    """One plain-PyTorch k-means step (chunked matmul + argmax + index_add), in x's dtype:
    the baseline the issue measured. Returns (labels, sums, counts)."""
    k = centroids.shape[0]
    c = centroids.to(x.dtype)
    half_norm = 0.5 * (c.float() ** 2).sum(1)
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    sums = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device)
    for r0 in range(0, x.shape[0], chunk):
        xc = x[r0:r0 + chunk]
        score = (xc @ c.T).float() - half_norm
        lab = score.argmax(1)
        labels[r0:r0 + chunk] = lab
        sums.index_add_(0, lab, xc.float())
    counts = torch.bincount(labels, minlength=k)
    return labels, sums, counts
