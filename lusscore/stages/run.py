"""Run every PASS stage in order, skipping the ones already complete (resumable).

pretrain -> attention -> cluster -> label validation (with attention maps) -> sweep tau
-> label train (best tau) -> finetune -> infer validation -> evaluate (Hungarian matching).
Everything lands in the run folder; the final metrics in <run>/metrics.json, the match in
<run>/match.json.

Every choice (tau, the match, ...) is made on validation. When the dataset has test images,
each protocol then predicts them too and, when test GT exists, scores them once with what
validation chose (the unsupervised protocol with validation's match.json, never re-matched):
<run>[/semi | /distance_match]/test/metrics.json. Without test images or test GT, one line
says why test is not scored and the run reports validation.

The config's `protocols` (a subset of unsupervised, semi, distance_match; default
unsupervised) picks the evaluation protocols run after pretraining: semi (`luss semi`:
<run>/semi/metrics.json) and distance_match (`luss distance-match`:
<run>/distance_match/metrics.json) need only the pretrained backbone. A protocol whose
metrics.json exists is skipped. The side-by-side summary (validation and test) goes to
<run>/protocols.json.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from lusscore.config import apply_overrides, load_config, save_config
from lusscore.engine import Runtime, StageCheckpoint, seed_everything, setup_runtime
from lusscore.ops.switch import ops_from_config, ops_mode
from lusscore.stages.common import (
    PROTOCOLS,
    RUN_CONFIG,
    baselines_path,
    dataset_of,
    match_path,
    predictions_dir,
    protocol_metrics_path,
)
from lusscore.utils import LusscoreError, atomic_write_text


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


def eval_device(rt: Runtime) -> str:
    """Where scoring runs: the run's GPU, else the CPU."""
    return str(rt.device) if rt.device.type == "cuda" else "cpu"


def evaluate_predictions(cfg: dict, run_dir: Path, rt: Runtime, pred_dir: Path | None = None,
                         out_dir: Path | None = None, match: str = "hungarian",
                         split: str = "validation", workers: int = 0) -> dict:
    """Evaluate a protocol's predictions of a split with GT (default: the unsupervised
    validation ones) and write out_dir/metrics.json, plus out_dir/match.json when the match
    is found here (match="hungarian"; a match.json path is applied as it is)."""
    from lusscore.stages.evaluate import evaluate, format_table
    ds = dataset_of(cfg)
    names = ds.names_path(split)
    pred_dir = Path(pred_dir) if pred_dir is not None else predictions_dir(run_dir, "unsupervised", split)
    out_dir = (Path(out_dir) if out_dir is not None
               else protocol_metrics_path(run_dir, "unsupervised", split).parent)
    result = evaluate(ds.labels_dir(split), pred_dir,
                      ds.num_classes, names=names if names.is_file() else None, match=match,
                      device=eval_device(rt), workers=workers)
    if rt.is_main:
        if match == "hungarian":
            match_ids = {str(k): int(v) for k, v in result["match"].items()}
            atomic_write_text(out_dir / "match.json", json.dumps(match_ids, indent=1))
        atomic_write_text(out_dir / "metrics.json", json.dumps(_plain(result), indent=1))
        print(f"{split}:")
        print(format_table(result, ["other"] + ds.wnids))
    return result


def protocol_match(cfg: dict, run_dir: Path, protocol: str, split: str) -> str:
    """The match a protocol's split is scored with: none (semi; distance_match by default) or,
    when the protocol matches, the Hungarian match found on validation, which test reuses
    from its match.json."""
    if protocol == "semi":
        return "none"
    if protocol == "distance_match":
        from lusscore.stages.distance_match import settings
        matched = settings(cfg)["match"] == "hungarian"
    else:
        matched = True
    if not matched:
        return "none"
    if split == "validation":
        return "hungarian"
    path = match_path(run_dir, protocol)
    if not path.is_file():
        raise LusscoreError(f"{path} not found: the {split} split reuses the match found on "
                            "validation; evaluate validation first")
    return str(path)


