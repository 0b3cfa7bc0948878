"""Cluster the attention-pooled features of every train image into K centroids.

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
from lusscore.stages.attention_features import pooled_features
from lusscore.stages.common import RunDir, StageContext, add_run_arguments, record_step, start_run
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
    backbone, attention, _ = load_attention_model(ctx.run)
    # The reference code pools attention x raw features for clustering (a quirk; the default).
    pooling = ccfg["pooling"]
    if pooling not in ("attention", "mean"):
        raise LusscoreError(f"cluster.pooling must be 'attention' or 'mean', not {pooling!r}")
    feats = pooled_features(backbone, attention if pooling == "attention" else None,
                            [p for p, _ in samples], device=rt.device,
                            batch_size=ccfg["batch_size"], workers=cfg["data"]["workers"],
                            resize=ccfg["resize"], crop=ccfg["crop"],
                            pool_features=ccfg["pool_features"],
                            amp=rt.device.type == "cuda", progress=rt.is_main)
    km = KMeans(ccfg["k"], niter=ccfg["niter"], nredo=ccfg["nredo"],
                seed=ctx.seed, device=rt.device, progress=rt.is_main)
    km.fit(feats)
    labels = km.labels_.cpu().numpy()
    truth = np.array([c for _, c in samples])
    summary = {"k": ccfg["k"], "images": len(samples), "objective": km.objective_history[-1],
               "nmi": nmi(labels, truth), "hungarian_accuracy": hungarian_accuracy(labels, truth)}
    hues = object_hue_bins(ctx.dataset.root, samples)
    if hues is not None:  # what else the clusters may follow: the object's colour
        summary["nmi_object_hue"] = nmi(labels, hues)
    run = ctx.run
    if rt.is_main:  # the summary last: it marks the step complete
        with atomic_path(run.centroids) as tmp:
            np.save(tmp, km.centroids.float().cpu().numpy())
        with atomic_path(run.assignments) as tmp:
            np.save(tmp, labels)
        atomic_write_text(run.cluster_summary, json.dumps(summary, indent=1))
    record_step(ctx, "cluster")
    rt.barrier()
    return summary


def cluster_step(ctx: StageContext) -> dict:
    """`luss run`'s clustering: run_cluster unless <run>/cluster/ is complete; logs the NMI."""
    if ctx.run.cluster_done():
        summary = json.loads(ctx.run.cluster_summary.read_text())
        ctx.log("cluster: complete, skipped")
    else:
        summary = run_cluster(ctx)
    hue = (f"; NMI vs the object's hue {summary['nmi_object_hue']:.3f}"
           if "nmi_object_hue" in summary else "")
    ctx.log(f"cluster: K={summary['k']} NMI {summary['nmi']:.3f}, image-level Hungarian accuracy "
            f"{100 * summary['hungarian_accuracy']:.1f}%{hue}")
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
