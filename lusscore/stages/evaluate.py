"""Evaluate prediction PNGs against ImageNet-S GT with the official metrics.

Reads every map once (PNG decoding in parallel workers), then applies the match (none,
Hungarian on the image-level co-occurrence, or a match.json) and prints the official table:
mIoU, boundary mIoU, Img-Acc, F-measure, and the S/MS/ML/L size buckets.

Two modes: folders (--gt, --pred, --num-classes, --match ...), or a run folder (--run-dir RUN
--split validation|test --protocol unsupervised|semi|distance_match), which takes the GT,
names file and predictions from the run's config and dataset, scores the protocol as `luss
run` does (test with the match found on validation, never re-matched) and writes its
metrics.json.
"""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from lusscore.stages.layout import MATCH_FILE, METRICS_FILE, RunDir
from lusscore.utils import LusscoreError, atomic_write_text, files_under

MAX_LISTED = 20


def add_arguments(parser) -> None:
    from lusscore.stages.common import EVAL_SPLITS, PROTOCOLS
    parser.add_argument("--run-dir", default=None,
                        help="score a run folder's predictions (instead of --gt/--pred/--names/"
                             "--num-classes/--match): writes the protocol's metrics.json")
    parser.add_argument("--split", default=None, choices=EVAL_SPLITS,
                        help="with --run-dir: the split to score (default validation)")
    parser.add_argument("--protocol", default=None, choices=PROTOCOLS,
                        help="with --run-dir: whose predictions (default unsupervised)")
    parser.add_argument("--gt", default=None, help="folder of GT label PNGs (wnid/name.png)")
    parser.add_argument("--pred", default=None, help="folder of prediction PNGs, same layout")
    parser.add_argument("--names", default=None,
                        help="names list: one 'image label' (or 'label') path a line; the label "
                             "column is read under --gt and --pred (default: every PNG under --gt)")
    parser.add_argument("--match", default=None,
                        help="none (default) | hungarian (the official: image-level "
                             "co-occurrence) | hungarian-pixel (HP's and STEGO's: pixel agreement, "
                             "every id 0 included) | FILE.json ({\"pred id\": gt id})")
    parser.add_argument("--num-classes", type=int, default=None, help="C: 50, 300 or 919")
    parser.add_argument("--ignore-index", type=int, default=1000)
    parser.add_argument("--boundary-ratio", type=float, default=0.03)
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    parser.add_argument("--save-match", default=None, help="write the match used as JSON")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="PNG decoding processes (0: decode in this process)")
    parser.add_argument("--missing-as-background", action="store_true",
                        help="treat a missing prediction as all 'other' (0) instead of failing")
    parser.add_argument("--pass-bands", action="store_true",
                        help="PASS's variant: relabel by the match before the boundary bands "
                             "(needs a match file, or a first pass for hungarian)")
    parser.add_argument("--out-of-range", choices=("error", "drop"), default="error",
                        help="without a match, predicted ids outside 0..C: an error naming the "
                             "first file (default), or drop them from the histograms as the "
                             "official evaluator does")
    parser.add_argument("--curve", nargs=3, type=float, metavar=("MIN", "MAX", "STEP"),
                        default=None, help="threshold sweep on confidence maps")
    parser.add_argument("--conf-suffix", default=".npy",
                        help="confidence file beside each prediction: <name><suffix> (.npy)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--ops", choices=("fused", "reference"), default="fused",
                        help="the fused metrics op or its pure-PyTorch reference (a baseline)")


def label_names(gt_dir: Path, names: str | None) -> list[str]:
    if names is None:
        found = sorted(p.relative_to(gt_dir).as_posix() for p in files_under(gt_dir, (".png",)))
        if not found:
            raise LusscoreError(f"{gt_dir}: no GT PNGs found")
        return found
    path = Path(names)
    if not path.is_file():
        raise FileNotFoundError(f"names file not found: {path}")
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2:
            raise LusscoreError(f"{path}:{lineno}: expected 'image label' or 'label', got {line!r}")
        out.append(parts[-1])
    if not out:
        raise LusscoreError(f"{path}: the names list is empty")
    return out