def evaluate_protocol(cfg: dict, run_dir: Path, rt: Runtime, protocol: str,
                      split: str = "validation", workers: int = 0) -> dict:
    """Score a protocol's predictions of a split into its metrics.json (see common.py)."""
    return evaluate_predictions(cfg, run_dir, rt, pred_dir=predictions_dir(run_dir, protocol, split),
                                out_dir=protocol_metrics_path(run_dir, protocol, split).parent,
                                match=protocol_match(cfg, run_dir, protocol, split), split=split,
                                workers=workers)


def skipped_test_reason(ds) -> str | None:
    """None when test can be scored, else the one line saying why it is not."""
    if not ds.has_images("test"):
        return (f"test: no test images in {ds.split_dir('test')}; test evaluation skipped, "
                "validation results only")
    if not ds.has_labels("test"):
        return (f"test: images but no GT in {ds.labels_dir('test')}; test predicted, test "
                "evaluation skipped (`luss submit` packs the predictions for the test server)")
    return None


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


TIMINGS = "timings.json"


class StageTimings:
    """Wall seconds of each stage of one `luss run` (GPU work finished), printed and written
    to <run>/timings.json after every stage with this process's peak GPU memory per stage;
    a stage skipped as complete takes ~0 s."""

    def __init__(self, run_dir: Path, rt: Runtime):
        self.path, self.rt = Path(run_dir) / TIMINGS, rt
        self.stages: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}
        self.start = self.last = self._now()
        if rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(rt.device)

    def _now(self) -> float:
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize(self.rt.device)
        return time.perf_counter()

    def lap(self, stage: str) -> None:
        now = self._now()
        self.stages[stage] = now - self.last
        self.last = now
        memory = ""
        if self.rt.device.type == "cuda":
            self.peak_bytes[stage] = torch.cuda.max_memory_allocated(self.rt.device)
            torch.cuda.reset_peak_memory_stats(self.rt.device)
            memory = f", peak GPU memory {self.peak_bytes[stage] / 2**30:.2f} GiB"
        log(self.rt, f"{stage}: {self.stages[stage]:.1f} s{memory}")
        if self.rt.is_main:
            atomic_write_text(self.path, json.dumps(
                {"ops": ops_mode(), "device": str(self.rt.device), "world_size": self.rt.world_size,
                 "stages_s": self.stages, "total_s": now - self.start,
                 "peak_gpu_bytes": self.peak_bytes}, indent=1))


SUMMARY_KEYS = ("mIoU", "mBIoU", "Acc", "FMeasure", "S", "MS", "ML", "L")
NAME_WIDTH = 20  # first column of the protocol table: fits 'floor colour_kmeans'


def protocol_list(cfg: dict) -> list[str]:
    """The config's `protocols` (default: the unsupervised one only), checked."""
    listed = cfg.get("protocols", ["unsupervised"])
    if isinstance(listed, str):
        listed = [listed]
    unknown = [p for p in listed or [] if p not in PROTOCOLS]
    if unknown or not listed:
        raise LusscoreError(f"protocols must be a non-empty subset of {list(PROTOCOLS)}, got {listed}")
    return [p for p in PROTOCOLS if p in listed]


def summarize(protocol: str, results: dict) -> dict:
    """{validation's numbers..., match, metrics, "test": the same for test, or None when test
    was not scored}; results: {split: evaluation result}."""
    def one(split: str) -> dict:
        result = results[split]
        out = {k: result.get(k) for k in SUMMARY_KEYS}
        # test never gets a match of its own: a matched protocol reuses validation's
        out["match"] = ("none" if result.get("match") is None
                        else "hungarian" if split == "validation" else "validation")
        out["metrics"] = protocol_metrics_path(Path(""), protocol, split).as_posix()
        return out
    out = one("validation")
    out["test"] = one("test") if "test" in results else None
    return _plain(out)


