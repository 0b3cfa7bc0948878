"""kmeans_assign / kmeans_update: the two batched k-means steps, on CPU or CUDA.

kmeans_assign(x, centroids, metric) -> (labels int64 (N), values (N)): each row's nearest
centroid ("l2": smallest squared Euclidean distance, the value is that distance; "ip":
largest inner product, the value is that similarity), exact ties going to the lowest index.
Distances are accumulated in fp32 (fp64 for fp64 inputs on the CPU) and no N x K buffer is
ever held. A fast pass scores every centroid (CPU: a register-blocked GEMM micro-kernel with
the arg-min fused; CUDA: one tensor-core kernel, TF32 for fp32 rows, bf16/fp16 against the
centroids rounded to that dtype, keeping each row's best and second-best score), then every
centroid within a proven error bound of the best is re-scored exactly in float64, in one order
shared by both devices: labels equal a float64 brute force and agree across devices.
On CUDA, LUSSCORE_KMEANS_ASSIGN=fused|buffered forces the fused kernel or the older
GEMM-into-a-buffer path (used by default below ~128 rows per SM).
Centroids may be float64 on both devices: they are rounded to float32 unless x is float64
(float64 x runs on the CPU only). For fp16 x on CUDA, centroids past fp16's range (|value| >
65504, inf once rounded to fp16) send the rows through the fp32 kernels instead (widened in
chunks), so the labels and values stay the CPU's; the range check costs one device-to-host
sync per call, for fp16 x only.

kmeans_update(x, labels, k) -> (sums (K, D) fp32 (fp64 for fp64 x), counts (K) int64):
deterministic per-cluster sums (no float atomics; bit-identical on CPU and CUDA).
"""
from __future__ import annotations

import torch

from lusscore.ops.switch import reference_enabled
from lusscore.utils import LusscoreError
from lusscore.reference import kmeans as _reference

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@torch.library.register_fake("lusscore::kmeans_assign")
def _kmeans_assign_fake(x, centroids, metric):
    torch._check(metric in ("l2", "ip"), lambda: f'metric must be "l2" or "ip", got {metric!r}')
    torch._check(x.dim() == 2 and centroids.dim() == 2,
                 lambda: f"x and centroids must be 2-D, got {tuple(x.shape)}, {tuple(centroids.shape)}")
    torch._check(x.dtype in _FLOATS and centroids.dtype in _FLOATS,
                 lambda: f"x and centroids must be floating point, got {x.dtype}, {centroids.dtype}")
    torch._check(x.shape[1] == centroids.shape[1],
                 lambda: f"x and centroids must have the same D, got {x.shape[1]} and {centroids.shape[1]}")
    value_type = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = x.shape[0]
    return x.new_empty((n,), dtype=torch.int64), x.new_empty((n,), dtype=value_type)


@torch.library.register_fake("lusscore::kmeans_update")
def _kmeans_update_fake(x, labels, k):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D, got {tuple(x.shape)}")
    torch._check(labels.dim() == 1 and labels.dtype == torch.int64,
                 lambda: f"labels must be 1-D int64, got {tuple(labels.shape)} {labels.dtype}")
    sum_type = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((k, x.shape[1]), dtype=sum_type), labels.new_empty((k,))


def check_finite_rows(what: str, t: torch.Tensor) -> None:
    """An error naming the first row of t with a NaN or infinity (one reduction; skipped while
    torch.compile traces)."""
    if torch.compiler.is_compiling() or t.numel() == 0 or not t.is_floating_point():
        return
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero()[:, 0]
        raise LusscoreError(f"{what}: row {int(rows[0])} holds NaN or infinite values "
                            f"({rows.numel()} such row(s) of {t.shape[0]})")


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, metric: str = "l2",
                  check_finite: bool = True):
    """Nearest centroid per row: (labels int64 (N), squared distance or similarity (N)).
    A NaN or infinity in x or the centroids is an error naming its row (a NaN centroid
    would otherwise send every row to label 0). check_finite=False skips that check (and its
    device sync) for callers that checked already, e.g. the KMeans driver's iterations."""
    if check_finite:
        check_finite_rows("kmeans_assign centroids", centroids)
    if reference_enabled():
        _kmeans_assign_fake(x, centroids, metric)  # the op's checks
        if x.dtype != torch.float64:  # the kernels' compute type: centroids rounded to float32
            centroids = centroids.float()
        labels, values = _reference.kmeans_assign(x, centroids, metric)
        values = values.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    else:
        labels, values = torch.ops.lusscore.kmeans_assign(x, centroids, metric)
    # A row with a NaN or infinity always gets a non-finite value, so x's rows are scanned only
    # when a value is not finite (x is N x D; the values are N).
    if check_finite and not torch.compiler.is_compiling() and values.numel() and \
            not bool(torch.isfinite(values).all()):
        check_finite_rows("kmeans_assign x", x)
    return labels, values


def kmeans_update(x: torch.Tensor, labels: torch.Tensor, k: int):
    """Per-cluster sums (K, D) and counts (K) of the rows of x grouped by label."""
    if reference_enabled():
        _kmeans_update_fake(x, labels, k)
        return _reference.kmeans_update(x, labels, k)
    return torch.ops.lusscore.kmeans_update(x, labels, k)
