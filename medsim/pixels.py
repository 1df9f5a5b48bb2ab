"""Pixels in and out: stored bytes <-> arrays, and image files from users.

Stored images are raw uint8 in (height, width, channels) order, so numpy alone decodes
them. Models see (H, W, 3): grey is repeated to three channels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsim.errors import DataRefused


def stored(pixels: bytes, h: int, w: int, c: int, bit_depth: int = 8) -> np.ndarray:
    """Stored bytes -> (h, w, c) uint8 or uint16, exactly as kept. ValueError if inconsistent."""
    if c not in (1, 3):
        raise ValueError(f"unsupported channel count {c}")
    if bit_depth not in (8, 16):
        raise ValueError(f"unsupported bit depth {bit_depth}")
    n = h * w * c * bit_depth // 8
    if len(pixels) != n:
        raise ValueError(f"pixel data is {len(pixels)} bytes, expected {h}x{w}x{c} at {bit_depth} bits = {n}")
    return np.frombuffer(pixels, np.uint8 if bit_depth == 8 else "<u2").reshape(h, w, c)


@dataclass
class StoredRow:
    """An image row's pixel columns, as the queries that read pixels return them."""

    id: int
    pixels: bytes
    height: int
    width: int
    channels: int
    bit_depth: int

    def decode(self) -> np.ndarray:
        return decode(bytes(self.pixels), self.height, self.width, self.channels, self.bit_depth)

    def decode_or_refuse(self) -> np.ndarray:
        """decode() for a user's request: a row stored broken is DataRefused naming it."""
        try:
            return self.decode()
        except ValueError as err:
            raise DataRefused(f"image {self.id} is stored broken ({err}); it cannot be shown or searched") from None


def decode(pixels: bytes, h: int, w: int, c: int, bit_depth: int = 8) -> np.ndarray:
    """Stored bytes -> (h, w, 3) uint8, the model's input. 16-bit images are windowed to
    8 bits by their own range here, at the model's door; the stored pixels stay 16-bit."""
    x = stored(pixels, h, w, c, bit_depth)
    if bit_depth == 16:
        x = to_uint8(x)
    return np.repeat(x, 3, axis=2) if c == 1 else x


# A query image is untrusted input: its size is checked from the header, before any
# pixel is decoded (Pillow's own decompression-bomb limit is 89 M pixels, and it only warns
# below twice that). MEDSIM_MAX_IMAGE_PIXELS overrides.
MAX_IMAGE_PIXELS = int(os.environ.get("MEDSIM_MAX_IMAGE_PIXELS", 40_000_000))

# Pillow modes holding more than 8 bits per pixel: 16-bit PNG/TIFF, 32-bit int, float
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_uint8(a: np.ndarray) -> np.ndarray:
    """A high-bit-depth grey image -> uint8 by its own range (min -> 0, max -> 255).

    Not a fixed divide-by-257: 12-bit data in a 16-bit container would become nearly
    black, and clipping to 255 (Pillow's convert("L")) made it nearly white. The stored
    images the model learnt from are 8-bit and contrast-normalised per image, so a
    per-image window is the mapping that matches them."""
    a = a.astype(np.float32)
    finite = np.isfinite(a)
    if not finite.any():
        raise DataRefused("the image has no finite pixel values")
    lo, hi = float(a[finite].min()), float(a[finite].max())
    scaled = np.where(finite, (a - lo) / (hi - lo) * 255.0, 0.0) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def load_image_file(path: Path | str, size: int = 28, max_pixels: int | None = None) -> np.ndarray:
    """Any PNG/JPEG/TIFF/... -> (size, size, C) uint8, C = 1 for grey sources, else 3.
    DataRefused for anything that is not a readable image within the pixel limit."""
    path = Path(path)
    if not path.is_file():
        raise DataRefused(f"{path}: {'a directory, not an image file' if path.is_dir() else 'no such file'}")
    return _load_raster(path, str(path), size, max_pixels)


# What an upload may be, by its first bytes (the filename and the declared content type
# say nothing). DICOM has a 128-byte preamble, then "DICM".
MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
         (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))


def sniff(data: bytes) -> str | None:
    """The image format of these bytes, or None: png, jpeg, gif, bmp, tiff, webp, dicom."""
    if data[128:132] == b"DICM":  # first: some DICOM preambles are TIFF headers on purpose
        return "dicom"
    for magic, name in MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def load_image_bytes(data: bytes, size: int = 28, max_pixels: int | None = None,
                     name: str = "the upload") -> np.ndarray:
    """Uploaded bytes -> (size, size, C) uint8, as load_image_file. The format is sniffed
    from the content; the pixel limit is checked from the header before decoding."""
    import io

    kind = sniff(data)
    if kind is None:
        raise DataRefused(f"{name} is not an image medsim reads (PNG, JPEG, TIFF, BMP, GIF, WebP or DICOM, "
                          f"recognised by content, not by file name)")
    if kind != "dicom":
        return _load_raster(io.BytesIO(data), name, size, max_pixels)
    from medsim.sources import dicom
    from medsim.sources.base import Problem

    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        header = dicom._read(io.BytesIO(data), header_only=True)
        h, w = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
        if h * w == 0:
            raise Problem(f"no image in it (a {header.get('Modality') or 'non-image'} object)")
        if h * w > limit:
            raise DataRefused(f"{name}: {w} x {h} = {w * h:,} pixels is over the limit of {limit:,}")
        x = dicom.load(io.BytesIO(data), frame=None)
    except Problem as err:
        raise DataRefused(f"{name}: {err}") from None
    return resize_array(x, size)


def resize_array(x: np.ndarray, size: int) -> np.ndarray:
    """(H, W) or (H, W, C) uint8/uint16 display values -> (size, size, C) uint8."""
    from PIL import Image

    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    if x.ndim == 2:
        f = Image.fromarray(x.astype(np.float32)).resize((size, size), Image.Resampling.BICUBIC)
        a = np.asarray(f, dtype=np.float32)
        out = to_uint8(a) if x.dtype != np.uint8 else np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return out[..., None]
    if x.dtype != np.uint8:
        x = to_uint8(x)
    return np.asarray(Image.fromarray(np.ascontiguousarray(x[..., :3])).resize((size, size), Image.Resampling.BICUBIC))


def _load_raster(fp, name: str, size: int, max_pixels: int | None) -> np.ndarray:
    import warnings

    from PIL import Image, UnidentifiedImageError

    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        # Pillow warns about harmless oddities (corrupt EXIF, odd TIFF tags); the pixel
        # limit below is medsim's own, so its bomb warning would say nothing new either
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(fp)
        with img:
            w, h = img.size
            if w * h > limit:
                raise DataRefused(f"{name}: {w} x {h} = {w * h:,} pixels is over the limit of {limit:,} "
                                  f"(MEDSIM_MAX_IMAGE_PIXELS)")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
            if img.mode in HIGH_DEPTH_MODES:
                # resize at full depth, then window to 8 bits
                f = img.convert("F").resize((size, size), Image.Resampling.BICUBIC)
                x = to_uint8(np.asarray(f, dtype=np.float32))
            else:
                grey = img.mode in ("1", "L", "LA", "P") and palette_is_grey(img)
                img = img.convert("L" if grey else "RGB").resize((size, size), Image.Resampling.BICUBIC)
                x = np.asarray(img, dtype=np.uint8)
    except DataRefused:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        raise DataRefused(f"{name}: not a readable image ({err})") from err
    return x[..., None] if x.ndim == 2 else x


def palette_is_grey(img) -> bool:
    if img.mode != "P":
        return True
    rgb = np.asarray(img.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