def format_protocols(summary: dict, floors: dict | None = None) -> str:
    """The protocols' validation and test numbers side by side, then one `floor` row per
    trivial baseline (floors: {split: baselines.json content}) in the same columns."""
    keys = ("mIoU", "mBIoU", "Acc", "FMeasure")
    fmt = lambda v: "nan" if v is None else f"{v:.2f}"
    cells = lambda m: " ".join(f"{fmt(m[k]) if m else '-':>7}" for k in keys)
    heads = " ".join(f"{k[:5] if k != 'FMeasure' else 'F':>7}" for k in keys)
    lines = [f"{'':<{NAME_WIDTH}} {'validation (tuned)':^31}   {'test (untouched)':^31}",
             f"{'protocol':<{NAME_WIDTH}} {heads}   {heads}  match"]
    for name, m in summary.items():
        match = "hungarian on validation" if m["match"] == "hungarian" else m["match"]
        lines.append(f"{name:<{NAME_WIDTH}} {cells(m)}   {cells(m.get('test'))}  {match}")
    floors = floors or {}
    val = floors.get("validation")
    if val is not None:
        test = floors.get("test") or {"floors": {}}
        for name, m in val["floors"].items():
            lines.append(f"{'floor ' + name:<{NAME_WIDTH}} {cells(m)}   "
                         f"{cells(test['floors'].get(name))}  {val['match']}, no learning")
    return "\n".join(lines)


def run_baselines(cfg: dict, run_dir: Path, rt: Runtime) -> dict:
    """The trivial floors of every scored split, {split: baselines} on the main process ({}
    elsewhere): computed once into <run>/baselines.json and <run>/test/baselines.json."""
    from lusscore.baselines import compute_baselines, read_baselines, write_baselines
    floors = {}
    if rt.is_main:
        ds = dataset_of(cfg)
        for split in scored_splits(ds):
            path = baselines_path(run_dir, split)
            if path.is_file():
                floors[split] = read_baselines(path)
                continue
            log(rt, f"baselines: trivial floors on {split}")
            floors[split] = compute_baselines(ds, split, seed=int(cfg.get("seed", 0)),
                                              device=eval_device(rt))
            write_baselines(path, floors[split])
    rt.barrier()
    return floors


def train_stage(cfg: dict, run_dir: Path, rt: Runtime, stage: str, fn, train) -> None:
    """Train one image-level stage (pretrain, attention) unless its checkpoint is complete."""
    if StageCheckpoint(run_dir, stage, rt, cfg).is_done():
        log(rt, f"{stage}: complete, skipped")
    else:
        log(rt, f"{stage}: {cfg[stage]['epochs']} epochs on {len(train)} images")
        fn(cfg, run_dir, rt, train)


def run_unsupervised(cfg: dict, run_dir: Path, rt: Runtime, train, timings: StageTimings) -> dict:
    """Every unsupervised stage; returns {split: result} for validation and, when scored, test."""
    from lusscore.stages.attention import train_attention
    from lusscore.stages.cluster import run_cluster
    from lusscore.stages.finetune import finetune
    from lusscore.stages.infer import predict_split
    from lusscore.stages.sweep_tau import format_sweep, run_sweep

    ds = dataset_of(cfg)
    train_stage(cfg, run_dir, rt, "attention", train_attention, train)
    timings.lap("attention")

    if (run_dir / "cluster" / "summary.json").is_file():
        cluster = json.loads((run_dir / "cluster" / "summary.json").read_text())
        log(rt, "cluster: complete, skipped")
    else:
        cluster = run_cluster(cfg, run_dir, rt, train)
    timings.lap("cluster")
    hue = (f"; NMI vs the object's hue {cluster['nmi_object_hue']:.3f}"
           if "nmi_object_hue" in cluster else "")
    log(rt, f"cluster: K={cluster['k']} NMI {cluster['nmi']:.3f}, image-level Hungarian accuracy "
            f"{100 * cluster['hungarian_accuracy']:.1f}%{hue}")

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
    timings.lap("sweep_tau")  # labelling validation with attention maps + the tau sweep
    tau = float(cfg["label"]["tau"])
    log(rt, f"label train: tau {tau:.3f}")
    label_split(cfg, run_dir, rt, "train", tau, save_attention=False)
    timings.lap("label")

    if StageCheckpoint(run_dir, "finetune", rt, cfg).is_done():
        log(rt, "finetune: complete, skipped")
    else:
        log(rt, f"finetune: {cfg['finetune']['epochs']} epochs on the pseudo-labelled train images")
        finetune(cfg, run_dir, rt)
    timings.lap("finetune")

    from lusscore.stages.infer import load_segmentation_model
    model = load_segmentation_model(cfg, run_dir, rt)
    resize = cfg.get("infer", {}).get("resize", 256)
    for split in prediction_splits(ds):
        predict_split(model, ds.prediction_samples(split),
                      predictions_dir(run_dir, "unsupervised", split), rt, resize=resize)
    timings.lap("infer")
    results = {split: evaluate_protocol(cfg, run_dir, rt, "unsupervised", split)
               for split in scored_splits(ds)}  # validation first: test reuses its match
    timings.lap("evaluate")
    return results


