"""Write a synthetic dataset in the ImageNet-S layout (deterministic for a seed).

K object classes that differ in shape and texture only (every colour is drawn from one
palette, independently of the class) on a shared cluttered background, all four object-size
buckets, some multi-class images, ignore bands along some borders, and a held-out test split
with GT.
"""
from lusscore.data.synthetic import SynthConfig, generate_dataset

DEFAULTS = SynthConfig()


def add_arguments(parser):
    parser.add_argument("out", help="output folder (the dataset root)")
    parser.add_argument("--classes", type=int, default=DEFAULTS.classes, help="object classes K")
    parser.add_argument("--train-per-class", type=int, default=DEFAULTS.train_per_class)
    parser.add_argument("--val-per-class", type=int, default=DEFAULTS.val_per_class)
    parser.add_argument("--semi-per-class", type=int, default=DEFAULTS.semi_per_class)
    parser.add_argument("--test-per-class", type=int, default=DEFAULTS.test_per_class,
                        help="held-out test images per class (0: no test split)")
    parser.add_argument("--size", type=int, default=DEFAULTS.size, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--workers", type=int, default=1, help="parallel writer processes")


def config_from_args(args) -> SynthConfig:
    return SynthConfig(classes=args.classes, train_per_class=args.train_per_class,
                       val_per_class=args.val_per_class, semi_per_class=args.semi_per_class,
                       test_per_class=args.test_per_class, size=args.size, seed=args.seed)


def main(args):
    summary = generate_dataset(args.out, config_from_args(args), workers=args.workers)
    print_summary(args.out, summary)


def print_summary(root, summary):
    counts = summary.get("counts", {})
    print(f"synthetic ImageNet-S dataset at {root}: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
