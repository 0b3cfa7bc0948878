"""k-means clustering on the lusscore.kmeans_assign / kmeans_update ops (faiss semantics).

`KMeans` runs Lloyd iterations over data that may live on the GPU, on the CPU, or in host
memory while the work runs on the GPU (then the rows are streamed through pinned buffers
while the previous chunk is being processed), and under torch.distributed (each rank passes
its shard; sums and counts are all-reduced so every rank ends with the same centroids).

Where it matters it follows faiss's `Clustering`: the initial centroids are random training
points drawn from the seed; after each update an empty cluster is refilled by splitting a
large one (picked with probability growing with its size) with a +-1/1024 perturbation; the
objective of an iteration is the sum of the squared distances (the sum of similarities for
metric "ip") of its assignment step, and of `nredo` runs the best final objective is kept.

`preprocess_features` is PASS's preprocessing: L2-normalised rows, optionally PCA(-whitened)
and normalised again.
"""
from __future__ import annotations

import math
import queue
import threading
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from lusscore.engine import rank_world
from lusscore.ops.kmeans import kmeans_assign, kmeans_update
from lusscore.utils import LusscoreError

SPLIT_EPS = 1.0 / 1024.0
# Rows streamed per chunk from host memory: about this many bytes each.
STREAM_CHUNK_BYTES = 256 << 20
# Candidate points for k-means++ seeding, per centroid.
KMEANSPP_POINTS_PER_CENTROID = 64


# ------------------------------------------------------------------------------ preprocessing

def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm (computed in fp32; zero rows stay zero)."""
    norm = x.float().norm(dim=1, keepdim=True).clamp_min(eps)
    return (x.float() / norm).to(x.dtype)


def pca_whiten(x: torch.Tensor, dim: int | None = None, whiten: bool = True,
               eps: float = 1e-8) -> tuple[torch.Tensor, dict]:
    """Centre x, project it on its top `dim` principal axes and (whiten=True) scale each axis
    to unit variance (faiss PCAMatrix with eigen_power=-0.5). Returns (projected x, the
    transform {"mean", "components", "scale"}) so other data can be mapped the same way."""
    if x.dim() != 2:
        raise LusscoreError(f"pca_whiten: x must be 2-D (N, D), got shape {tuple(x.shape)}")
    n, d = x.shape
    dim = d if dim is None else dim
    if not 1 <= dim <= d:
        raise LusscoreError(f"pca_whiten: dim must be in 1..{d}, got {dim}")
    if n < 2:
        raise LusscoreError(f"pca_whiten: needs at least 2 rows, got {n}")
    x64 = x.double()
    mean = x64.mean(0)
    cov = (x64 - mean).T @ (x64 - mean) / (n - 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    order = eigvals.argsort(descending=True)[:dim]
    components = eigvecs[:, order]
    scale = (eigvals[order].clamp_min(0) + eps).rsqrt() if whiten else torch.ones_like(eigvals[order])
    transform = {"mean": mean.float(), "components": components.float(), "scale": scale.float()}
    return apply_pca(x, transform), transform


def apply_pca(x: torch.Tensor, transform: dict) -> torch.Tensor:
    out = (x.float() - transform["mean"].to(x.device)) @ transform["components"].to(x.device)
    return out * transform["scale"].to(x.device)


def preprocess_features(x: torch.Tensor, pca_dim: int | None = None, whiten: bool = False) -> torch.Tensor:
    """PASS's preprocessing before clustering: L2-normalise the rows; with pca_dim or whiten,
    PCA-project (and whiten) them, then L2-normalise again."""
    x = l2_normalize(x)
    if pca_dim is not None or whiten:
        x, _ = pca_whiten(x, dim=pca_dim, whiten=whiten)
        x = l2_normalize(x)
    return x


# ------------------------------------------------------------------------------ data passes

def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place where possible), through the device the backend takes: the
    GPU for NCCL, the CPU otherwise. Returns the result on t's device."""
    if rank_world()[1] == 1:
        return t
    comm = t.device if dist.get_backend() == "nccl" else torch.device("cpu")
    if t.device == comm:
        dist.all_reduce(t)
        return t
    moved = t.to(comm)
    dist.all_reduce(moved)
    return moved.to(t.device)