def _load(job):
    """Decode one GT/prediction pair (runs in a worker process)."""
    from lusscore.data.label_io import read_label_png
    gt_path, pred_path, conf_path, missing_ok = job
    gt = read_label_png(gt_path, dtype=np.int32)
    if missing_ok and not os.path.exists(pred_path):
        pred = np.zeros_like(gt)
    else:
        pred = read_label_png(pred_path, dtype=np.int32)
        if pred.shape != gt.shape:
            raise LusscoreError(
                f"{pred_path}: prediction size {pred.shape[0]}x{pred.shape[1]} (HxW) does not "
                f"match the GT {gt_path} size {gt.shape[0]}x{gt.shape[1]}")
    conf = None
    if conf_path is not None:
        if not os.path.exists(conf_path):
            raise FileNotFoundError(f"confidence file not found: {conf_path}")
        conf = np.load(conf_path)
        if conf.shape != gt.shape:
            raise LusscoreError(f"{conf_path}: confidence size {conf.shape} does not match the "
                                f"GT size {gt.shape}")
    return pred, gt, conf


def _evaluate_chunk(task):
    """Decode and accumulate a run of images in a worker process; return the sparse state."""
    import torch
    from lusscore.metrics import SegEvaluator
    jobs, names, num_classes, kwargs = task
    torch.set_num_threads(1)
    ev = SegEvaluator(num_classes, **kwargs)
    for name, job in zip(names, jobs):
        pred, gt, _ = _load(job)
        ev.update(pred, gt, names=[name])
    return ev.state()


def accumulate_in_workers(acc, jobs, names, num_classes, kwargs, workers: int, quiet: bool,
                          chunk: int = 32) -> None:
    """CPU path: workers decode AND run the op, so the metric work scales with --workers."""
    from lusscore.utils import progress_bar
    tasks = [(jobs[i:i + chunk], names[i:i + chunk], num_classes, kwargs)
             for i in range(0, len(jobs), chunk)]
    with progress_bar(total=len(jobs), unit="img", disable=quiet, desc="evaluate") as bar, \
            ProcessPoolExecutor(workers) as pool:
        for state in pool.map(_evaluate_chunk, tasks):  # in order: image indices stay sorted
            acc.merge(state)
            bar.update(state["num_images"])


def read_pairs(jobs, workers: int, quiet: bool):
    """Yield decoded (pred, gt, conf) in order, decoding in `workers` processes."""
    from lusscore.utils import progress_bar
    bar = progress_bar(total=len(jobs), unit="img", disable=quiet, desc="evaluate")
    try:
        if workers <= 0:
            for job in jobs:
                yield _load(job)
                bar.update()
        else:
            with ProcessPoolExecutor(workers) as pool:
                for item in pool.map(_load, jobs, chunksize=8):
                    yield item
                    bar.update()
    finally:
        bar.close()


def format_table(result: dict, classes: list[str] | None = None) -> str:
    fmt = lambda v: "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"  # noqa: E731
    lines = ["per class IoUs:", f"{'class':<12} {'IoU':>8} {'BIoU':>8}"]
    for i, (iou, biou) in enumerate(zip(result["IoUs"], result["BIoUs"])):
        name = classes[i] if classes else ("other" if i == 0 else str(i))
        lines.append(f"{name:<12} {fmt(iou):>8} {fmt(biou):>8}")
    keys = ("Acc", "mIoU", "mBIoU", "FMeasure", "S", "MS", "ML", "L", "BS", "BMS", "BML", "BL")
    lines += ["Summary:", " ".join(f"{k:>9}" for k in keys),
              " ".join(f"{fmt(result[k]):>9}" for k in keys)]
    if "mIoU_without_other" in result:
        lines.append(f"without 'other' (the paper's App. B): mIoU {fmt(result['mIoU_without_other'])}"
                     f"  mBIoU {fmt(result['mBIoU_without_other'])}")
    return "\n".join(lines)


