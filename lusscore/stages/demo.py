"""Run PASS end to end on the embedded default: the synthetic ImageNet-S-format dataset.

Generates the dataset (reused when already complete), runs every stage with the demo
config (`luss run demo`), prints the ImageNet-S metric table, saves a picture of a few
validation images (image, GT, pseudo label, prediction and mean attention) and writes the
run's report page (<out>/report/index.html, see `luss report`).
"""
import json
import time
from argparse import Namespace
from pathlib import Path

import lusscore
from lusscore.config import apply_overrides, load_config
from lusscore.data.synthetic import SynthConfig, generate_dataset
from lusscore.report import save_picture, write_report
from lusscore.stages.common import open_run
from lusscore.stages.run import run_pipeline
from lusscore.stages.synth import print_summary


def add_arguments(parser):
    parser.add_argument("--out", default="luss-demo", help="run folder (default: ./luss-demo)")
    parser.add_argument("--seed", type=int, default=0, help="dataset and training seed")
    parser.add_argument("--workers", type=int, default=2, help="parallel dataset writers")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the demo config (repeatable)")


def main(args):
    start = time.time()
    out = Path(args.out)
    print("lusscore", json.dumps(lusscore.build_info()))
    data_root = out / "data"
    summary = generate_dataset(data_root, SynthConfig(seed=args.seed), workers=args.workers)
    print_summary(data_root, summary)
    cfg = apply_overrides(load_config("demo"), [f"data.root={data_root}", f"seed={args.seed}"] + args.set)
    ctx = open_run(Namespace(run_dir=out, device=args.device), cfg)
    result = run_pipeline(ctx)
    if ctx.rt.is_main:
        run = ctx.run
        sweep = json.loads(run.sweep.read_text())
        match = {int(k): int(v) for k, v in result["match"].items()}
        predictions = [("prediction", run.predictions("unsupervised", "validation"), match)]
        save_picture(out, ctx.dataset, predictions, sweep["best_tau"], run.demo_picture,
                     pseudo_match=match)
        print(f"pseudo-label mIoU (validation, tau {sweep['best_tau']:.2f}): {sweep['best']['mIoU']:.2f}; "
              f"after fine-tuning: {result['mIoU']:.2f}")
        print(f"demo finished in {(time.time() - start) / 60:.1f} min: metrics "
              f"{run.metrics('unsupervised')}, picture {run.demo_picture}")
        print(f"report: {write_report(out)}")
