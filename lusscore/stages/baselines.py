"""Trivial "no learning" floors of a labelled split, scored with the project's evaluator.

colour_kmeans (K + 1 RGB clusters, the border's cluster = 'other'), centre_disc (a centred
disc of radius 0.3 x the shorter side with one random id per image) and all_other (every
pixel 0), each matched (Hungarian by default) and scored like a prediction. Prints one
`floor <name>` row each and writes every number to --out (baselines.json).
"""
from __future__ import annotations

import os

from lusscore.baselines import MATCHES, compute_baselines, format_floors, read_baselines, write_baselines
from lusscore.stages.evaluate import eval_device, scored_splits
from lusscore.utils import LusscoreError


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="dataset root in the ImageNet-S layout")
    parser.add_argument("--split", default="validation",
                        help="a split with GT labels: validation, train-semi or test")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="K (default: the root's categories.txt)")
    parser.add_argument("--out", default="baselines.json", help="JSON result (baselines.json)")
    parser.add_argument("--seed", type=int, default=0, help="pixel subsample, k-means, disc ids")
    parser.add_argument("--match", default="hungarian", choices=MATCHES,
                        help="matching of predicted to GT ids (hungarian)")
    parser.add_argument("--work-dir", default=None,
                        help="keep the floors' prediction PNGs here (default: a temporary folder)")
    parser.add_argument("--max-pixels", type=int, default=200_000,
                        help="pixels the colour k-means is fit on (200000)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="PNG decoding processes of the evaluator (0: in this process)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args) -> int:
    from lusscore.data import ImageNetS

    if args.num_classes is not None and args.num_classes < 1:
        raise LusscoreError(f"--num-classes must be >= 1, got {args.num_classes}")
    dataset = ImageNetS(args.data, num_classes=args.num_classes)  # names a missing root
    result = compute_baselines(dataset, args.split, seed=args.seed, match=args.match,
                               device=args.device, workers=args.workers, work_dir=args.work_dir,
                               quiet=args.quiet, max_pixels=args.max_pixels)
    write_baselines(args.out, result)
    print(f"floors on {args.split} ({result['num_images']} images, {result['num_classes']} classes)")
    print(format_floors(result))
    print(f"wrote {args.out}")
    return 0


def baselines_step(ctx) -> dict:
    """`luss run`'s floors of every scored split, {split: baselines} on the main process ({}
    elsewhere): computed once into <run>/baselines.json and <run>/test/baselines.json."""
    floors = {}
    if ctx.rt.is_main:
        for split in scored_splits(ctx.dataset):
            path = ctx.run.baselines(split)
            if path.is_file():
                floors[split] = read_baselines(path)
                continue
            ctx.log(f"baselines: trivial floors on {split}")
            floors[split] = compute_baselines(ctx.dataset, split, seed=ctx.seed,
                                              device=eval_device(ctx.rt))
            write_baselines(path, floors[split])
    ctx.rt.barrier()
    return floors
