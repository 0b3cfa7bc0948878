"""Fully unsupervised matching of predicted ids to GT classes (ImageNet-S match.py).

The image-level co-occurrence of predicted ids 1..C and GT ids 1..C (presence only) gives the
float32 cost 1 - n_ij / N; Munkres 1.1.4 (ported to C++ with the same tie-breaking) minimises
it. The result maps every id 1..C to a class, plus "0": 0, and is saved as the official JSON.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from lusscore.utils import LusscoreError, atomic_write_text


def cooccurrence_from_pairs(pred_img: np.ndarray, pred_id: np.ndarray, gt_img: np.ndarray,
                            gt_id: np.ndarray, num_images: int, num_classes: int) -> np.ndarray:
    """(C, C) int64: n[i, j] = number of images holding predicted id i+1 and GT id j+1,
    from (image index, id) presence pairs; ids outside 1..C are ignored, repeats count once."""
    def incidence(img, ids):
        img, ids = np.asarray(img, dtype=np.int64), np.asarray(ids, dtype=np.int64)
        keep = (ids >= 1) & (ids <= num_classes)
        m = sp.csr_matrix((np.ones(int(keep.sum()), dtype=np.int64), (img[keep], ids[keep] - 1)),
                          shape=(num_images, num_classes))
        m.sum_duplicates()
        m.data[:] = 1  # presence only
        return m
    n = (incidence(pred_img, pred_id).T @ incidence(gt_img, gt_id)).toarray()
    return np.asarray(n, dtype=np.int64)


def cooccurrence(pred_present: list[np.ndarray], gt_present: list[np.ndarray],
                 num_classes: int) -> np.ndarray:
    """cooccurrence_from_pairs for per-image lists of the ids present."""
    if len(pred_present) != len(gt_present):
        raise LusscoreError("pred_present and gt_present must list the same images")

    def flat(lists):
        ids = [np.asarray(x, dtype=np.int64).reshape(-1) for x in lists]
        img = [np.full(x.size, i, dtype=np.int64) for i, x in enumerate(ids)]
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
        return cat(img), cat(ids)
    return cooccurrence_from_pairs(*flat(pred_present), *flat(gt_present), len(pred_present),
                                   num_classes)


def cost_matrix(cooc: np.ndarray, num_images: int, variant: str = "imagenet-s") -> np.ndarray:
    """The matrix the official code hands to munkres.

    imagenet-s: float32 1 - n/N; pass: -n (PASS's cluster/hungarian.py), exact in any dtype.
    """
    if variant == "pass":
        return -cooc.astype(np.float64)
    if num_images <= 0:
        raise LusscoreError("matching needs at least one image")
    return np.float32(1.0) - cooc.astype(np.float32) / np.float32(num_images)


def hungarian_match(cooc: np.ndarray, num_images: int, variant: str = "imagenet-s") -> dict[int, int]:
    """{pred id: GT id} for ids 1..C (Munkres 1.1.4 ties), plus 0 -> 0."""
    from lusscore.ops import munkres_assign
    cost = cost_matrix(cooc, num_images, variant)
    cols = munkres_assign(torch.from_numpy(np.ascontiguousarray(cost))).tolist()
    match = {i + 1: int(j) + 1 for i, j in enumerate(cols)}
    match[0] = 0
    return match


def match_to_json(match: dict[int, int]) -> str:
    """The official file's text: ids 1..C in order, then "0": 0 (json.dumps of that dict)."""
    ordered = {str(k): int(v) for k, v in sorted(match.items()) if k != 0}
    if 0 in match:
        ordered["0"] = int(match[0])
    return json.dumps(ordered)


def save_match(path: str | os.PathLike, match: dict[int, int]) -> None:
    atomic_write_text(path, match_to_json(match))


def load_match(path: str | os.PathLike) -> dict[int, int]:
    """Read a match.json ({"<pred id>": gt_id}); keys and values must be integers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"match file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LusscoreError(f"{path}: not a JSON match file ({e})") from None
    if not isinstance(raw, dict):
        raise LusscoreError(f"{path}: a match file must be a JSON object {{\"pred id\": gt id}}")
    match = {}
    for k, v in raw.items():
        try:
            key, val = int(float(k)), int(v)
        except (TypeError, ValueError):
            raise LusscoreError(f"{path}: entry {k!r}: {v!r} is not an integer pair") from None
        match[key] = val
    return match
