"""Pixel pseudo-labels from the attention model and the k-means centroids (PASS step 3b).

Per image (resized so its shorter side is --resize, aspect kept): the stage-4 map, upsampled
x4 and L2-normalised (stride 8), is compared by cosine to the centroids; each pixel gets the
argmax + 1. The channel-mean attention, upsampled (bilinear) to the image, marks 'other'
(0) where it is < tau; the labels are upsampled (nearest) to the image size and written as
ImageNet-S PNGs under OUT with the image's path relative to the split folder.

--save-attention also writes each image's stride-8 mean attention as float32 .npy beside the
PNG; run with --tau 0 to get unmasked labels for a tau sweep (apply_tau gives any tau).

With a shape prior (label.prior rc or maps, and label.prior_mask) the image's saliency map
takes the mean attention's place as the mask: pixels whose saliency is below tau are 'other',
and the .npy holds the map (the sweep then picks tau as a saliency threshold).

label.method picks how labels are made (the paper's Tab 10a; LabelRule): "attention" (PASS,
the above); "image" (image-level labels: the image's cluster, the nearest centroid of its
pooled feature as cluster.pooling pools it, on every pixel whose CAM-style map, the pixel's
cosine to that centroid min-max normalised over the image (App. A, Eq. 9), is >= tau; the map
takes the attention's place in the .npy and the sweep); "pixel_kmeans" (pixel-level
clustering: C + 1 centroids of stage-4 pixel features, each pixel its nearest one, the
cluster most frequent on image borders 'other'; no tau).

Resumable: images whose outputs exist and are valid are skipped; every file is written to a
temporary name and renamed, so a killed run leaves no half-written file. Under torchrun
(RANK/WORLD_SIZE set) every rank labels its own shard.
"""
from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lusscore.data import ImageNetS, image_size, write_label_png
from lusscore.data.label_io import label_png_valid
from lusscore.data.transforms import load_image_tensor, resized_size
from lusscore.engine import setup_runtime
from lusscore.ops.attention_pool import attention_pool
from lusscore.ops.kmeans import check_finite_rows
from lusscore.saliency import read_saliency_png
from lusscore.stages.common import record_step, start_run
from lusscore.stages.saliency import prior_paths, run_prior_folder
from lusscore.utils import LusscoreError, atomic_path, remove_temp_files

LABEL_METHODS = ("attention", "image", "pixel_kmeans")


@dataclass(frozen=True)
class LabelRule:
    """How a pixel gets its label (label.method); pooling and pool_features: how the image
    method pools an image's feature (the cluster stage's settings); other_cluster: the
    pixel_kmeans centroid that is 'other'."""
    method: str = "attention"
    pooling: str = "attention"
    pool_features: str = "raw"
    other_cluster: int | None = None

    def __post_init__(self):
        if self.method not in LABEL_METHODS:
            raise LusscoreError(f"label.method must be one of {LABEL_METHODS}, got {self.method!r}")
        if self.method == "pixel_kmeans" and self.other_cluster is None:
            raise LusscoreError("label.method pixel_kmeans needs the cluster that is 'other' "
                                "(cluster/summary.json's other_cluster)")


@dataclass(frozen=True)
class LabelItem:
    image: Path
    label: Path                    # the PNG to write
    attention: Path | None = None  # the .npy of the mask map (the mean attention), when wanted
    prior: Path | None = None      # a saliency map that is the mask instead (label.prior_mask)