def json_ready(obj):
    """A result as plain JSON: str keys, lists, Python scalars, NaN as null."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def evaluate(gt_dir, pred_dir, num_classes: int, names=None, match="none", device="cpu",
             workers: int = 0, missing_as_background: bool = False, pass_bands: bool = False,
             curve=None, conf_suffix: str = ".npy", ignore_index: int = 1000,
             boundary_ratio: float = 0.03, quiet: bool = True,
             out_of_range: str = "error") -> dict:
    """Evaluate a prediction folder; returns compute()'s dict (or the sweep's).

    out_of_range: what predicted ids outside 0..C do without a match: "error" (they cannot be
    GT ids, so the predictions are not what they claim) or "drop" (scored as the official
    evaluator scores them: dropped from the histograms, foreground for F)."""
    from lusscore.matching import load_match
    from lusscore.metrics import MATCH_MODES, SegEvaluator, ThresholdSweep
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    for d, what in ((gt_dir, "GT"), (pred_dir, "prediction")):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} folder not found: {d}")
    labels = label_names(gt_dir, names)
    missing_gt = [n for n in labels if not (gt_dir / n).is_file()]
    if missing_gt:
        raise FileNotFoundError(f"{len(missing_gt)} GT file(s) missing under {gt_dir}: "
                                + ", ".join(missing_gt[:MAX_LISTED]))
    missing = [n for n in labels if not (pred_dir / n).is_file()]
    if missing and not missing_as_background:
        raise FileNotFoundError(
            f"{len(missing)} prediction file(s) missing under {pred_dir}: "
            + ", ".join(missing[:MAX_LISTED]) + (" ..." if len(missing) > MAX_LISTED else "")
            + " (use --missing-as-background to score them as all 'other')")
    match_arg = match
    if match in (None, "none"):
        match_arg = None
    elif match not in MATCH_MODES:
        match_arg = load_match(match)
    lut = None
    if pass_bands:
        if match_arg is None:
            raise LusscoreError("--pass-bands needs a match (hungarian or a file)")
        if match_arg in MATCH_MODES:  # PASS: a first pass finds the match, then bands follow it
            first = evaluate(gt_dir, pred_dir, num_classes, names, match_arg, device, workers,
                             missing_as_background, False, None, conf_suffix, ignore_index,
                             boundary_ratio, quiet, out_of_range)
            match_arg = {int(k): v for k, v in first["match"].items()}
        lut, used_match = match_arg, match_arg
        match_arg = None
    kwargs = dict(ignore_index=ignore_index, boundary_ratio=boundary_ratio, device=device,
                  pred_lut=lut)
    conf_of = None
    if curve is not None:
        lo, hi, step = curve
        if step <= 0 or hi < lo:
            raise LusscoreError(f"--curve needs MIN <= MAX and STEP > 0, got {curve}")
        thresholds = [round(lo + i * step, 10) for i in range(int(math.floor((hi - lo) / step + 1e-9)) + 1)]
        acc = ThresholdSweep(num_classes, thresholds, **kwargs)
        conf_of = lambda n: str(pred_dir / (n[:-4] if n.endswith(".png") else n)) + conf_suffix  # noqa: E731
    else:
        acc = SegEvaluator(num_classes, **kwargs)
    jobs = [(str(gt_dir / n), str(pred_dir / n), conf_of(n) if conf_of else None,
             missing_as_background) for n in labels]
    if workers > 0 and curve is None and str(device) == "cpu":
        accumulate_in_workers(acc, jobs, labels, num_classes, kwargs, workers, quiet)
        pairs = []
    else:
        pairs = zip(labels, read_pairs(jobs, workers, quiet))
    for name, (pred, gt, conf) in pairs:
        if conf is None:
            acc.update(pred, gt, names=[name])
        else:
            acc.update(pred, gt, conf, names=[name])
    result = acc.compute(match_arg)
    if lut is not None:
        for r in ([result] if curve is None else result["results"]):
            r["match"] = used_match
    result["missing_predictions"] = missing
    best = result["best"] if curve is not None else result
    # A predicted ignore id copies the GT's ignore regions (it scores in the boundary bands).
    ids = [i for i in best.get("out_of_range_ids", []) if i != ignore_index]
    if match_arg is None and lut is None and ids:
        first = _first_out_of_range(pred_dir, labels, num_classes, ignore_index)
        if out_of_range == "error":
            raise LusscoreError(
                f"predicted ids outside 0..{num_classes}: {ids[:MAX_LISTED]}"
                + (" ..." if len(ids) > MAX_LISTED else "") + f", first in {first}; without a "
                "match the predictions must be GT ids (give --match hungarian for cluster ids, "
                "or --out-of-range drop to score them as the official evaluator does)")
        best["out_of_range_first"] = first
    conf = (acc if curve is None else acc.evaluators[0]).region_conf[0]
    best["ids_seen"] = {"gt": conf.sum(0).nonzero().flatten().tolist(),
                          "pred": conf[:-1].sum(1).nonzero().flatten().tolist()}
    return result


def _first_out_of_range(pred_dir: Path, labels: list[str], num_classes: int,
                        ignore_index: int) -> str:
    """The first prediction file holding an id outside 0..C other than the ignore id (read
    again: an error path)."""
    from lusscore.data.label_io import read_label_png
    for name in labels:
        path = pred_dir / name
        if path.is_file():
            pred = read_label_png(path)
            if ((pred > num_classes) & (pred != ignore_index)).any():
                return str(path)
    return "a prediction"


def unused_classes_warning(result: dict, num_classes: int) -> str | None:
    """A warning when C is far above every id the GT and the predictions hold: the mean then
    runs over classes that are in neither (e.g. --num-classes 50 on a 3-class set)."""
    seen = result.get("ids_seen") or {}
    top = max(seen.get("gt", []) + seen.get("pred", []), default=0)
    if num_classes <= 2 * max(top, 1):
        return None
    return (f"warning: --num-classes {num_classes}, but the GT and the predictions hold ids "
            f"{sorted(set(seen.get('gt', [])) | set(seen.get('pred', [])))[:MAX_LISTED]} only: "
            f"the means run over {num_classes} classes (is --num-classes right?)")


# ---------------------------------------------------------------------------------------------
# A run folder's protocols: which splits are predicted and scored, with which match


def eval_device(rt) -> str:
    """Where scoring runs: the run's GPU, else the CPU."""
    return str(rt.device) if rt.device.type == "cuda" else "cpu"


