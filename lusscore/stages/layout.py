"""Where a run folder keeps the results of each protocol (no torch: the report uses it too).

Validation (every choice is made there) sits in the protocol's folder, test (scored once,
never used for a choice) in its test/ sub-folder::

    <run>/config.yaml                                     the resolved config
    <run>[/semi | /distance_match]/predictions/<split>/<wnid>/<name>.png
    <run>[/semi | /distance_match]/metrics.json, match.json (when matched on validation)
    <run>[/semi | /distance_match]/test/metrics.json
    <run>/baselines.json, <run>/test/baselines.json       the trivial floors of each split
"""
from __future__ import annotations

from pathlib import Path

from lusscore.utils import LusscoreError

RUN_CONFIG = "config.yaml"
PROTOCOLS = ("unsupervised", "semi", "distance_match")
EVAL_SPLITS = ("validation", "test")


def protocol_dir(run_dir: str | Path, protocol: str) -> Path:
    if protocol not in PROTOCOLS:
        raise LusscoreError(f"unknown protocol {protocol!r}; one of {list(PROTOCOLS)}")
    return Path(run_dir) if protocol == "unsupervised" else Path(run_dir) / protocol


def predictions_dir(run_dir: str | Path, protocol: str, split: str) -> Path:
    return protocol_dir(run_dir, protocol) / "predictions" / split


def protocol_metrics_path(run_dir: str | Path, protocol: str, split: str = "validation") -> Path:
    if split not in EVAL_SPLITS:
        raise LusscoreError(f"protocols are scored on {list(EVAL_SPLITS)}, not {split!r}")
    folder = protocol_dir(run_dir, protocol)
    return (folder if split == "validation" else folder / split) / "metrics.json"


def baselines_path(run_dir: str | Path, split: str = "validation") -> Path:
    """The trivial floors of a split, beside the unsupervised protocol's metrics.json."""
    return protocol_metrics_path(run_dir, "unsupervised", split).with_name("baselines.json")


def match_path(run_dir: str | Path, protocol: str) -> Path:
    """The match found on validation; test reuses it (re-matching on test would be a choice
    made on test)."""
    return protocol_dir(run_dir, protocol) / "match.json"
