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

from lusscore.config import apply_overrides, load_config
from lusscore.ops.switch import ops_from_config
# The stages as modules, their functions looked up when called (so a test can replace one).
from lusscore.stages import (attention, baselines, cluster, distance_match, finetune, hp, infer,
                             label, pretrain, semi, sweep_tau)
from lusscore.stages.common import (PROTOCOLS, STEPS, RunDir, StageContext, StageTimings, open_run,
                                    redo_from, train_stage)
from lusscore.stages.layout import SWITCHES
from lusscore.stages.evaluate import (evaluate_protocol, format_protocols, json_ready, run_splits,
                                      scored_splits, skipped_test_reason, summarize)
from lusscore.utils import LusscoreError, atomic_write_text


def protocol_list(cfg: dict) -> list[str]:
    """The config's `protocols` (default: the unsupervised one only), checked."""
    listed = cfg["protocols"]
    if isinstance(listed, str):
        listed = [listed]
    unknown = [p for p in listed or [] if p not in PROTOCOLS]
    if unknown or not listed:
        raise LusscoreError(f"protocols must be a non-empty subset of {list(PROTOCOLS)}, got {listed}")
    return [p for p in PROTOCOLS if p in listed]


def run_unsupervised(ctx: StageContext, timings: StageTimings) -> dict:
    """Every unsupervised stage; returns {split: result} for validation and, when scored, test."""
    train_stage(ctx, "attention", attention.train_attention)
    timings.lap("attention")
    cluster.cluster_step(ctx)
    timings.lap("cluster")
    tau = sweep_tau.sweep_step(ctx)
    timings.lap("sweep_tau")  # labelling validation with attention maps + the tau sweep
    if ctx.cfg["finetune"]["enabled"]:
        ctx.log(f"label train: tau {tau:.3f}")
        label.label_split(ctx, "train", tau, save_attention=False)
        timings.lap("label")
        train_stage(ctx, "finetune", finetune.finetune)
        timings.lap("finetune")
        infer.predict_protocol(ctx, infer.load_segmentation_model(ctx), "unsupervised")
    else:
        ctx.log(f"finetune.enabled false: the pseudo labels (tau {tau:.3f}) are the predictions")
        infer.predict_with_pseudo_labels(ctx, tau)
    timings.lap("infer")
    results = {split: evaluate_protocol(ctx, "unsupervised", split)
               for split in scored_splits(ctx.dataset)}  # validation first: test reuses its match
    timings.lap("evaluate")
    return results


def protocol_runner(protocol: str):
    """run(ctx, split) of a protocol that needs only the pretrained backbone."""
    return {"semi": semi.run_semi, "distance_match": distance_match.run_distance_match,
            "hp": hp.run_hp, "hp_linear": hp.run_hp_linear}[protocol]


def run_protocol(ctx: StageContext, protocol: str) -> dict:
    """semi, distance_match or hp on validation, then test (evaluate.run_splits)."""
    return run_splits(ctx, protocol, protocol_runner(protocol))


@ops_from_config
def run_pipeline(ctx: StageContext) -> dict:
    """Pretrain, then every listed protocol, then the floors; returns the unsupervised
    validation result (or the first listed protocol's). Writes <run>/protocols.json and
    prints the side-by-side table of validation and test."""
    protocols = protocol_list(ctx.cfg)
    timings = StageTimings(ctx)
    train_stage(ctx, "pretrain", pretrain.pretrain)
    timings.lap("pretrain")
    results = {}
    for protocol in protocols:
        if protocol == "unsupervised":
            results[protocol] = run_unsupervised(ctx, timings)
        else:
            results[protocol] = run_protocol(ctx, protocol)
            timings.lap(protocol)
    floors = baselines.baselines_step(ctx)
    timings.lap("baselines")
    summary = {p: summarize(p, r) for p, r in results.items()}
    if ctx.rt.is_main:
        atomic_write_text(ctx.run.protocols_summary, json.dumps(json_ready(summary), indent=1))
        skipped = skipped_test_reason(ctx.dataset)
        if skipped:
            ctx.log(skipped)
        print(format_protocols(summary, floors), flush=True)
    return results[protocols[0]]["validation"]


def add_arguments(parser):
    parser.epilog = SWITCHES
    parser.add_argument("config", help="YAML file or packaged config name (demo, imagenet_s50, ...)")
    parser.add_argument("--run-dir", required=True, help="the run folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--redo-from", default=None, metavar="STEP", choices=list(STEPS),
                        help="remove the outputs of STEP and of every step after it, then run "
                             f"(to change their settings in this run folder): {', '.join(STEPS)}")


def main(args):
    cfg = apply_overrides(load_config(args.config), args.set)
    if args.redo_from is not None:
        redone = redo_from(RunDir(args.run_dir), args.redo_from)
        print(f"[luss run] redo: removed the outputs of {', '.join(redone)}", flush=True)
    run_pipeline(open_run(args, cfg))
