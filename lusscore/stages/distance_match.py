"""Distance matching: label validation pixels by a kNN vote over train-semi class regions.

From <run>/pretrain.pt's backbone (stage 4, upsampled bilinearly to `stride`):
1. Bank: for every train-semi image and every GT id in it except ignore (1000; background 0
   included), the mean feature over that region (GT downsampled nearest to the feature
   grid) -> <run>/distance_match/bank.pt {'vectors' (N, L), 'labels' (N), 'images' (N)}.
   Built once (sharded over ranks, gathered, written atomically); reused when present.
2. Predict: each pixel of a split (validation, or test)'s L2-normalised feature takes a
   weighted vote of its k nearest bank vectors by cosine (weight exp(cos / temperature));
   the stride grid is upsampled (nearest) to the image and written to
   <run>/distance_match/predictions/<split>/<wnid>/<name>.png (existing ones skipped).
3. Evaluate (splits with GT) without matching: the votes are GT ids already. `match:
   hungarian` re-matches on validation as the reference code does (a bug there; offered only
   for comparison); test then reuses that match.
Metrics land in <run>/distance_match/metrics.json (test: distance_match/test/metrics.json),
in the format of <run>/metrics.json.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lusscore.data.label_io import (IGNORE_INDEX, image_size, label_png_valid, read_label_png,
                                    write_label_png)
from lusscore.data.transforms import load_image_tensor, resized_size
from lusscore.engine import Runtime, autocast
from lusscore.ops.kmeans import kmeans_assign, kmeans_update
from lusscore.models.pass_models import pretrained_trunk
from lusscore.stages.common import StageContext, add_run_arguments, record_step, resolve_config, start_run
from lusscore.stages.evaluate import DISTANCE_MATCH_MODES, evaluate_protocol, protocol_matches
from lusscore.utils import LusscoreError, atomic_path, progress_bar, remove_temp_files

FOLDER = "distance_match"
def settings(cfg: dict) -> dict:
    """The config's distance_match section (defaults in configs/defaults.yaml), checked."""
    s = cfg[FOLDER]
    if int(s["k"]) < 1:
        raise LusscoreError(f"distance_match.k must be >= 1, got {s['k']}")
    if not float(s["temperature"]) > 0:
        raise LusscoreError(f"distance_match.temperature must be > 0, got {s['temperature']}")
    protocol_matches(cfg, FOLDER)  # checks distance_match.match
    return s


# ---------------------------------------------------------------------------------------------
# The kNN vote


