"""Checkpoints: one file per stage, written atomically, with the RNG state for exact resume."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from lusscore.utils import LusscoreError, atomic_path


def rng_state() -> dict:
    # numpy's state as tensors, so checkpoints load with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, state: dict, with_rng: bool = True) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a torn checkpoint."""
    if with_rng:
        state = {**state, "rng": rng_state()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, map_location="cpu", restore_rng: bool = False) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for a damaged file
        raise LusscoreError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise LusscoreError(f"{path}: not a lusscore checkpoint (expected a dict)")
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])
    return state


def checkpoint_done(path: str | os.PathLike) -> bool:
    """True when the stage checkpoint at path exists and was saved after its last epoch."""
    return Path(path).is_file() and bool(load_checkpoint(path).get("done", False))