def skipped_test_reason(ds) -> str | None:
    """None when test can be scored, else the one line saying why it is not."""
    if not ds.has_images("test"):
        return (f"test: no test images in {ds.split_dir('test')}; test evaluation skipped, "
                "validation results only")
    if not ds.has_labels("test"):
        return (f"test: images but no GT in {ds.labels_dir('test')}; test predicted, test "
                "evaluation skipped (`luss submit` packs the predictions for the test server)")
    return None


def prediction_splits(ds) -> list[str]:
    """Validation, and test when its images exist (with or without GT)."""
    return ["validation"] + (["test"] if ds.has_images("test") else [])


def scored_splits(ds) -> list[str]:
    return ["validation"] + (["test"] if skipped_test_reason(ds) is None else [])


DISTANCE_MATCH_MODES = ("none", "hungarian")


def protocol_matches(cfg: dict, protocol: str) -> bool:
    """Whether a protocol's ids need a match to GT: unsupervised and HP clusters always; semi never
    (its head predicts GT ids); distance matching only with distance_match.match: hungarian
    (the reference code's re-matching, default none)."""
    if protocol == "distance_match":
        mode = cfg["distance_match"]["match"]
        if mode not in DISTANCE_MATCH_MODES:
            raise LusscoreError(f"distance_match.match must be "
                                f"{' or '.join(map(repr, DISTANCE_MATCH_MODES))}, not {mode!r}")
        return mode == "hungarian"
    return protocol in ("unsupervised", "hp")


HP_MATCHES = {"image": "hungarian", "pixel": "hungarian-pixel"}


def protocol_match(ctx, protocol: str, split: str) -> str:
    """The match a protocol's split is scored with: none, or for a matched protocol the
    Hungarian match found on validation (HP's with hp.match: pixel), which test reuses from
    its match.json."""
    if not protocol_matches(ctx.cfg, protocol):
        return "none"
    if split == "validation":
        if protocol != "hp":
            return "hungarian"
        mode = ctx.cfg["hp"]["match"]
        if mode not in HP_MATCHES:
            raise LusscoreError(f"hp.match must be {' or '.join(map(repr, HP_MATCHES))}, not {mode!r}")
        return HP_MATCHES[mode]
    path = ctx.run.match(protocol)
    if not path.is_file():
        raise LusscoreError(f"{path} not found: the {split} split reuses the match found on "
                            "validation; evaluate validation first")
    return str(path)