def knn_vote(x: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_labels: int,
             k: int = 10, temperature: float = 0.07, chunk_elements: int = 1 << 25) -> torch.Tensor:
    """Weighted kNN label of every row of x (N, D) over bank (M, D) with labels (M) in
    0..num_labels-1: cosine similarity (both sides L2-normalised here), the k most similar
    bank rows (exact ties: lowest bank index first), each voting exp(cos / temperature) for
    its label; the label with the largest total wins (ties: lowest label). -> int64 (N).

    Runs on x's device in chunks of rows so that the chunk x M similarity block holds at most
    `chunk_elements` values. k = 1 uses the fused nearest-centroid kernel (kmeans_assign,
    metric 'ip'): it keeps one running (best, index) per row while streaming over centroid
    tiles, which is exactly the 1-NN; it cannot give the top 10, which would need a k-element
    sorted list per row carried across tiles, so k > 1 runs matmul + topk on the device.
    """
    if x.dim() != 2 or bank.dim() != 2 or x.shape[1] != bank.shape[1]:
        raise LusscoreError(f"x (N, D) and bank (M, D) must be 2-D with the same D, got "
                            f"{tuple(x.shape)} and {tuple(bank.shape)}")
    if bank_labels.shape != (bank.shape[0],):
        raise LusscoreError(f"bank_labels must have shape ({bank.shape[0]},), got {tuple(bank_labels.shape)}")
    if bank.shape[0] == 0:
        raise LusscoreError("the bank is empty: no labelled regions to vote")
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    if x.shape[0] == 0:
        return out
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = F.normalize(x.to(dtype), dim=1)
    bank = F.normalize(bank.to(device=x.device, dtype=dtype), dim=1)
    bank_labels = bank_labels.to(device=x.device, dtype=torch.int64)
    k = min(int(k), bank.shape[0])
    if k == 1 and not (dtype == torch.float64 and x.device.type == "cuda"):  # no fp64 CUDA kernel
        nearest, _ = kmeans_assign(x, bank, "ip")
        return bank_labels[nearest]
    rows = max(1, int(chunk_elements) // bank.shape[0])
    for start in range(0, x.shape[0], rows):
        sim = x[start:start + rows] @ bank.T
        values, index = torch.topk(sim, k, dim=1)
        # topk may pick any of several bank rows equal to the k-th value; redo the rows where
        # such a tie straddles the cut with a stable sort (lowest index first).
        kth = values[:, -1:]
        straddle = (sim == kth).sum(1) > (values == kth).sum(1)
        if bool(straddle.any()):
            rows_t = straddle.nonzero()[:, 0]
            v, i = torch.sort(sim[rows_t], dim=1, descending=True, stable=True)
            values[rows_t], index[rows_t] = v[:, :k], i[:, :k]
        # exp((cos - 1) / T) = exp(cos / T) * const: the same vote, and no overflow for small T.
        weights = torch.exp((values - 1.0) / temperature)
        scores = torch.zeros(sim.shape[0], num_labels, dtype=dtype, device=x.device)
        scores.scatter_add_(1, bank_labels[index], weights)
        out[start:start + rows] = scores.argmax(1)
    return out


# ---------------------------------------------------------------------------------------------
# Features and the bank


def load_pretrain_backbone(ctx: StageContext):
    """The stage-4 ResNet trunk of <run>/pretrain.pt (which must be complete), in eval mode."""
    trunk = pretrained_trunk(ctx.run.checkpoint("pretrain"), ctx.cfg["model"])
    return trunk.to(ctx.rt.device).eval()


def upsample_factor(cfg: dict, stride: int) -> int:
    os_ = int(cfg["model"]["output_stride"])
    if stride < 1 or os_ % stride:
        raise LusscoreError(f"distance_match.stride must divide the backbone's output stride "
                            f"{os_}, got {stride}")
    return os_ // stride


@torch.inference_mode()
def pixel_features(backbone, images: torch.Tensor, upsample: int, rt: Runtime) -> torch.Tensor:
    """(B, 3, h, w) -> the stage-4 map upsampled bilinearly by `upsample`, fp32 (B, L, h', w')."""
    with autocast(rt):
        z = backbone(images.to(rt.device))
    z = z.float()
    if upsample > 1:
        z = F.interpolate(z, scale_factor=upsample, mode="bilinear", align_corners=False)
    return z


def region_means(features: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """features (L, h, w), label (h, w) ids on the same grid -> (ids (n) int64 sorted,
    means (n, L) fp32): the mean feature of every id present except ignore_index."""
    if features.shape[1:] != label.shape:
        raise LusscoreError(f"features {tuple(features.shape)} and label {tuple(label.shape)} "
                            "must share the grid")
    flat = label.reshape(-1).to(device=features.device, dtype=torch.int64)
    keep = flat != ignore_index
    x = features.reshape(features.shape[0], -1).T[keep].float().contiguous()
    ids, inverse = torch.unique(flat[keep], sorted=True, return_inverse=True)
    if ids.numel() == 0:
        return ids, x.new_zeros((0, features.shape[0]))
    sums, counts = kmeans_update(x, inverse, ids.numel())
    return ids, sums / counts[:, None].to(sums.dtype)


def _same_size_batches(paths, resize: int, batch_size: int):
    from lusscore.stages.label import same_size_batches
    orig = [image_size(p) for p in paths]
    return orig, same_size_batches([resized_size(*hw, resize) for hw in orig], batch_size)


def _load_batch(paths, idx, resize):
    return torch.stack([load_image_tensor(paths[i], resize) for i in idx])


def build_bank(backbone, samples, upsample: int, rt: Runtime, resize: int = 256,
               batch_size: int = 32, progress: bool = True) -> dict:
    """The bank of this rank's shard of `samples` (global order = sample index, then id)."""
    mine = list(range(rt.rank, len(samples), rt.world_size))
    paths = [samples[i].image for i in mine]
    orig, batches = _same_size_batches(paths, resize, batch_size)
    vectors, labels, images = [], [], []
    bar = progress_bar(total=len(mine), desc="distance-match bank", unit="img", disable=not progress)
    for idx in batches:
        feats = pixel_features(backbone, _load_batch(paths, idx, resize), upsample, rt)
        for j, i in enumerate(idx):
            gt = read_label_png(samples[mine[i]].label, expected_size=orig[i])
            gt = F.interpolate(torch.from_numpy(gt)[None, None].float(), size=feats.shape[-2:],
                               mode="nearest")[0, 0].long()
            ids, means = region_means(feats[j], gt.to(feats.device))
            vectors.append(means.cpu())
            labels.append(ids.cpu())
            images.append(torch.full((ids.numel(),), mine[i], dtype=torch.int64))
        bar.update(len(idx))
    bar.close()
    width = backbone.out_channels
    cat = lambda xs, shape, dt: torch.cat(xs) if xs else torch.zeros(shape, dtype=dt)  # noqa: E731
    return {"vectors": cat(vectors, (0, width), torch.float32),
            "labels": cat(labels, (0,), torch.int64), "images": cat(images, (0,), torch.int64)}


def gather_bank(part: dict, rt: Runtime) -> dict:
    """All ranks' parts, ordered by (image index, id) so the bank does not depend on the
    number of ranks."""
    parts = [part]
    if rt.distributed:
        parts = [None] * rt.world_size
        torch.distributed.all_gather_object(parts, part)
    bank = {k: torch.cat([p[k] for p in parts]) for k in part}
    order = np.lexsort((bank["labels"].numpy(), bank["images"].numpy()))
    return {k: v[torch.from_numpy(order)] for k, v in bank.items()}


def load_or_build_bank(ctx: StageContext, backbone=None) -> dict:
    cfg, rt, path = ctx.cfg, ctx.rt, ctx.run.distance_bank
    if not path.is_file():
        s = settings(cfg)
        samples = ctx.dataset.train_semi_samples()
        backbone = backbone or load_pretrain_backbone(ctx)
        part = build_bank(backbone, samples, upsample_factor(cfg, int(s["stride"])), rt,
                          resize=int(s["resize"]), batch_size=int(s["batch_size"]),
                          progress=rt.is_main)
        bank = gather_bank(part, rt)
        if rt.is_main:
            with atomic_path(path) as tmp:
                torch.save(bank, tmp)
        record_step(ctx, "distance_match")
        rt.barrier()
    bank = torch.load(path, map_location="cpu", weights_only=True)
    if bank["vectors"].shape[0] == 0:
        raise LusscoreError(f"{path}: the bank is empty (no labelled train-semi regions)")
    return bank


# ---------------------------------------------------------------------------------------------
# Prediction and the protocol


def predict_knn(backbone, bank: dict, samples, out_dir: Path, cfg: dict, rt: Runtime,
                progress: bool = True) -> int:
    """Write the kNN prediction of this rank's shard of `samples`; skip valid existing PNGs."""
    s = settings(cfg)
    upsample = upsample_factor(cfg, int(s["stride"]))
    if rt.is_main:  # what a killed run left half-written
        remove_temp_files(out_dir)
    rt.barrier()
    todo = []
    for sample in samples[rt.rank::rt.world_size]:
        if not label_png_valid(out_dir / sample.name, image_size(sample.image)):
            todo.append(sample)
    paths = [t.image for t in todo]
    orig, batches = _same_size_batches(paths, int(s["resize"]), int(s["batch_size"]))
    vectors = bank["vectors"].to(rt.device)
    labels = bank["labels"].to(rt.device)
    num_labels = int(cfg["data"]["num_classes"]) + 1
    bar = progress_bar(total=len(todo), desc="distance-match", unit="img", disable=not progress)
    for idx in batches:
        feats = pixel_features(backbone, _load_batch(paths, idx, int(s["resize"])), upsample, rt)
        b, d, h, w = feats.shape
        pixels = feats.permute(0, 2, 3, 1).reshape(-1, d)
        ids = knn_vote(pixels, vectors, labels, num_labels, k=int(s["k"]),
                       temperature=float(s["temperature"]),
                       chunk_elements=int(s["chunk_elements"])).view(b, 1, h, w)
        for j, i in enumerate(idx):
            full = F.interpolate(ids[j:j + 1].float(), size=orig[i], mode="nearest")[0, 0]
            write_label_png(out_dir / todo[i].name, full.long())
        bar.update(len(idx))
    bar.close()
    rt.barrier()
    return len(todo)


def run_distance_match(ctx: StageContext, split: str = "validation") -> dict | None:
    """Build (or load) the bank, predict `split`; its metrics, or None without GT."""
    settings(ctx.cfg)  # checked before any work
    ds = ctx.dataset
    backbone = load_pretrain_backbone(ctx)
    bank = load_or_build_bank(ctx, backbone)
    if ctx.rt.is_main:
        print(f"[distance-match] bank: {bank['vectors'].shape[0]} regions of "
              f"{int(bank['images'].unique().numel())} train-semi images", flush=True)
    predict_knn(backbone, bank, ds.prediction_samples(split), ctx.run.predictions(FOLDER, split),
                ctx.cfg, ctx.rt, progress=ctx.rt.is_main)
    if not ds.has_labels(split):
        return None
    return evaluate_protocol(ctx, FOLDER, split)


def add_arguments(parser):
    add_run_arguments(parser)
    parser.add_argument("--match", default=None, choices=list(DISTANCE_MATCH_MODES),
                        help="none (default: the votes are GT ids) or hungarian (re-match, as "
                             "the reference code does; test reuses validation's match)")
    parser.add_argument("--split", default="validation", choices=["validation", "test"],
                        help="the split to predict (and score when it has GT)")


def main(args):
    cfg = resolve_config(args.run_dir, args.config, args.set)
    if args.match is not None:  # saved with the run's config: test reuses the same choice
        cfg.setdefault(FOLDER, {})["match"] = args.match
    ctx = start_run(args, cfg)
    result = run_distance_match(ctx, args.split)
    if ctx.rt.is_main:
        if result is None:
            print(f"distance-match: predicted {args.split} into "
                  f"{ctx.run.predictions(FOLDER, args.split)} (no GT: not scored)")
        else:
            print(f"distance-match: {args.split} mIoU {result['mIoU']:.2f} -> "
                  f"{ctx.run.metrics(FOLDER, args.split)}")