class _Source:
    """Chunks of the rows of x on the compute device, in the compute dtype."""

    def __init__(self, x: torch.Tensor, device: torch.device, dtype: torch.dtype, chunk_rows: int | None):
        self.x, self.device, self.dtype = x, device, dtype
        n, d = x.shape
        self.streaming = x.device != device
        if chunk_rows is None:
            if not self.streaming and x.dtype == dtype:
                chunk_rows = max(n, 1)  # the ops tile internally
            else:
                chunk_rows = max(1, STREAM_CHUNK_BYTES // max(1, d * x.element_size()))
        self.chunk_rows = chunk_rows
        self.bounds = [(a, min(a + chunk_rows, n)) for a in range(0, n, chunk_rows)]

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        if self.streaming and self.device.type == "cuda":
            yield from self._stream_to_cuda()
            return
        for a, b in self.bounds:
            yield a, b, self.x[a:b].to(self.device, self.dtype)

    def _stream_to_cuda(self):
        """Host rows -> GPU through pinned buffers. A producer thread stages chunk i+1 (host
        copy into a pinned buffer, then an asynchronous copy on a side stream) while the
        caller's kernels work on chunk i."""
        x, device = self.x, self.device
        rows, d = min(self.chunk_rows, x.shape[0]), x.shape[1]
        slots = min(3, len(self.bounds))
        if slots == 0:
            return
        direct = x.is_pinned() and x.is_contiguous()
        pinned = [None if direct else torch.empty((rows, d), dtype=x.dtype, pin_memory=True)
                  for _ in range(slots)]
        gpu = [torch.empty((rows, d), dtype=x.dtype, device=device) for _ in range(slots)]
        copied = [torch.cuda.Event() for _ in range(slots)]
        released = [torch.cuda.Event() for _ in range(slots)]
        copy_stream = torch.cuda.Stream(device)
        compute_stream = torch.cuda.current_stream(device)
        for buf in gpu:
            buf.record_stream(copy_stream)
        free: queue.Queue = queue.Queue()
        ready: queue.Queue = queue.Queue()
        for s in range(slots):
            free.put((s, False))
        stop = threading.Event()

        def produce():
            try:
                with torch.cuda.device(device):
                    for i, (a, b) in enumerate(self.bounds):
                        s, used = free.get()
                        if stop.is_set():
                            return
                        n = b - a
                        if used:
                            copied[s].synchronize()  # the pinned buffer's last copy is done
                        if direct:
                            src = x[a:b]
                        else:
                            pinned[s][:n].copy_(x[a:b])
                            src = pinned[s][:n]
                        with torch.cuda.stream(copy_stream):
                            if used:
                                copy_stream.wait_event(released[s])  # the kernels on it are done
                            gpu[s][:n].copy_(src, non_blocking=True)
                            copied[s].record(copy_stream)
                        ready.put((i, s, a, b))
            except BaseException as e:  # handed to the consumer
                ready.put(e)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            for _ in self.bounds:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                _, s, a, b = item
                compute_stream.wait_event(copied[s])
                yield a, b, gpu[s][:b - a].to(self.dtype)
                released[s].record(compute_stream)
                free.put((s, True))
        finally:
            stop.set()
            for s in range(slots):
                free.put((s, False))
            thread.join()
            torch.cuda.current_stream(device).synchronize()


# ------------------------------------------------------------------------------ k-means

class KMeans:
    """k-means with faiss semantics on the lusscore ops.

    KMeans(n_clusters, niter=20, nredo=1, seed=0, init="random" | "kmeans++", spherical=False,
           metric="l2", max_points_per_centroid=None, device=None, dtype=None, progress=True)

    fit(x) clusters the rows of x (N, D) and keeps the best of `nredo` runs; afterwards
    `centroids` (K, D) float32 on the compute device, `labels_` (N) int64 beside x (each
    row's nearest final centroid), `objective_history` (the best run's objective per
    iteration), `objective` (its last) and `objectives` (each run's last).
    predict(x) assigns rows to the centroids.

    device: where the work runs (default: x's device); x may stay in host memory while the
    device is CUDA, and is then streamed in chunks. dtype: the dtype the rows are processed in
    (default: x's; e.g. torch.bfloat16 for tensor-core distances). spherical: centroids are
    L2-normalised after each update. metric: "l2" or "ip" (assignment by largest inner
    product; the objective is then the sum of similarities, and larger is better).
    max_points_per_centroid: train on a random subset of at most K times that many rows.
    Under torch.distributed each rank passes its own shard; all ranks end identical.
    """

    def __init__(self, n_clusters: int, niter: int = 20, nredo: int = 1, seed: int = 0,
                 init: str = "random", spherical: bool = False, metric: str = "l2",
                 max_points_per_centroid: int | None = None, device=None, dtype=None,
                 progress: bool = True, chunk_rows: int | None = None):
        if not isinstance(n_clusters, int) or n_clusters < 1:
            raise LusscoreError(f"KMeans: n_clusters must be a positive int, got {n_clusters!r}")
        if niter < 0 or nredo < 1:
            raise LusscoreError(f"KMeans: need niter >= 0 and nredo >= 1, got {niter}, {nredo}")
        if init not in ("random", "kmeans++"):
            raise LusscoreError(f'KMeans: init must be "random" or "kmeans++", got {init!r}')
        if metric not in ("l2", "ip"):
            raise LusscoreError(f'KMeans: metric must be "l2" or "ip", got {metric!r}')
        if max_points_per_centroid is not None and max_points_per_centroid < 1:
            raise LusscoreError("KMeans: max_points_per_centroid must be >= 1 or None")
        if dtype is not None and dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise LusscoreError(f"KMeans: dtype must be a floating dtype, got {dtype}")
        self.n_clusters, self.niter, self.nredo, self.seed = n_clusters, niter, nredo, seed
        self.init, self.spherical, self.metric = init, spherical, metric
        self.max_points_per_centroid = max_points_per_centroid
        self.device = None if device is None else torch.device(device)
        self.dtype, self.progress, self.chunk_rows = dtype, progress, chunk_rows
        self.centroids: torch.Tensor | None = None
        self.labels_: torch.Tensor | None = None
        self.objective_history: list[float] = []
        self.objectives: list[float] = []
        self.objective: float | None = None

    # -- checks

    def _check_x(self, x, what="x") -> None:
        if not isinstance(x, torch.Tensor):
            raise LusscoreError(f"KMeans: {what} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise LusscoreError(f"KMeans: {what} must be 2-D (N, D), got shape {tuple(x.shape)}")
        if x.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise LusscoreError(f"KMeans: {what} must be float32/float64/bfloat16/float16, got {x.dtype}")

    def _setup(self, x):
        device = self.device or x.device
        if device.type == "cuda" and device.index is None:  # "cuda" means the current GPU
            device = torch.device("cuda", torch.cuda.current_device())
        dtype = self.dtype or x.dtype
        if device.type == "cuda" and dtype == torch.float64:
            dtype = torch.float32  # the CUDA kernels take fp32/bf16/fp16
        return device, dtype

    # -- public API

    def fit(self, x: torch.Tensor, init_centroids: torch.Tensor | None = None) -> "KMeans":
        self._check_x(x)
        rank, world = rank_world()
        device, dtype = self._setup(x)
        k, d = self.n_clusters, x.shape[1]
        sizes = self._shard_sizes(x.shape[0], device)
        n_total = sum(sizes)
        if k > n_total:
            raise LusscoreError(f"KMeans: n_clusters = {k} is larger than the number of points N = {n_total}")
        if d == 0:
            raise LusscoreError("KMeans: x has no columns (D = 0)")
        offset = sum(sizes[:rank])
        if init_centroids is not None:
            if tuple(init_centroids.shape) != (k, d):
                raise LusscoreError(f"KMeans: init_centroids must have shape ({k}, {d}), "
                                    f"got {tuple(init_centroids.shape)}")
            if not torch.isfinite(init_centroids).all():
                raise LusscoreError("KMeans: init_centroids has NaN or inf entries")

        train = x
        train_sizes = sizes
        mppc = self.max_points_per_centroid
        if mppc is not None and n_total > k * mppc:
            # faiss: train on a random subset of k * max_points_per_centroid points.
            g = torch.Generator().manual_seed(self.seed + 1)
            keep = torch.randperm(n_total, generator=g)[:k * mppc].sort().values
            train = self._gather_rows(x, keep, offset, device)
            if world > 1:  # every rank now holds the whole subset: shard it again
                part = torch.tensor_split(torch.arange(len(keep)), world)[rank]
                train = train[part]
            train_sizes = [len(p) for p in torch.tensor_split(torch.arange(len(keep)), world)]
        train_offset = sum(train_sizes[:rank])
        train_total = sum(train_sizes)
        source = _Source(train, device, dtype, self.chunk_rows)

        self.objectives = []
        best = None
        checked = not source.streaming  # streamed data is checked during its first pass instead
        if checked:
            self._check_finite(train)
        for redo in range(self.nredo):
            if init_centroids is not None:
                c = init_centroids.to(device, torch.float32).clone()
            else:
                c = self._init_centroids(train, train_offset, train_total, device, redo)
            history = []
            bar = self._bar(redo)
            for it in range(self.niter):
                sums, counts, obj = self._pass(source, c, want_update=True, check_finite=not checked)
                checked = True
                history.append(obj)
                c = self._new_centroids(sums, counts, c, train_total, redo, it)
                if bar is not None:
                    bar.set_postfix(objective=f"{obj:.6g}")
                    bar.update(1)
            if bar is not None:
                bar.close()
            final = history[-1] if history else math.nan
            self.objectives.append(final)
            if best is None or self._better(final, best[0]):
                best = (final, c, history)
        self.objective, self.centroids, self.objective_history = best[0], best[1], best[2]
        self.labels_ = self.predict(x)
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest centroid of each row (int64, on x's device)."""
        if self.centroids is None:
            raise LusscoreError("KMeans: call fit() before predict()")
        self._check_x(x)
        if x.shape[1] != self.centroids.shape[1]:
            raise LusscoreError(f"KMeans: x has D = {x.shape[1]} columns but the centroids have "
                                f"{self.centroids.shape[1]}")
        device, dtype = self._setup(x)
        labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        c = self.centroids.to(device)
        for a, b, chunk in _Source(x, device, dtype, self.chunk_rows):
            lab, _ = kmeans_assign(chunk, c, self.metric)
            labels[a:b].copy_(lab, non_blocking=labels.device.type == "cpu" and device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        return labels

    # -- internals

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.metric == "ip" else a < b

    def _bar(self, redo):
        if not self.progress or rank_world()[0] != 0 or self.niter == 0:
            return None
        from lusscore.utils import progress_bar
        desc = f"k-means K={self.n_clusters}" + (f" run {redo + 1}/{self.nredo}" if self.nredo > 1 else "")
        return progress_bar(total=self.niter, desc=desc, leave=False)

    def _shard_sizes(self, n_local: int, device) -> list[int]:
        rank, world = rank_world()
        if world == 1:
            return [n_local]
        comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        mine = torch.tensor([n_local], dtype=torch.int64, device=comm_device)
        all_sizes = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(all_sizes, mine)
        return [int(s) for s in all_sizes]

    def _gather_rows(self, x, global_index: torch.Tensor, offset: int, device) -> torch.Tensor:
        """Rows of the global (all ranks') data at global_index, on every rank, float32.
        Each rank fills the rows it owns and a sum all-reduce completes the rest."""
        _, world = rank_world()
        if world == 1:
            return x[global_index.to(x.device)].to(device, torch.float32)
        local = (global_index >= offset) & (global_index < offset + x.shape[0])
        out = torch.zeros(len(global_index), x.shape[1], dtype=torch.float32, device=device)
        if local.any():
            rows = (global_index[local] - offset).to(x.device)
            out[local.to(device)] = x[rows].to(device, torch.float32)
        return _all_reduce(out)

    def _check_finite(self, x) -> None:
        bad = torch.zeros((), dtype=torch.int64, device=x.device)
        first = None
        step = max(1, (64 << 20) // max(1, x.shape[1]))
        for a in range(0, x.shape[0], step):
            nonfinite = ~torch.isfinite(x[a:a + step]).all(1)
            if first is None and nonfinite.any():
                first = a + int(nonfinite.nonzero()[0])
            bad += nonfinite.sum()
        n_bad = int(_all_reduce(bad))
        if n_bad:
            rank, world = rank_world()
            where = "" if first is None else \
                f" (first at row {first}" + (f" of rank {rank})" if world > 1 else ")")
            raise LusscoreError(f"KMeans: x has {n_bad} row(s) with NaN or inf values{where}")

    def _init_centroids(self, train, offset, n_total, device, redo) -> torch.Tensor:
        k = self.n_clusters
        g = torch.Generator().manual_seed(self.seed + 1 + redo * 15486557)  # faiss's per-run seed
        if self.init == "random":
            pick = torch.randperm(n_total, generator=g)[:k]
            return self._gather_rows(train, pick, offset, device)
        # k-means++ (D^2 seeding) on a random candidate subset, identical on every rank.
        m = min(n_total, max(k, KMEANSPP_POINTS_PER_CENTROID * k))
        cand = self._gather_rows(train, torch.randperm(n_total, generator=g)[:m].sort().values,
                                 offset, device)
        chosen = [int(torch.randint(m, (1,), generator=g))]
        d2 = ((cand - cand[chosen[0]]) ** 2).sum(1).double().cpu()
        for _ in range(1, k):
            total = float(d2.sum())
            if total <= 0:  # every candidate coincides with a centroid: take unused ones
                free = torch.ones(m, dtype=torch.bool)
                free[chosen] = False
                nxt = int(free.nonzero()[0])
            else:  # draw with probability d2 / total
                u = float(torch.rand((), generator=g, dtype=torch.float64)) * total
                nxt = min(int(torch.searchsorted(d2.cumsum(0), torch.tensor([u], dtype=torch.float64),
                                                 right=True)), m - 1)
            chosen.append(nxt)
            d2 = torch.minimum(d2, ((cand - cand[nxt]) ** 2).sum(1).double().cpu())
        return cand[chosen].clone()

    def _pass(self, source: _Source, c: torch.Tensor, want_update: bool, check_finite: bool):
        k, d = self.n_clusters, c.shape[1]
        device = c.device
        sums = torch.zeros(k, d, dtype=torch.float64, device=device)
        counts = torch.zeros(k, dtype=torch.int64, device=device)
        obj = torch.zeros((), dtype=torch.float64, device=device)
        bad = torch.zeros((), dtype=torch.int64, device=device)
        first_bad = None
        for a, b, chunk in source:
            if check_finite:
                nonfinite = ~torch.isfinite(chunk).all(1)
                bad += nonfinite.sum()
                if first_bad is None and device.type == "cpu" and nonfinite.any():
                    first_bad = a + int(nonfinite.nonzero()[0])
            lab, val = kmeans_assign(chunk, c, self.metric, check_finite=False)  # checked above
            obj += val.sum(dtype=torch.float64)
            if want_update:
                s, n = kmeans_update(chunk, lab, k)
                sums += s
                counts += n
        if check_finite:
            n_bad = int(_all_reduce(bad))
            if n_bad:
                where = f" (first at row {first_bad})" if first_bad is not None else ""
                raise LusscoreError(f"KMeans: x has {n_bad} row(s) with NaN or inf values{where}")
        if rank_world()[1] > 1:
            packed = _all_reduce(torch.cat([sums.flatten(), counts.double(), obj.reshape(1)]))
            sums = packed[:k * d].view(k, d)
            counts = packed[k * d:k * d + k].round().long()
            obj = packed[-1]
        return sums, counts, float(obj)

    def _new_centroids(self, sums, counts, old, n_total, redo, it) -> torch.Tensor:
        """Means of the clusters; empty clusters split from large ones (faiss split_clusters)."""
        counts_cpu = counts.cpu()
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].double(),
                        torch.zeros_like(sums)).float()
        empty = (counts_cpu == 0).nonzero().flatten().tolist()
        if empty:
            c = c.cpu()
            hassign = counts_cpu.double().numpy().copy()
            rng = np.random.default_rng([self.seed, redo, it, 1234])
            k = self.n_clusters
            denom = max(n_total - k, 1)
            for ci in empty:
                cj = None
                while cj is None:  # walk 0, 1, ..., k-1 as faiss does, drawing r per step
                    r = rng.random(k)
                    p = (hassign - 1.0) / denom
                    hits = np.nonzero(r < p)[0]
                    if len(hits):
                        cj = int(hits[0])
                c[ci] = c[cj]
                sign = torch.ones(c.shape[1])
                sign[1::2] = -1
                c[ci] *= 1 + sign * SPLIT_EPS
                c[cj] *= 1 - sign * SPLIT_EPS
                hassign[ci] = hassign[cj] / 2
                hassign[cj] -= hassign[ci]
            c = c.to(old.device)
        if self.spherical:
            c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return c
