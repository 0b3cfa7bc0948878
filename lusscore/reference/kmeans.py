"""Pure-PyTorch k-means steps: float64 brute force (the ground truth of the tests) and the
chunked matmul + argmin + index_add baseline the benchmarks compare against."""
from __future__ import annotations

import torch


def _scores(x: torch.Tensor, centroids: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, K) float64 score to minimise: squared distance from exact differences (row chunks,
    no cancellation), or minus the inner product."""
    x64, c64 = x.double(), centroids.double()
    if metric == "ip":
        return -(x64 @ c64.T)
    rows = max(1, (1 << 22) // max(1, c64.shape[0] * max(1, c64.shape[1])))
    parts = [((x64[a:a + rows, None, :] - c64[None, :, :]) ** 2).sum(-1)
             for a in range(0, x64.shape[0], rows)]
    return torch.cat(parts) if parts else x64.new_zeros(0, c64.shape[0])


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, metric: str = "l2"):
    """Float64 brute force; ties go to the lowest index (torch.min returns the first)."""
    score = _scores(x, centroids, metric)
    if score.shape[0] == 0:
        return score.new_empty(0, dtype=torch.int64), score.new_empty(0)
    best, labels = score.min(1)
    return labels, (-best if metric == "ip" else best)


def kmeans_assign_gap(x: torch.Tensor, centroids: torch.Tensor, metric: str = "l2"):
    """Float64 gap between each row's best and second-best score (inf for K = 1): a row whose
    gap is above rounding must get the brute-force label from any implementation."""
    score = _scores(x, centroids, metric)
    if centroids.shape[0] < 2 or score.shape[0] == 0:
        return torch.full((score.shape[0],), float("inf"), dtype=torch.float64, device=x.device)
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
