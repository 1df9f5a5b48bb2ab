"""Stored form, bit depth and the one resize (the rules are in the package docstring)."""

from __future__ import annotations

import numpy as np

from medsim.errors import Unreadable

# Divisors to the model's 8-bit units: full scale 65535 / 255 = 257 exactly. A division (not
# a multiplication by 255/65535, which float32 cannot hold exactly) so that 257 * v / 257
# is v to the last bit and the x257 copy of an 8-bit image gives the identical input.
TO_8BIT = {np.dtype(np.uint8): np.float32(1.0), np.dtype(np.uint16): np.float32(257.0)}


def as_stored(x: np.ndarray) -> np.ndarray:
    """Any decoded image -> (H, W, C) uint8 or uint16 with C in {1, 3}, or Unreadable."""
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise Unreadable(f"unsupported pixel layout {x.shape}")
    if x.shape[2] == 4:  # RGBA: the alpha channel carries no anatomy
        x = x[..., :3]
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise Unreadable(f"empty image ({x.shape[0]}x{x.shape[1]})")
    if x.dtype == np.uint8 or x.dtype == np.uint16:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.floating):
        finite = np.isfinite(x).all()
        if not finite or x.min() < 0 or x.max() > 1:
            raise Unreadable("floating-point pixels outside 0..1 have no declared range; save the image as 8- "
                             "or 16-bit (or as floats in 0..1)")
        return np.ascontiguousarray(np.rint(x * 65535.0).astype(np.uint16))
    if np.issubdtype(x.dtype, np.integer) and x.size and x.min() >= 0 and x.max() <= 65535:
        return np.ascontiguousarray(x.astype(np.uint16))
    raise Unreadable(f"pixel type {x.dtype} with values outside 0..65535 is not supported")


def _check(x: np.ndarray) -> None:
    if x.ndim != 3 or x.shape[2] not in (1, 3):
        raise ValueError(f"expected (H, W, 1 or 3) pixels, got {x.shape}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"empty image ({x.shape[0]}x{x.shape[1]})")


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) -> (h, w, C) of the same dtype, Lanczos (antialiased when shrinking).

    uint8 goes through Pillow's own 8-bit path; uint16 and float32 through its 32-bit
    float path, channel by channel (uint16 rounded and clipped back; float32 returned
    unrounded, so a caller can round once at the end)."""
    from PIL import Image

    _check(x)
    h, w = size
    if x.shape[:2] == (h, w):
        return x
    lanczos = Image.Resampling.LANCZOS
    if x.dtype == np.uint8:
        img = Image.fromarray(x[..., 0] if x.shape[2] == 1 else np.ascontiguousarray(x))
        out = np.asarray(img.resize((w, h), lanczos))
        return out[..., None] if out.ndim == 2 else out
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c], dtype=np.float32)).resize((w, h), lanczos))
             for c in range(x.shape[2])]
    out = np.stack(chans, axis=-1)
    if x.dtype == np.uint16:
        return np.clip(np.rint(out), 0, 65535).astype(np.uint16)
    if x.dtype == np.float32:
        return out
    raise ValueError(f"cannot resize pixels of type {x.dtype}")


def shrink(x: np.ndarray, max_side: int) -> np.ndarray:
    """Longest side to max_side (aspect kept), in the stored dtype; smaller images unchanged."""
    h, w = x.shape[:2]
    if max(h, w) <= max_side:
        return x
    scale = max_side / max(h, w)
    return resize(x, (max(1, round(h * scale)), max(1, round(w * scale))))


def model_input(x: np.ndarray, size: int) -> np.ndarray:
    """Stored pixels (H, W, C) uint8/uint16 -> the network's input: (size, size, 3) uint8.

    Scaled by the container's full scale (the bit-depth rule) in float32, resized there,
    and rounded once: an 8-bit image and its x257 16-bit copy give the same bytes. Grey is
    repeated to three channels. ValueError for pixels that cannot be an image."""
    _check(x)
    if x.dtype not in TO_8BIT:
        raise ValueError(f"stored pixels must be uint8 or uint16, got {x.dtype}")
    if x.dtype == np.uint8 and x.shape[:2] == (size, size):
        out = x  # the common case (MedMNIST at the model's size): nothing to compute
    else:
        f = x.astype(np.float32) / TO_8BIT[x.dtype]
        out = np.clip(np.rint(resize(f, (size, size))), 0, 255).astype(np.uint8)
    return np.repeat(out, 3, axis=2) if out.shape[2] == 1 else np.ascontiguousarray(out)


WINDOWS = ("stored", "auto")


def to_display(x: np.ndarray, window: str = "stored") -> np.ndarray:
    """Stored pixels -> 8-bit (H, W) grey or (H, W, 3) RGB at their own size, for a person
    to look at (thumbnails, montages, previews). window "stored": the same bit-depth rule
    as the model's input; "auto": the image's own 1st-99th percentile stretched to the full
    range, from the stored values (for a 16-bit image, before any rounding to 8 bits), so a
    faint or narrow-range image is readable. Display only: the model never sees "auto"."""
    _check(x)
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}; choose from {', '.join(WINDOWS)}")
    if window == "auto":
        lo, hi = np.percentile(x, [1, 99])
        f = (x.astype(np.float32) - lo) / max(float(hi - lo), 1e-6)
        x = np.rint(np.clip(f, 0, 1) * 255).astype(np.uint8)
    elif x.dtype == np.uint16:
        x = np.rint(x.astype(np.float32) / TO_8BIT[x.dtype]).astype(np.uint8)
    return x[..., 0] if x.shape[2] == 1 else x
