"""Run lusscore end to end on the embedded default: the synthetic ImageNet-S dataset.

Generates the dataset (or reuses it when already complete) and runs every stage that is
available, printing what each produced.
"""
import json
from pathlib import Path

import lusscore
from lusscore.data import ImageNetS
from lusscore.data.synthetic import SynthConfig, generate_dataset
from lusscore.stages.synth import print_summary


def add_arguments(parser):
    parser.add_argument("--out", default="luss-demo", help="run folder (default: ./luss-demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="parallel data writers")


def main(args):
    out = Path(args.out)
    print("lusscore", json.dumps(lusscore.build_info()))
    data_root = out / "data"
    summary = generate_dataset(data_root, SynthConfig(seed=args.seed), workers=args.workers)
    print_summary(data_root, summary)
    dataset = ImageNetS(data_root)
    train = dataset.image_samples("train")
    val = dataset.segmentation_samples("validation")
    semi = dataset.segmentation_samples("train-semi")
    print(f"dataset check: {dataset.num_classes} classes, {len(train)} train images, "
          f"{len(semi)} train-semi and {len(val)} validation images with labels")
