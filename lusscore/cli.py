"""`luss`: the command line of lusscore. One sub-command per stage."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from lusscore.utils import LusscoreError

# name -> (module with add_arguments(parser) and main(args) -> int | None, one-line help).
# A module is imported only when its command runs, so `luss --help` stays instant.
COMMANDS = {
    "info": ("lusscore.stages.info", "print how lusscore was built and whether a GPU is usable"),
    "synth": ("lusscore.stages.synth", "write a synthetic dataset in the ImageNet-S layout"),
    "demo": ("lusscore.stages.demo", "run every stage on the embedded synthetic dataset"),
    "pretrain": ("lusscore.stages.pretrain",
                 "learn representations: SwAV (or PixPro: PASS_p) + P2P + D2S"),
    "attention": ("lusscore.stages.attention", "train the pixel attention on a frozen backbone"),
    "cluster": ("lusscore.stages.cluster", "k-means of attention-pooled image features -> centroids"),
    "label": ("lusscore.stages.label", "pixel pseudo-labels from the attention model and centroids"),
    "saliency": ("lusscore.stages.saliency",
                 "shape-prior saliency maps of a split (region contrast), scored against GT"),
    "sweep-tau": ("lusscore.stages.sweep_tau", "choose tau on validation (pseudo-label mIoU vs tau)"),
    "finetune": ("lusscore.stages.finetune", "fine-tune backbone + (K+1)-way head on pseudo labels"),
    "infer": ("lusscore.stages.infer", "predict a split's label maps with the fine-tuned model"),
    "run": ("lusscore.stages.run", "run every stage of a config in order, skipping completed ones"),
    "ablate": ("lusscore.stages.ablate", "run named variants of a config (an ablation table) side by side"),
    "evaluate": ("lusscore.stages.evaluate", "ImageNet-S metrics of prediction PNGs (official numbers)"),
    "baselines": ("lusscore.stages.baselines",
                  "trivial floors (colour k-means, centre disc, all 'other') scored on a split"),
    "report": ("lusscore.stages.report", "one HTML page with figures of a finished run folder"),
    "semi": ("lusscore.stages.semi", "semi-supervised protocol: fine-tune on train-semi GT, evaluate"),
    "distance-match": ("lusscore.stages.distance_match",
                       "distance-matching protocol: kNN to train-semi regions, evaluate"),
    "hp": ("lusscore.stages.hp", "HP (hidden positives) on the run's frozen backbone, evaluate"),
    "cross-eval": ("lusscore.stages.cross_eval",
                   "score a run on another ImageNet-S subset (e.g. S919 on S50: the paper's Tab 6)"),
    "submit": ("lusscore.stages.submit", "zip a run's test predictions for the ImageNet-S test server"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return ("usage: luss COMMAND [options]   (luss COMMAND --help for its options)\n\n"
            "lusscore: large-scale unsupervised semantic segmentation (PASS)\n\n"
            f"commands:\n{rows}\n")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        print(f"luss: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"luss {name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    if not any("--quiet" in action.option_strings for action in parser._actions):
        parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv[1:])
    before = os.environ.get("TQDM_DISABLE")
    if args.quiet:  # every progress bar of the command (lusscore.utils.progress_bar)
        os.environ["TQDM_DISABLE"] = "1"
    try:
        return module.main(args) or 0
    except (LusscoreError, OSError) as e:  # bad input, or a file that cannot be read or written
        print(f"luss {name}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


if __name__ == "__main__":
    sys.exit(main())