def apply_tau(labels: torch.Tensor, mean_attention: torch.Tensor, tau: float) -> torch.Tensor:
    """labels (H, W) at image size; mean_attention (h, w) at stride 8, upsampled bilinearly to
    (H, W); pixels with attention < tau become 0 ('other'). Returns a new tensor."""
    att = F.interpolate(mean_attention[None, None].float(), size=tuple(labels.shape),
                        mode="bilinear", align_corners=False)[0, 0]
    return torch.where(att < tau, torch.zeros_like(labels), labels)


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """(B, h, w) maps scaled to [0, 1] per map (App. A, Eq. 9); a constant map becomes 0."""
    lo = maps.amin(dim=(1, 2), keepdim=True)
    hi = maps.amax(dim=(1, 2), keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


@torch.inference_mode()
def label_batch(backbone, attention, centroids: torch.Tensor, images: torch.Tensor,
                sizes: list[tuple[int, int]], tau: float, amp: bool = False,
                rule: LabelRule = LabelRule(), priors: list[torch.Tensor] | None = None):
    """images (B, 3, h, w) of one size; sizes: each image's original (H, W).

    Returns ([labels (H, W) int32], [mask map float32]) on the model's device: the mask map
    is the mean attention at stride 8 (or, by rule, the image method's CAM-style map; ones
    for pixel_kmeans), or each image's prior (H, W) when priors are given (a shape prior
    in place of the attention mask). centroids: (K, L), normalised here.
    """
    device = images.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        z = backbone(images)
        _, x, a = attention.pixel_features(z.float())
    x = x.float()
    _, mean = attention_pool(x, a.float(), attention.channel_theta().float(), True)
    cent = F.normalize(centroids.to(device=device, dtype=torch.float32), dim=1)
    sim = torch.einsum("blhw,kl->bkhw", x, cent)
    if rule.method == "attention":
        ids = (sim.argmax(dim=1) + 1).to(torch.int32)
    elif rule.method == "image":
        from lusscore.stages.attention_features import pool_map
        pooled = pool_map(z, attention if rule.pooling == "attention" else None, rule.pool_features)
        image_cluster = (pooled @ cent.t()).argmax(dim=1)  # (B,)
        ids = (image_cluster + 1).to(torch.int32)[:, None, None].expand(-1, *x.shape[2:])
        mean = min_max(sim[torch.arange(len(sim), device=device), image_cluster])
    else:  # pixel_kmeans: C + 1 clusters, one of them 'other'
        lut = torch.arange(len(cent), device=device)
        lut = torch.where(lut > rule.other_cluster, lut, lut + 1)
        lut[rule.other_cluster] = 0
        ids = lut[sim.argmax(dim=1)].to(torch.int32)
        mean = torch.ones_like(mean)  # no tau: every pixel keeps its cluster
    masks = list(mean) if priors is None else [p.to(device=device, dtype=torch.float32) for p in priors]
    labels = []
    for i, (h, w) in enumerate(sizes):
        full = F.interpolate(ids[i][None, None].float(), size=(h, w), mode="nearest")[0, 0]
        labels.append(apply_tau(full.to(torch.int32), masks[i], tau))
    return labels, [m.float() for m in masks]


def plan_items(image_paths: list[Path], split_root: Path, out_dir: Path,
               save_attention: bool, priors: list[Path] | None = None) -> list[LabelItem]:
    items = []
    for i, p in enumerate(image_paths):
        rel = Path(p).relative_to(split_root).with_suffix("")
        label = out_dir / rel.with_suffix(".png")
        items.append(LabelItem(Path(p), label, label.with_suffix(".npy") if save_attention else None,
                               priors[i] if priors is not None else None))
    return items


def output_valid(item: LabelItem, image_hw: tuple[int, int]) -> bool:
    """True when the item's PNG (and .npy if wanted) decode whole and fit the image: a file
    damaged outside this stage's atomic writes is redone, never skipped."""
    if not label_png_valid(item.label, image_hw):
        return False
    if item.attention is not None:
        try:
            att = np.load(item.attention)
        except (OSError, ValueError, EOFError):
            return False
        if att.ndim != 2 or att.dtype != np.float32:
            return False
    return True


def _write_outputs(item: LabelItem, label: np.ndarray, attention: np.ndarray | None) -> None:
    if item.attention is not None:
        with atomic_path(item.attention) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, attention)
    write_label_png(item.label, label)


