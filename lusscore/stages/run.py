"""Run every PASS stage in order, skipping the ones already complete (resumable).

pretrain -> attention -> cluster -> label validation (with attention maps) -> sweep tau
-> label train (best tau) -> finetune -> infer validation -> evaluate (Hungarian matching).
Everything lands in the run folder; the final metrics in <run>/metrics.json, the match in
<run>/match.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lusscore.config import apply_overrides, load_config, save_config
from lusscore.engine import Runtime, StageCheckpoint, seed_everything, setup_runtime
from lusscore.stages.common import RUN_CONFIG, dataset_of
from lusscore.utils import atomic_write_text


def log(rt: Runtime, text: str) -> None:
    if rt.is_main:
        print(f"[luss run] {text}", flush=True)


def label_split(cfg: dict, run_dir: Path, rt: Runtime, split: str, tau: float,
                save_attention: bool) -> dict:
    from lusscore.stages.cluster import load_attention_model
    from lusscore.stages.label import label_images, plan_items, shard

    ds = dataset_of(cfg)
    if split == "train":
        images = [p for p, _ in ds.image_samples("train")]
    else:
        images = [s.image for s in ds.segmentation_samples(split)]
    items = plan_items(images, ds.split_dir(split), run_dir / "labels" / split, save_attention)
    backbone, attention, _ = load_attention_model(run_dir)
    lcfg = cfg["label"]
    stats = label_images(backbone, attention,
                         np.load(run_dir / "cluster" / "centroids.npy"),
                         shard(items, rt.rank, rt.world_size), tau, device=rt.device,
                         batch_size=lcfg.get("batch_size", 32), resize=lcfg.get("resize", 256),
                         workers=cfg["data"].get("workers", 0), amp=rt.device.type == "cuda",
                         progress=rt.is_main)
    rt.barrier()
    return stats


def report_attention_foreground(cfg: dict, run_dir: Path, rt: Runtime, tau: float) -> dict:
    """Score the validation attention maps against GT foreground; <run>/attention_score.json."""
    from lusscore.diagnostics import attention_foreground, format_foreground
    ds = dataset_of(cfg)
    scores = attention_foreground(ds.segmentation_samples("validation"),
                                  run_dir / "labels" / "validation", tau)
    atomic_write_text(run_dir / "attention_score.json", json.dumps(_plain(scores), indent=1))
    log(rt, format_foreground(scores))
    return scores


def evaluate_predictions(cfg: dict, run_dir: Path, rt: Runtime) -> dict:
    from lusscore.stages.evaluate import evaluate, format_table
    ds = dataset_of(cfg)
    names = ds.names_path("validation")
    result = evaluate(ds.root / "validation-segmentation", run_dir / "predictions" / "validation",
                      ds.num_classes, names=names if names.is_file() else None, match="hungarian",
                      device=str(rt.device) if rt.device.type == "cuda" else "cpu")
    if rt.is_main:
        match = {str(k): int(v) for k, v in result["match"].items()}
        atomic_write_text(run_dir / "match.json", json.dumps(match, indent=1))
        atomic_write_text(run_dir / "metrics.json", json.dumps(_plain(result), indent=1))
        print(format_table(result, ["other"] + ds.wnids))
    return result


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def run_pipeline(cfg: dict, run_dir: Path, rt: Runtime) -> dict:
    from lusscore.stages.attention import train_attention
    from lusscore.stages.cluster import run_cluster
    from lusscore.stages.finetune import finetune
    from lusscore.stages.infer import predict_split
    from lusscore.stages.pretrain import pretrain
    from lusscore.stages.sweep_tau import format_sweep, run_sweep

    ds = dataset_of(cfg)
    train = ds.image_samples("train")
    for stage, fn in (("pretrain", pretrain), ("attention", train_attention)):
        if StageCheckpoint(run_dir, stage, rt, cfg).is_done():
            log(rt, f"{stage}: complete, skipped")
        else:
            log(rt, f"{stage}: {cfg[stage]['epochs']} epochs on {len(train)} images")
            fn(cfg, run_dir, rt, train)

    if (run_dir / "cluster" / "summary.json").is_file():
        cluster = json.loads((run_dir / "cluster" / "summary.json").read_text())
        log(rt, "cluster: complete, skipped")
    else:
        cluster = run_cluster(cfg, run_dir, rt, train)
    log(rt, f"cluster: K={cluster['k']} NMI {cluster['nmi']:.3f}, image-level Hungarian accuracy "
            f"{100 * cluster['hungarian_accuracy']:.1f}%")

    sweep_file = run_dir / "sweep_tau.json"
    if "sweep" in cfg["label"] and cfg["label"]["sweep"]:
        if sweep_file.is_file():
            summary = json.loads(sweep_file.read_text())
        else:
            label_split(cfg, run_dir, rt, "validation", 0.0, save_attention=True)
            summary = run_sweep(cfg, run_dir, progress=rt.is_main) if rt.is_main else None
            rt.barrier()
            summary = json.loads(sweep_file.read_text())
        cfg["label"]["tau"] = summary["best_tau"]
        if rt.is_main:
            print(format_sweep(summary))
            report_attention_foreground(cfg, run_dir, rt, summary["best_tau"])
    tau = float(cfg["label"]["tau"])
    log(rt, f"label train: tau {tau:.3f}")
    label_split(cfg, run_dir, rt, "train", tau, save_attention=False)

    if StageCheckpoint(run_dir, "finetune", rt, cfg).is_done():
        log(rt, "finetune: complete, skipped")
    else:
        log(rt, f"finetune: {cfg['finetune']['epochs']} epochs on the pseudo-labelled train images")
        finetune(cfg, run_dir, rt)

    from lusscore.stages.infer import load_segmentation_model
    model = load_segmentation_model(cfg, run_dir, rt)
    predict_split(model, ds.segmentation_samples("validation"), run_dir / "predictions" / "validation",
                  rt, resize=cfg.get("infer", {}).get("resize", 256))
    return evaluate_predictions(cfg, run_dir, rt)


def add_arguments(parser):
    parser.add_argument("config", help="YAML file or packaged config name (demo, imagenet_s50, ...)")
    parser.add_argument("--run-dir", required=True, help="the run folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")


def main(args):
    run_dir = Path(args.run_dir)
    cfg = apply_overrides(load_config(args.config), args.set)
    rt = setup_runtime(args.device)
    if rt.is_main:
        save_config(run_dir / RUN_CONFIG, cfg)
    seed_everything(int(cfg.get("seed", 0)), rt.rank)
    run_pipeline(cfg, run_dir, rt)
