"""ImageNet-S label PNG codec: id = R + 256 * G, B = 0 (alpha, if present, is ignored).

Reading rejects grayscale and palette PNGs (the official evaluator crashes on them) and
names the file in every error; writing goes through a temporary file and a rename.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lusscore.utils import LusscoreError, atomic_path

IGNORE_INDEX = 1000
OTHER_INDEX = 0
MAX_LABEL_ID = 65535


def decode_label_rgb(rgb: np.ndarray, dtype=np.int64) -> np.ndarray:
    """(H, W, >=2) uint8 -> (H, W) ids = R + 256 * G."""
    if rgb.ndim != 3 or rgb.shape[2] < 2 or rgb.dtype != np.uint8:
        raise LusscoreError(f"expected an (H, W, 3) uint8 RGB array, got {rgb.shape} {rgb.dtype}")
    out = rgb[..., 1].astype(dtype)
    out <<= 8
    out |= rgb[..., 0]
    return out


def encode_label_rgb(label: np.ndarray) -> np.ndarray:
    """(H, W) integer ids in 0..65535 -> (H, W, 3) uint8 with R = id % 256, G = id // 256, B = 0."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise LusscoreError(f"a label map must be 2-D (H, W), got shape {label.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        raise LusscoreError(f"a label map must hold integers, got dtype {label.dtype}")
    if label.size and (label.min() < 0 or label.max() > MAX_LABEL_ID):
        raise LusscoreError(
            f"label ids must lie in 0..{MAX_LABEL_ID}, got range {label.min()}..{label.max()}")
    ids = label.astype(np.uint16, copy=False)
    rgb = np.zeros(label.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = ids & 0xFF
    rgb[..., 1] = ids >> 8
    return rgb


def read_label_png(path: str | os.PathLike, dtype=np.int64,
                   expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an ImageNet-S label PNG as an (H, W) array of ids.

    expected_size: (H, W) the map must have (e.g. its image's or its GT's size).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            if im.format != "PNG":  # e.g. JPEG bytes named .png: lossy, so not ids
                raise LusscoreError(f"{path}: a {im.format} file, not a PNG; label maps must be "
                                    "lossless RGB PNGs (write them with lusscore.data.write_label_png)")
            if mode in ("L", "P", "1", "I", "I;16", "LA", "PA"):
                raise LusscoreError(
                    f"{path}: label PNGs must be RGB (id = R + 256*G), got a {mode!r} "
                    f"(grayscale/palette) image; convert it with lusscore.data.write_label_png")
            if mode != "RGB":
                raise LusscoreError(f"{path}: label PNGs must be RGB (id = R + 256*G), got mode "
                                    f"{mode!r}" + (" (an alpha channel)" if "A" in mode else ""))
            rgb = np.asarray(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"label file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise LusscoreError(f"{path}: cannot read label PNG ({e})") from None
    blue = np.flatnonzero(rgb[..., 2])
    if blue.size:  # B = 0 in the encoding: a non-zero blue means the file is not a label map
        y, x = divmod(int(blue[0]), rgb.shape[1])
        raise LusscoreError(f"{path}: blue is {rgb[y, x, 2]} at (row {y}, column {x}); label PNGs "
                            "encode id = R + 256*G with B = 0 (not a label map, or a colour "
                            "visualisation of one)")
    label = decode_label_rgb(rgb, dtype=dtype)
    if expected_size is not None and tuple(label.shape) != tuple(expected_size):
        raise LusscoreError(
            f"{path}: label size {label.shape[0]}x{label.shape[1]} (HxW) does not match the "
            f"expected {expected_size[0]}x{expected_size[1]}")
    return label


def label_png_valid(path: str | os.PathLike, expected_size: tuple[int, int]) -> bool:
    """True when path decodes, whole, as a label PNG of expected_size: what a resumed stage
    checks before it skips an output (a truncated file is redone, not skipped)."""
    try:
        read_label_png(path, expected_size=expected_size)
    except (FileNotFoundError, LusscoreError):
        return False
    return True


def write_label_png(path: str | os.PathLike, label) -> None:
    """Write (H, W) ids (numpy or torch, any integer dtype) as an RGB PNG, atomically."""
    if hasattr(label, "detach"):
        label = label.detach().cpu().numpy()
    rgb = encode_label_rgb(np.asarray(label))
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image file without decoding its pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise LusscoreError(f"{path}: cannot read image ({e})") from None
    return h, w


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB (PIL), with a clear error naming the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise LusscoreError(f"{path}: cannot read image ({e})") from None