def shard(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def same_size_batches(sizes: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by network-input size (no padding), each group cut into batches."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault(s, []).append(i)
    batches = []
    for key in sorted(groups):
        idx = groups[key]
        batches.extend(idx[j:j + batch_size] for j in range(0, len(idx), batch_size))
    return batches


class _ImageSet(torch.utils.data.Dataset):
    def __init__(self, items, short):
        self.items, self.short = items, short

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return i, load_image_tensor(self.items[i].image, self.short)


def _collate(batch):
    idx = [b[0] for b in batch]
    return idx, torch.stack([b[1] for b in batch])


def label_images(backbone, attention, centroids, items: list[LabelItem], tau: float,
                 device="cpu", batch_size: int = 32, resize: int = 256, workers: int = 0,
                 writers: int = 4, amp: bool = False, progress: bool = True,
                 rule: LabelRule = LabelRule()) -> dict:
    """Label `items` (already this rank's shard). Skips items whose outputs are valid.

    Returns {'labelled', 'skipped', 'seconds', 'images_per_s'}.
    """
    device = torch.device(device)
    centroids = torch.as_tensor(np.asarray(centroids) if not torch.is_tensor(centroids) else centroids)
    if centroids.dim() != 2 or centroids.shape[1] != attention.channels:
        raise LusscoreError(f"centroids must have shape (K, {attention.channels}), got "
                            f"{tuple(centroids.shape)}")
    check_finite_rows("centroids", centroids)
    if centroids.shape[0] + 1 > 65535:
        raise LusscoreError(f"at most 65534 centroids fit a label PNG, got {centroids.shape[0]}")
    if not math.isfinite(tau):
        raise LusscoreError(f"tau must be a finite number, got {tau}")
    backbone.to(device).eval()
    attention.to(device).eval()
    centroids = centroids.to(device)

    start = time.perf_counter()
    todo, sizes, orig = [], [], []
    for item in items:
        hw = image_size(item.image)
        if output_valid(item, hw):
            continue
        todo.append(item)
        orig.append(hw)
        sizes.append(resized_size(*hw, resize))
    skipped = len(items) - len(todo)
    batches = same_size_batches(sizes, batch_size)
    loader = torch.utils.data.DataLoader(
        _ImageSet(todo, resize), batch_sampler=batches, num_workers=workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", persistent_workers=False)
    bar = None
    if progress:
        from lusscore.utils import progress_bar
        bar = progress_bar(total=len(todo), desc="label", unit="img", initial=0)
    pool = ThreadPoolExecutor(max(1, writers))
    pending = []
    try:
        for idx, images in loader:
            images = images.to(device, non_blocking=True)
            priors = None
            if todo[idx[0]].prior is not None:
                priors = [torch.from_numpy(read_saliency_png(todo[i].prior, orig[i])) for i in idx]
            labels, means = label_batch(backbone, attention, centroids, images,
                                        [orig[i] for i in idx], tau, amp=amp, rule=rule,
                                        priors=priors)
            labels = [lab.cpu().numpy() for lab in labels]
            means = [m.cpu().numpy() for m in means]
            for i, lab, m in zip(idx, labels, means):
                pending.append(pool.submit(_write_outputs, todo[i], lab, m))
            # Bound the queue of PNGs waiting to be written; surface writer errors early.
            while len(pending) > 4 * batch_size:
                pending.pop(0).result()
            if bar is not None:
                bar.update(len(idx))
        for f in pending:
            f.result()
    finally:
        pool.shutdown(wait=True)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    return {"labelled": len(todo), "skipped": skipped, "seconds": seconds,
            "images_per_s": len(todo) / seconds if seconds > 0 else float("nan")}


def load_centroids(path) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"centroids file not found: {path}")
    try:
        c = np.load(path)
    except (OSError, ValueError) as e:
        raise LusscoreError(f"{path}: cannot read centroids ({e})") from None
    if c.ndim != 2 or not np.issubdtype(c.dtype, np.floating):
        raise LusscoreError(f"{path}: centroids must be a (K, L) float array, got {c.shape} {c.dtype}")
    return torch.from_numpy(c.astype(np.float32))


def label_split(ctx, split: str, tau: float, save_attention: bool,
                out_dir: Path | None = None) -> dict:
    """Label a split of the run's dataset into out_dir (default <run>/labels/<split>) with the
    run's attention model and centroids (this rank's shard; resumable)."""
    from lusscore.models.backbone import load_attention_checkpoint
    ds = ctx.dataset
    if split == "train":
        images = [p for p, _ in ds.image_samples("train")]
    else:
        images = [s.image for s in ds.prediction_samples(split)]
    out_dir = ctx.run.labels(split) if out_dir is None else out_dir
    priors = None
    if ctx.cfg["label"]["prior"] != "none" and ctx.cfg["label"]["prior_mask"]:
        priors = prior_paths(ds, split, run_prior_folder(ctx, split), images)
    items = plan_items(images, ds.split_dir(split), out_dir, save_attention, priors)
    if ctx.rt.is_main:  # what a killed run left half-written
        remove_temp_files(out_dir)
    ctx.rt.barrier()
    backbone, attention, _ = load_attention_checkpoint(ctx.run.checkpoint("attention"))
    lcfg = ctx.cfg["label"]
    stats = label_images(backbone, attention, load_centroids(ctx.run.centroids),
                         shard(items, ctx.rt.rank, ctx.rt.world_size), tau, device=ctx.rt.device,
                         batch_size=lcfg["batch_size"], resize=lcfg["resize"],
                         workers=ctx.cfg["data"]["workers"], amp=ctx.rt.device.type == "cuda",
                         progress=ctx.rt.is_main, rule=run_label_rule(ctx))
    ctx.rt.barrier()
    if split == "train" and out_dir == ctx.run.labels(split):  # validation's: the tau sweep's
        record_step(ctx, "label")
    return stats


def run_label_rule(ctx) -> LabelRule:
    """The run's LabelRule: label.method, the cluster stage's pooling and, for pixel_kmeans,
    the 'other' cluster its summary names."""
    method, ccfg = ctx.cfg["label"]["method"], ctx.cfg["cluster"]
    other = None
    if method == "pixel_kmeans":
        other = json.loads(ctx.run.cluster_summary.read_text()).get("other_cluster")
    return LabelRule(method, ccfg["pooling"], ccfg["pool_features"], other)


def run_tau(ctx) -> float:
    """The tau of a run: the sweep's (written into the run's config.yaml), else the config's."""
    if ctx.cfg["label"]["sweep"] and not ctx.run.sweep_done():
        raise LusscoreError(f"{ctx.run.sweep} not found: run `luss sweep-tau --run-dir "
                            f"{ctx.run.root}` first (or pass --tau)")
    return float(ctx.cfg["label"]["tau"])


def add_arguments(parser):
    parser.add_argument("--run-dir", default=None,
                        help="label with a run folder's attention.pt, centroids and swept tau into "
                             "<run>/labels/<split> (then --data, --checkpoint, --centroids, --out "
                             "come from the run)")
    parser.add_argument("--data", help="dataset root (ImageNet-S layout)")
    parser.add_argument("--split", default="train", choices=["train", "validation", "train-semi", "test"])
    parser.add_argument("--checkpoint",
                        help="attention checkpoint {'backbone', 'attention', 'config'}")
    parser.add_argument("--centroids", help="centroids.npy (K, L)")
    parser.add_argument("--tau", type=float, default=None,
                        help="attention threshold ('other' below it); default: config['tau']")
    parser.add_argument("--out", help="folder of the label PNGs")
    parser.add_argument("--save-attention", action="store_true",
                        help="also write the stride-8 mean attention as .npy (for the tau sweep)")
    parser.add_argument("--resize", type=int, default=256, help="shorter side of the network input")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4, help="image decoding processes")
    parser.add_argument("--writers", type=int, default=4, help="PNG writing threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for the backbone")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="pick the packaged category list (when the root has none)")


