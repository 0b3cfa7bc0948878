"""One page (HTML with PNG figures) of a finished run: <RUN_DIR>/report/index.html.

Metric tables of every protocol run (fully unsupervised, semi-supervised, distance
matching), per-class IoU bars, the tau curve, loss curves of each training stage and a grid
of validation images with GT, pseudo label, predictions and attention.
"""
from lusscore.report import write_report


def add_arguments(parser):
    parser.add_argument("run_dir", help="a finished run folder (luss run / luss demo)")
    parser.add_argument("--rows", type=int, default=6, help="validation images in the grid (6)")
    parser.add_argument("--top", type=int, default=20,
                        help="best and worst classes drawn in the IoU bars when there are more "
                             "than 2 * TOP (20); the page's table lists every class")


def main(args):
    if args.rows < 0 or args.top < 1:
        from lusscore.utils import LusscoreError
        raise LusscoreError(f"--rows must be >= 0 and --top >= 1, got {args.rows} and {args.top}")
    print(write_report(args.run_dir, rows=args.rows, top=args.top))
