"""Choose tau on validation: evaluate the pseudo labels for tau from MIN to MAX by STEP.

Reads <run>/labels/validation (labels written without a tau, with their mean-attention
.npy) and the GT once; each tau zeroes the pixels whose mean attention (upsampled to the
image) is below it and gets its own Hungarian matching. Prints the table, saves
<run>/sweep_tau.json and sweep_tau.png (mIoU and F-measure vs tau) and writes the best tau
into the run's config.yaml (label.tau).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lusscore.config import save_config
from lusscore.data.label_io import read_label_png
from lusscore.diagnostics import attention_foreground, format_foreground
from lusscore.metrics import ThresholdSweep
from lusscore.ops.switch import ops_from_config
from lusscore.stages.common import (RunDir, StageContext, add_run_arguments, record_step,
                                    resolve_config, start_run)
from lusscore.stages.evaluate import json_ready
from lusscore.stages.label import label_split
from lusscore.utils import LusscoreError, atomic_path, atomic_write_text, progress_bar


def thresholds(lo: float, hi: float, step: float) -> list[float]:
    if step <= 0 or hi < lo:
        raise LusscoreError(f"the tau sweep needs MIN <= MAX and STEP > 0, got {lo}, {hi}, {step}")
    n = int(np.floor((hi - lo) / step + 1e-9)) + 1
    return [round(lo + i * step, 10) for i in range(n)]


def sweep(samples, labels_dir: Path, num_classes: int, taus: list[float], progress=True) -> dict:
    acc = ThresholdSweep(num_classes, taus)
    for s in progress_bar(samples, desc="sweep-tau", unit="img", disable=not progress):
        label_path = labels_dir / s.name
        gt = read_label_png(s.label)
        pred = read_label_png(label_path, expected_size=gt.shape)
        npy = label_path.with_suffix(".npy")
        if not npy.is_file():
            raise FileNotFoundError(f"mean-attention map not found: {npy} (label validation with "
                                    "--save-attention)")
        att = torch.from_numpy(np.load(npy))[None, None].float()
        conf = F.interpolate(att, size=gt.shape, mode="bilinear", align_corners=False)[0, 0]
        acc.update(pred, gt, conf, names=[s.name])
    return acc.compute("hungarian")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    taus = result["thresholds"]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(taus, [r["mIoU"] for r in result["results"]], "o-", label="mIoU")
    ax.plot(taus, [r["FMeasure"] for r in result["results"]], "s--", label="F-measure")
    ax.axvline(result["best_threshold"], color="gray", lw=0.8)
    ax.set_xlabel("tau (mean attention threshold)")
    ax.set_ylabel("%")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


@ops_from_config
def run_sweep(ctx: StageContext) -> dict:
    """Score the unmasked validation labels at every tau of label.sweep; the best tau into
    the run's config (record_tau), the table into <run>/sweep_tau.json (main process only)."""
    cfg = ctx.cfg
    lo, hi, step = cfg["label"]["sweep"]
    taus = thresholds(lo, hi, step)
    ds = ctx.dataset
    result = sweep(ds.segmentation_samples("validation"), ctx.run.labels("validation"),
                   ds.num_classes, taus, ctx.rt.is_main)
    table = [{"tau": t, "mIoU": r["mIoU"], "FMeasure": r["FMeasure"]}
             for t, r in zip(result["thresholds"], result["results"])]
    summary = {"best_tau": result["best_threshold"], "best": {k: result["best"][k] for k in
               ("mIoU", "mBIoU", "Acc", "FMeasure")}, "table": table}
    plot(result, ctx.run.sweep_plot)
    record_tau(ctx.run, cfg, summary)
    atomic_write_text(ctx.run.sweep, json.dumps(summary, indent=1))  # marks the sweep done
    record_step(ctx, "sweep_tau")
    return summary


def record_tau(run: RunDir, cfg: dict, summary: dict) -> float:
    """The one writer of label.tau: the sweep's best tau into cfg and the run's config.yaml
    (where `luss label --run-dir` and every later stage read it)."""
    cfg["label"]["tau"] = summary["best_tau"]
    save_config(run.config, cfg)
    return float(summary["best_tau"])


def report_attention_foreground(ctx: StageContext, tau: float) -> dict:
    """Score the validation mask maps (the attention, or the shape prior that replaces it)
    against GT foreground; <run>/attention_score.json."""
    scores = attention_foreground(ctx.dataset.segmentation_samples("validation"),
                                  ctx.run.labels("validation"), tau)
    atomic_write_text(ctx.run.attention_score, json.dumps(json_ready(scores), indent=1))
    lcfg = ctx.cfg["label"]
    prior = lcfg["prior"] != "none" and lcfg["prior_mask"]
    ctx.log(format_foreground(scores, f"prior ({lcfg['prior']})" if prior else "attention"))
    return scores


def sweep_step(ctx: StageContext) -> float:
    """`luss run`'s choice of tau on validation: label validation unmasked (with attention
    maps), sweep, score the attention; skipped when the sweep is complete. -> the tau that
    the train labels use (the config's own when label.sweep is off)."""
    if ctx.cfg["label"]["sweep"]:
        if ctx.run.sweep_done():
            summary = json.loads(ctx.run.sweep.read_text())
            if ctx.rt.is_main:  # the run's config.yaml was rewritten at start: the tau again
                record_tau(ctx.run, ctx.cfg, summary)
            ctx.cfg["label"]["tau"] = summary["best_tau"]
        else:
            label_split(ctx, "validation", 0.0, save_attention=True)
            if ctx.rt.is_main:
                run_sweep(ctx)
            ctx.rt.barrier()
            summary = json.loads(ctx.run.sweep.read_text())
            ctx.cfg["label"]["tau"] = summary["best_tau"]  # the other ranks read what main wrote
        if ctx.rt.is_main:
            print(format_sweep(summary))
            report_attention_foreground(ctx, summary["best_tau"])
    return float(ctx.cfg["label"]["tau"])


def format_sweep(summary: dict) -> str:
    rows = [f"{'tau':>6} {'mIoU':>7} {'F':>7}"]
    rows += [f"{r['tau']:6.3f} {r['mIoU']:7.2f} {r['FMeasure']:7.2f}" for r in summary["table"]]
    rows.append(f"best tau {summary['best_tau']:.3f}: pseudo-label mIoU {summary['best']['mIoU']:.2f}")
    return "\n".join(rows)


def add_arguments(parser):
    add_run_arguments(parser)
    parser.add_argument("--range", nargs=3, type=float, metavar=("MIN", "MAX", "STEP"),
                        help="the taus to try (default: the config's label.sweep)")


def main(args):
    cfg = resolve_config(args.run_dir, args.config, args.set)
    if args.range is not None:
        cfg["label"]["sweep"] = list(args.range)
    ctx = start_run(args, cfg)
    if ctx.rt.is_main:
        print(format_sweep(run_sweep(ctx)))