def prediction_splits(ds) -> list[str]:
    """Validation, and test when its images exist (with or without GT)."""
    return ["validation"] + (["test"] if ds.has_images("test") else [])


def scored_splits(ds) -> list[str]:
    return ["validation"] + (["test"] if skipped_test_reason(ds) is None else [])


def run_protocol(cfg: dict, run_dir: Path, rt: Runtime, protocol: str) -> dict:
    """semi or distance_match on validation, then test; a split whose metrics.json exists is
    skipped (its metrics read back). Returns {split: result} of the scored splits."""
    from lusscore.stages.distance_match import run_distance_match
    from lusscore.stages.semi import run_semi
    ds = dataset_of(cfg)
    results = {}
    for split in prediction_splits(ds):
        path = protocol_metrics_path(run_dir, protocol, split)
        if path.is_file():
            log(rt, f"{protocol} {split}: complete ({path}), skipped")
            results[split] = json.loads(path.read_text())
            continue
        if protocol == "semi":
            log(rt, f"semi: {cfg['semi']['epochs']} epochs on the train-semi GT, then validation"
                    if split == "validation" else f"semi: {split} with the trained semi.pt")
            result = run_semi(cfg, run_dir, rt, split)
        else:
            log(rt, f"distance_match: train-semi region bank, kNN on {split} pixels")
            result = run_distance_match(cfg, run_dir, rt, split)
        if result is not None:  # None: a split without GT, predicted only
            log(rt, f"{protocol} {split}: mIoU {result['mIoU']:.2f}")
            results[split] = result
    return results


@ops_from_config
def run_pipeline(cfg: dict, run_dir: Path, rt: Runtime) -> dict:
    """Pretrain, then every listed protocol; returns the unsupervised validation result (or
    the first listed protocol's). Writes <run>/protocols.json and prints the side-by-side
    table of validation and test."""
    from lusscore.stages.pretrain import pretrain

    run_dir = Path(run_dir)
    protocols = protocol_list(cfg)
    ds = dataset_of(cfg)
    train = ds.image_samples("train")
    timings = StageTimings(run_dir, rt)
    train_stage(cfg, run_dir, rt, "pretrain", pretrain, train)
    timings.lap("pretrain")

    results = {}
    for protocol in protocols:
        if protocol == "unsupervised":
            results[protocol] = run_unsupervised(cfg, run_dir, rt, train, timings)
        else:
            results[protocol] = run_protocol(cfg, run_dir, rt, protocol)
            timings.lap(protocol)
    floors = run_baselines(cfg, run_dir, rt)
    timings.lap("baselines")
    summary = {p: summarize(p, r) for p, r in results.items()}
    if rt.is_main:
        atomic_write_text(run_dir / "protocols.json", json.dumps(summary, indent=1))
        skipped = skipped_test_reason(ds)
        if skipped:
            log(rt, skipped)
        print(format_protocols(summary, floors), flush=True)
    return results[protocols[0]]["validation"]


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