def main_run_dir(args) -> None:
    """--run-dir: label a split from the run folder, tau from the run's config (the sweep's)."""
    from argparse import Namespace
    given = [f for f, v in (("--data", args.data), ("--checkpoint", args.checkpoint),
                            ("--centroids", args.centroids), ("--out", args.out),
                            ("--num-classes", args.num_classes)) if v is not None]
    if given:
        raise LusscoreError(f"--run-dir takes the data, checkpoint, centroids and output folder "
                            f"from the run; drop {', '.join(given)}")
    ctx = start_run(Namespace(run_dir=args.run_dir, config=None, set=[], device=args.device))
    tau = args.tau if args.tau is not None else run_tau(ctx)
    stats = label_split(ctx, args.split, tau, args.save_attention)
    if ctx.rt.is_main:
        print(f"luss label: {stats['labelled']} labelled, {stats['skipped']} already done, tau "
              f"{tau:.3f} -> {ctx.run.labels(args.split)}")


def main(args):
    from lusscore.models.backbone import load_attention_checkpoint

    if args.run_dir is not None:
        return main_run_dir(args)
    missing = [f for f, v in (("--data", args.data), ("--checkpoint", args.checkpoint),
                              ("--centroids", args.centroids), ("--out", args.out)) if v is None]
    if missing:
        raise LusscoreError(f"give {', '.join(missing)} (or --run-dir RUN to label from a run folder)")

    rt = setup_runtime(args.device)  # under torchrun: this process's rank and GPU
    rank, world, device = rt.rank, rt.world_size, rt.device
    backbone, attention, config = load_attention_checkpoint(args.checkpoint)
    from lusscore.ops.switch import apply_ops_config
    apply_ops_config(config)  # the run's ops mode (fused kernels or their references)
    tau = args.tau if args.tau is not None else config.get("tau", config.get("label", {}).get("tau"))
    if tau is None:
        raise LusscoreError("no --tau given and the checkpoint config has no 'tau'")
    centroids = load_centroids(args.centroids)
    dataset = ImageNetS(args.data, num_classes=args.num_classes)
    images = [p for p, _ in dataset.image_samples(args.split)]
    items = plan_items(images, dataset.split_dir(args.split), Path(args.out), args.save_attention)
    if rt.is_main:  # what a killed run left half-written
        remove_temp_files(args.out)
    rt.barrier()
    mine = shard(items, rank, world)
    stats = label_images(backbone, attention, centroids, mine, float(tau), device=device,
                         batch_size=args.batch_size, resize=args.resize, workers=args.workers,
                         writers=args.writers, amp=args.amp, progress=rank == 0)
    print(f"luss label [rank {rank}/{world}]: {stats['labelled']} labelled, {stats['skipped']} "
          f"already done, {stats['images_per_s']:.1f} images/s -> {args.out}")
    record = {"split": args.split, "tau": float(tau), "rank": rank, "world": world,
              "checkpoint": str(args.checkpoint), "centroids": str(args.centroids), **stats}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / f"label_log.rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
