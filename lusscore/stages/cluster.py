"""Cluster the attention-pooled features of every train image into K centroids.

(label.method pixel_kmeans: cluster every stage-4 pixel of the train crops into K + 1
centroids instead, and name the one most frequent on the maps' borders 'other_cluster'.)

Each image is resized (shorter side `cluster.resize`, 256) and centre-cropped
(`cluster.crop`, 224); its stage-4 map is pooled with the trained pixel attention, L2-
normalised (`cluster.pooling: mean` pools without attention, an ablation), and k-means
(K clusters, `niter` iterations, best of `nredo` restarts) gives
<run>/cluster/centroids.npy (K, L), image assignments and, when the folder labels exist,
NMI and Hungarian accuracy against them (cluster/summary.json); with the train GT of a
synthetic set, also the NMI against the hue of each image's object (`nmi_object_hue`).
"""
from __future__ import annotations

import json

import numpy as np

from lusscore.cluster import KMeans
from lusscore.diagnostics import object_hue_bins
from lusscore.metrics import hungarian_accuracy, nmi
from lusscore.models.backbone import load_attention_checkpoint
from lusscore.ops.switch import ops_from_config
from lusscore.stages.attention_features import pixel_features, pooled_features
from lusscore.stages.common import RunDir, StageContext, add_run_arguments, record_step, start_run
from lusscore.stages.label import LABEL_METHODS
from lusscore.utils import LusscoreError, atomic_path, atomic_write_text


def load_attention_model(run: RunDir):
    """(stage-4 backbone, PixelAttention, config) of <run>/attention.pt."""
    return load_attention_checkpoint(run.checkpoint("attention"))


@ops_from_config
def run_cluster(ctx: StageContext, samples=None) -> dict:
    """k-means of the train images' pooled features into <run>/cluster/ (samples: default
    the train split); returns the summary."""
    cfg, rt = ctx.cfg, ctx.rt
    samples = ctx.dataset.image_samples("train") if samples is None else samples
    ccfg = cfg["cluster"]
    method = cfg["label"]["method"]
    if method not in LABEL_METHODS:
        raise LusscoreError(f"label.method must be one of {LABEL_METHODS}, got {method!r}")
    backbone, attention, _ = load_attention_model(ctx.run)
    if method == "pixel_kmeans":
        return run_pixel_cluster(ctx, backbone, samples)
    # The reference code pools attention x raw features for clustering (a quirk; the default).
    pooling = ccfg["pooling"]
    if pooling not in ("attention", "mean"):
        raise LusscoreError(f"cluster.pooling must be 'attention' or 'mean', not {pooling!r}")
    pool = attention if pooling == "attention" else None

    def features(paths):
        return pooled_features(backbone, pool, paths, device=rt.device,
                               batch_size=ccfg["batch_size"], workers=cfg["data"]["workers"],
                               resize=ccfg["resize"], crop=ccfg["crop"],
                               pool_features=ccfg["pool_features"],
                               amp=rt.device.type == "cuda", progress=rt.is_main)

    feats = features([p for p, _ in samples])
    km = KMeans(ccfg["k"], niter=ccfg["niter"], nredo=ccfg["nredo"],
                seed=ctx.seed, device=rt.device, progress=rt.is_main)
    km.fit(feats)
    labels = km.labels_.cpu().numpy()
    truth = np.array([c for _, c in samples])
    summary = {"k": ccfg["k"], "images": len(samples), "objective": km.objective_history[-1],
               "nmi": nmi(labels, truth), "hungarian_accuracy": hungarian_accuracy(labels, truth)}
    # The image-level clusters of validation (nearest centroid) against its folder classes.
    ds = ctx.dataset
    if ds.has_images("validation"):
        val = ds.split_images("validation")
        val_truth = np.array([ds.class_id(s.name.split("/")[0]) for s in val])
        val_labels = km.predict(features([s.image for s in val])).cpu().numpy()
        summary["nmi_validation"] = nmi(val_labels, val_truth)
    hues = object_hue_bins(ctx.dataset.root, samples)
    if hues is not None:  # what else the clusters may follow: the object's colour
        summary["nmi_object_hue"] = nmi(labels, hues)
    save_cluster(ctx, km.centroids, labels, summary)
    return summary


def save_cluster(ctx: StageContext, centroids, assignments: np.ndarray, summary: dict) -> None:
    run = ctx.run
    if ctx.rt.is_main:  # the summary last: it marks the step complete
        with atomic_path(run.centroids) as tmp:
            np.save(tmp, centroids.float().cpu().numpy())
        with atomic_path(run.assignments) as tmp:
            np.save(tmp, assignments)
        atomic_write_text(run.cluster_summary, json.dumps(summary, indent=1))
    record_step(ctx, "cluster")
    ctx.rt.barrier()


def run_pixel_cluster(ctx: StageContext, backbone, samples) -> dict:
    """The paper's pixel-level label generation (Tab 10a): k-means of every stage-4 pixel of
    the train crops into C + 1 clusters (the fused k-means over all of them); the cluster
    most frequent on the maps' borders is 'other'. Assignments: per pixel."""
    ccfg, rt = ctx.cfg["cluster"], ctx.rt
    feats, border = pixel_features(backbone, [p for p, _ in samples], device=rt.device,
                                   batch_size=ccfg["batch_size"], workers=ctx.cfg["data"]["workers"],
                                   resize=ccfg["resize"], crop=ccfg["crop"],
                                   amp=rt.device.type == "cuda", progress=rt.is_main)
    k = ccfg["k"] + 1
    km = KMeans(k, niter=ccfg["niter"], nredo=ccfg["nredo"], seed=ctx.seed, device=rt.device,
                progress=rt.is_main)
    km.fit(feats)
    labels = km.labels_.cpu().numpy()
    other = int(np.bincount(labels[border.numpy()], minlength=k).argmax())
    summary = {"k": k, "images": len(samples), "pixels": int(len(labels)),
               "objective": km.objective_history[-1], "other_cluster": other,
               "method": "pixel_kmeans"}
    save_cluster(ctx, km.centroids, labels, summary)
    return summary


def cluster_step(ctx: StageContext) -> dict:
    """`luss run`'s clustering: run_cluster unless <run>/cluster/ is complete; logs the NMI."""
    if ctx.run.cluster_done():
        summary = json.loads(ctx.run.cluster_summary.read_text())
        ctx.log("cluster: complete, skipped")
    else:
        summary = run_cluster(ctx)
    if summary.get("method") == "pixel_kmeans":
        ctx.log(f"cluster: {summary['pixels']} pixels into K={summary['k']}, 'other' is cluster "
                f"{summary['other_cluster']}")
        return summary
    hue = (f"; NMI vs the object's hue {summary['nmi_object_hue']:.3f}"
           if "nmi_object_hue" in summary else "")
    val = (f"; validation NMI {summary['nmi_validation']:.3f}"
           if "nmi_validation" in summary else "")
    ctx.log(f"cluster: K={summary['k']} NMI {summary['nmi']:.3f}, image-level Hungarian accuracy "
            f"{100 * summary['hungarian_accuracy']:.1f}%{val}{hue}")
    return summary


def add_arguments(parser):
    add_run_arguments(parser)


def main(args):
    ctx = start_run(args)
    if ctx.run.cluster_done():
        print(f"cluster: {ctx.run.cluster_dir} is complete")
        return
    summary = run_cluster(ctx)
    if ctx.rt.is_main:
        print("cluster: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in summary.items()))
