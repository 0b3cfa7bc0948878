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
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from lusscore.cluster import KMeans
from lusscore.diagnostics import object_hue_bins
from lusscore.engine import Runtime
from lusscore.models.backbone import load_attention_checkpoint
from lusscore.ops.switch import ops_from_config
from lusscore.stages.attention_features import pooled_features
from lusscore.stages.common import add_run_arguments, dataset_of, start_run
from lusscore.utils import LusscoreError, atomic_path, atomic_write_text


def load_attention_model(run_dir: Path):
    """(stage-4 backbone, PixelAttention, config) of <run>/attention.pt."""
    return load_attention_checkpoint(run_dir / "attention.pt")


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information (arithmetic mean of the entropies, as scikit-learn)."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1)
    p = joint / joint.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum()
    ha, hb = -(pa * np.log(pa)).sum(), -(pb * np.log(pb)).sum()
    return float(mi / max((ha + hb) / 2, 1e-12)) if ha + hb > 0 else 1.0


def hungarian_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    k = max(pred.max(), truth.max()) + 1
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (pred, truth), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(pred))


@ops_from_config
def run_cluster(cfg: dict, run_dir: Path, rt: Runtime, samples) -> dict:
    ccfg = cfg["cluster"]
    backbone, attention, _ = load_attention_model(run_dir)
    # The reference code pools attention x raw features for clustering (a quirk; the default).
    pooling = ccfg.get("pooling", "attention")
    if pooling not in ("attention", "mean"):
        raise LusscoreError(f"cluster.pooling must be 'attention' or 'mean', not {pooling!r}")
    feats = pooled_features(backbone, attention if pooling == "attention" else None,
                            [p for p, _ in samples], device=rt.device,
                            batch_size=ccfg.get("batch_size", 64), workers=cfg["data"].get("workers", 0),
                            resize=ccfg.get("resize", 256), crop=ccfg.get("crop", 224),
                            pool_features=ccfg.get("pool_features", "raw"),
                            amp=rt.device.type == "cuda", progress=rt.is_main)
    km = KMeans(ccfg["k"], niter=ccfg.get("niter", 20), nredo=ccfg.get("nredo", 1),
                seed=int(cfg.get("seed", 0)), device=rt.device, progress=rt.is_main)
    km.fit(feats)
    labels = km.labels_.cpu().numpy()
    truth = np.array([c for _, c in samples])
    summary = {"k": ccfg["k"], "images": len(samples), "objective": km.objective_history[-1],
               "nmi": nmi(labels, truth), "hungarian_accuracy": hungarian_accuracy(labels, truth)}
    hues = object_hue_bins(dataset_of(cfg).root, samples)
    if hues is not None:  # what else the clusters may follow: the object's colour
        summary["nmi_object_hue"] = nmi(labels, hues)
    out = run_dir / "cluster"
    if rt.is_main:
        with atomic_path(out / "centroids.npy") as tmp:
            np.save(tmp, km.centroids.float().cpu().numpy())
        with atomic_path(out / "assignments.npy") as tmp:
            np.save(tmp, labels)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    rt.barrier()
    return summary


def add_arguments(parser):
    add_run_arguments(parser)


def main(args):
    cfg, run_dir, rt = start_run(args)
    if (run_dir / "cluster" / "summary.json").is_file():
        print(f"cluster: {run_dir / 'cluster'} is complete")
        return
    summary = run_cluster(cfg, run_dir, rt, dataset_of(cfg).image_samples("train"))
    if rt.is_main:
        print("cluster: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in summary.items()))
