"""Pack a run's test predictions into the archive the ImageNet-S test server takes.

The zip holds <wnid>/<name>.png for every test image (names/test.txt, else a scan of test/),
in the ImageNet-S encoding (id = R + 256 * G), with class ids 0..C: the unsupervised
predictions (<run>/predictions/test) are relabelled through the match found on validation
(<run>/match.json); the semi-supervised and distance-matching ones (<run>/<protocol>/
predictions/test) are class ids already (distance matching with `match: hungarian` goes
through distance_match/match.json). Before anything is written, every test image must have
exactly one prediction of its size. The archive (default <run>[/<protocol>]/submission.zip)
is written to a temporary file, then renamed.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lusscore.data.label_io import MAX_LABEL_ID, encode_label_rgb, image_size, read_label_png
from lusscore.engine import Runtime
from lusscore.stages.common import PROTOCOLS, StageContext, resolve_config
from lusscore.utils import LusscoreError, atomic_path, files_under

SPLIT = "test"
MAX_LISTED = 20


def _listing(names: list[str]) -> str:
    return ", ".join(names[:MAX_LISTED]) + (" ..." if len(names) > MAX_LISTED else "")


def check_predictions(samples, pred_dir: Path) -> None:
    """Every sample has exactly one prediction PNG under pred_dir, and nothing else is there."""
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"no test predictions: {pred_dir} not found (run `luss infer "
                                "--split test` or `luss run` first)")
    expected = {s.name for s in samples}
    found = [p.relative_to(pred_dir).as_posix() for p in files_under(pred_dir, (".png",))]
    missing = sorted(expected - set(found))
    extra = sorted(set(found) - expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} test image(s) have no prediction: "
                        + _listing(missing))
    if extra:
        problems.append(f"{len(extra)} prediction(s) match no test image: " + _listing(extra))
    if problems:
        raise LusscoreError(f"{pred_dir}: " + "; ".join(problems))


def relabel_table(match: dict[int, int] | None, num_classes: int) -> np.ndarray:
    """Lookup table predicted id -> class id over every id a label PNG holds; -1 marks an id
    with no class (not in the match, or beyond C without one)."""
    lut = np.full(MAX_LABEL_ID + 1, -1, dtype=np.int64)
    if match is None:
        lut[:num_classes + 1] = np.arange(num_classes + 1)
    else:
        for k, v in match.items():
            if 0 <= k <= MAX_LABEL_ID:
                lut[k] = v
    return lut


def encode_png(label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(encode_label_rgb(label)).save(buf, format="PNG")
    return buf.getvalue()


def submission_match(ctx: StageContext, protocol: str) -> dict[int, int] | None:
    """The match found on validation, or None when the protocol predicts class ids."""
    from lusscore.matching import load_match
    from lusscore.stages.evaluate import protocol_match
    path = protocol_match(ctx, protocol, SPLIT)  # 'none' or validation's match.json
    return None if path == "none" else load_match(path)


def write_submission(run_dir: str | Path, protocol: str = "unsupervised",
                     out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    if protocol not in PROTOCOLS:
        raise LusscoreError(f"unknown protocol {protocol!r}; one of {list(PROTOCOLS)}")
    ctx = StageContext(resolve_config(run_dir, None, []), run_dir, Runtime(torch.device("cpu")))
    ds = ctx.dataset
    samples = ds.split_images(SPLIT)
    pred_dir = ctx.run.predictions(protocol, SPLIT)
    check_predictions(samples, pred_dir)
    match = submission_match(ctx, protocol)
    lut = relabel_table(match, ds.num_classes)
    out = Path(out) if out is not None else ctx.run.submission(protocol)
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for s in samples:
            path = pred_dir / s.name
            pred = read_label_png(path, expected_size=image_size(s.image))
            label = lut[pred]
            bad = np.unique(pred[(label < 0) | (label > ds.num_classes)])
            if bad.size:
                raise LusscoreError(f"{path}: predicted id(s) {bad[:MAX_LISTED].tolist()} map to "
                                    f"no class id 0..{ds.num_classes}"
                                    + (" through the validation match" if match else ""))
            archive.writestr(s.name, encode_png(label))
    return out


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="the run folder (with test predictions)")
    parser.add_argument("--protocol", default="unsupervised", choices=PROTOCOLS,
                        help="whose test predictions (default unsupervised)")
    parser.add_argument("--out", default=None,
                        help="the archive (default <run>[/<protocol>]/submission.zip)")


def main(args) -> int:
    out = write_submission(args.run_dir, args.protocol, args.out)
    print(f"submit: wrote {out}")
    return 0