def evaluate_predictions(ctx, pred_dir: Path | None = None, out_dir: Path | None = None,
                         match: str = "hungarian", split: str = "validation",
                         workers: int = 0) -> dict:
    """Evaluate a protocol's predictions of a split with GT (default: the unsupervised
    validation ones) and write out_dir/metrics.json, plus out_dir/match.json when the match
    is found here (match "hungarian" or "hungarian-pixel"; a match.json path is applied as it
    is)."""
    ds, run = ctx.dataset, ctx.run
    names = ds.names_path(split)
    pred_dir = Path(pred_dir) if pred_dir is not None else run.predictions("unsupervised", split)
    out_dir = Path(out_dir) if out_dir is not None else run.metrics("unsupervised", split).parent
    result = evaluate(ds.labels_dir(split), pred_dir,
                      ds.num_classes, names=names if names.is_file() else None, match=match,
                      device=eval_device(ctx.rt), workers=workers)
    if ctx.rt.is_main:
        if match in ("hungarian", "hungarian-pixel"):
            match_ids = {str(k): int(v) for k, v in result["match"].items()}
            atomic_write_text(out_dir / MATCH_FILE, json.dumps(match_ids, indent=1))
        atomic_write_text(out_dir / METRICS_FILE, json.dumps(json_ready(result), indent=1))
        print(f"{split}:")
        print(format_table(result, ["other"] + ds.wnids))
    if match in ("hungarian", "hungarian-pixel"):
        result["matching"] = match  # for the summary's match column, not metrics.json
    return result


def evaluate_protocol(ctx, protocol: str, split: str = "validation", workers: int = 0) -> dict:
    """Score a protocol's predictions of a split into its metrics.json (see layout.py)."""
    return evaluate_predictions(ctx, pred_dir=ctx.run.predictions(protocol, split),
                                out_dir=ctx.run.metrics(protocol, split).parent,
                                match=protocol_match(ctx, protocol, split), split=split,
                                workers=workers)


def run_splits(ctx, protocol: str, runner) -> dict:
    """A protocol that needs only the pretrained backbone on validation, then test:
    runner(ctx, split) predicts and scores a split (None when it has no GT); a split whose
    metrics.json exists is skipped (its metrics read back). Returns {split: result} of the
    scored splits."""
    results = {}
    for split in prediction_splits(ctx.dataset):
        if ctx.run.scored(protocol, split):
            path = ctx.run.metrics(protocol, split)
            ctx.log(f"{protocol} {split}: complete ({path}), skipped")
            results[split] = json.loads(path.read_text())
            continue
        ctx.log(f"{protocol}: {split}")
        result = runner(ctx, split)
        if result is not None:
            ctx.log(f"{protocol} {split}: mIoU {result['mIoU']:.2f}")
            results[split] = result
    return results


# The side-by-side summary of a run's protocols (protocols.json and the printed table)

SUMMARY_KEYS = ("mIoU", "mBIoU", "Acc", "FMeasure", "S", "MS", "ML", "L", "PixelAcc")
NAME_WIDTH = 20  # first column of the protocol table: fits 'floor colour_kmeans'


def summarize(protocol: str, results: dict) -> dict:
    """{validation's numbers..., match, metrics, "test": the same for test, or None when test
    was not scored}; results: {split: evaluation result}."""
    def one(split: str) -> dict:
        result = results[split]
        out = {k: result.get(k) for k in SUMMARY_KEYS}
        # test never gets a match of its own: a matched protocol reuses validation's
        out["match"] = ("none" if result.get("match") is None
                        else result.get("matching", "hungarian") if split == "validation"
                        else "validation")
        out["metrics"] = RunDir("").metrics(protocol, split).as_posix()
        return out
    out = one("validation")
    out["test"] = one("test") if "test" in results else None
    return json_ready(out)


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
        match = {"hungarian": "hungarian on validation",
                 "hungarian-pixel": "pixel hungarian on validation"}.get(m["match"], m["match"])
        lines.append(f"{name:<{NAME_WIDTH}} {cells(m)}   {cells(m.get('test'))}  {match}")
    floors = floors or {}
    val = floors.get("validation")
    if val is not None:
        test = floors.get("test") or {"floors": {}}
        for name, m in val["floors"].items():
            lines.append(f"{'floor ' + name:<{NAME_WIDTH}} {cells(m)}   "
                         f"{cells(test['floors'].get(name))}  {val['match']}, no learning")
    return "\n".join(lines)


