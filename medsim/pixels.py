"""Pixels in and out: stored bytes <-> arrays, and image files from users.

Stored images are raw uint8 in (height, width, channels) order, so numpy alone decodes
them. Models see (H, W, 3): grey is repeated to three channels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsim.errors import DataRefused


def decode(pixels: bytes, h: int, w: int, c: int) -> np.ndarray:
    """Stored bytes -> (h, w, 3) uint8. Raises ValueError on anything inconsistent."""
    if c not in (1, 3):
        raise ValueError(f"unsupported channel count {c}")
    if len(pixels) != h * w * c:
        raise ValueError(f"pixel data is {len(pixels)} bytes, expected {h}x{w}x{c} = {h * w * c}")
    x = np.frombuffer(pixels, np.uint8).reshape(h, w, c)
    return np.repeat(x, 3, axis=2) if c == 1 else x


def load_image_file(path: Path | str, size: int = 28) -> np.ndarray:
    """Any PNG/JPEG/... -> (size, size, C) uint8, C = 1 for grey sources, else 3."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataRefused(f"{path}: {'a directory, not an image file' if path.is_dir() else 'no such file'}")
    try:
        with Image.open(path) as img:
            img.load()
            grey = img.mode in ("1", "L", "LA", "I", "I;16", "F")
            img = img.convert("L" if grey else "RGB").resize((size, size), Image.Resampling.BICUBIC)
            x = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataRefused(f"{path}: not a readable image ({err})") from err
    return x[..., None] if x.ndim == 2 else x