def evaluate_run(args) -> dict:
    """--run-dir mode: the protocol's split scored as `luss run` does, into its metrics.json."""
    import torch
    from lusscore.engine import Runtime
    from lusscore.stages.common import StageContext, resolve_config
    given = [flag for flag, value in (("--gt", args.gt), ("--pred", args.pred), ("--names", args.names),
                                      ("--num-classes", args.num_classes), ("--match", args.match),
                                      ("--curve", args.curve), ("--pass-bands", args.pass_bands),
                                      ("--missing-as-background", args.missing_as_background))
             if value not in (None, False)]
    if given:
        raise LusscoreError(f"--run-dir takes the GT, names, predictions and match from the run; "
                            f"drop {', '.join(given)}")
    split, protocol = args.split or "validation", args.protocol or "unsupervised"
    ctx = StageContext(resolve_config(args.run_dir, None, []), args.run_dir,
                       Runtime(torch.device(args.device)))
    ds = ctx.dataset
    if not ds.has_labels(split):
        raise LusscoreError(f"{ds.labels_dir(split)}: no GT label PNGs, so the {split} split cannot "
                            "be scored here (the benchmark's test GT is on its server: `luss submit`)")
    result = evaluate_protocol(ctx, protocol, split, workers=args.workers)
    print(f"evaluate: {protocol} {split} mIoU {result['mIoU']:.2f} -> "
          f"{RunDir(args.run_dir).metrics(protocol, split)}")
    return result


def main(args) -> int:
    import torch
    from lusscore.matching import save_match
    from lusscore.ops.switch import set_ops_mode
    set_ops_mode(args.ops)
    if args.device == "cpu":
        torch.set_num_threads(1)  # per-image work is small; decoding runs in --workers processes
    if args.run_dir is not None:
        result = evaluate_run(args)
    else:
        if args.split is not None or args.protocol is not None:
            raise LusscoreError("--split and --protocol need --run-dir")
        missing = [flag for flag, value in (("--gt", args.gt), ("--pred", args.pred),
                                            ("--num-classes", args.num_classes)) if value is None]
        if missing:
            raise LusscoreError(f"give {', '.join(missing)} (or --run-dir RUN to score a run folder)")
        result = evaluate(args.gt, args.pred, args.num_classes, args.names, args.match or "none",
                          args.device, args.workers, args.missing_as_background, args.pass_bands,
                          args.curve, args.conf_suffix, args.ignore_index, args.boundary_ratio,
                          args.quiet, args.out_of_range)
    best = result["best"] if args.curve else result
    if args.curve:
        for t, r in zip(result["thresholds"], result["results"]):
            print(f"threshold {t:.4f}: mIoU {r['mIoU']:.2f}  mBIoU {r['mBIoU']:.2f}")
        print(f"best threshold {result['best_threshold']:.4f}")
    if args.run_dir is None:  # evaluate_run printed the table with the class names
        print(format_table(best))
    if result.get("missing_predictions"):
        print(f"warning: {len(result['missing_predictions'])} missing prediction(s) scored as "
              "all 'other'")
    if best.get("out_of_range_first"):
        ids = best["out_of_range_ids"]
        print(f"warning: predicted ids outside 0..{len(best['IoUs']) - 1}: {ids[:MAX_LISTED]}"
              + (" ..." if len(ids) > MAX_LISTED else "") + f", first in {best['out_of_range_first']}"
              " (--out-of-range drop: scored as the official evaluator does, dropped from the "
              "histograms, foreground for F)")
    warning = unused_classes_warning(best, len(best["IoUs"]) - 1)
    if warning:
        print(warning)
    if args.save_match:
        if best["match"] is None:
            raise LusscoreError("--save-match needs --match hungarian or a match file")
        save_match(args.save_match, best["match"])
    if args.json:
        atomic_write_text(args.json, json.dumps(json_ready(result), indent=1))
    return 0
