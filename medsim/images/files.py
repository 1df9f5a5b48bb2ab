"""Image files and uploads -> stored-form pixels: one reader for every path that takes an
image from outside (ingest, search by file, uploads), so they cannot disagree."""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np

from medsim import settings
from medsim.errors import Unreadable
from medsim.images import chatter, dicom
from medsim.images.convert import as_stored

# What an image is, by its first bytes (the filename and a declared content type say
# nothing). DICOM has a 128-byte preamble, then "DICM".
MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
         (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))
DICOM_SUFFIXES = (".dcm", ".dicom")
READS = "PNG, JPEG, TIFF, BMP, GIF, WebP or DICOM"  # what sniff() knows


def sniff(head: bytes) -> str | None:
    """The image format of these bytes, or None: png, jpeg, gif, bmp, tiff, webp, dicom."""
    if head[128:132] == b"DICM":  # first: some DICOM preambles are TIFF headers on purpose
        return "dicom"
    for magic, name in MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def read(source: Path | str | bytes, *, name: str | None = None, max_pixels: int | None = None,
         frame: int | None = None, kind: str | None = None, notes: list | None = None) -> np.ndarray:
    """A file (path) or its bytes -> stored-form pixels (H, W, C) uint8/uint16.

    The format is sniffed from the content (``kind`` forces one: sources know DICOM files
    without a preamble by their suffix); the pixel count is checked from the header before
    decoding. ``frame``: which frame of a multi-frame DICOM (default the first). Unreadable
    otherwise, named by ``name`` when given. ``notes`` gets what a decoder printed while it
    decoded (images/chatter.py), when it printed anything."""
    limit = settings.get().max_image_pixels if max_pixels is None else max_pixels
    try:
        if isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
            fp, head = io.BytesIO(data), data[:132]
        else:
            path = Path(source)
            regular_file(path)
            with open(path, "rb") as f:
                head = f.read(132)
            fp = path
            if kind is None and path.suffix.lower() in DICOM_SUFFIXES:
                kind = "dicom"
        kind = kind or sniff(head)
        if kind == "dicom":
            return dicom.read(fp, frame, limit, notes=notes)
        if kind is None:
            raise Unreadable(f"not a readable image: not {READS} (recognised by content, not by file name)")
        return _raster(fp, limit, notes)
    except Unreadable as err:
        raise (err.named(name) if name else err) from None


def read_dicom_frames(source, frames: list, *, max_pixels: int | None = None, each=None,
                      notes: list | None = None) -> list:
    """Several frames of one DICOM file (a path, its bytes, or a pydicom Dataset already
    read, as WADO-RS gives it) in stored form, the file read and each frame decoded once;
    Unreadable otherwise. ``each`` is applied to each frame as it is decoded (dicom.read_frames)."""
    limit = settings.get().max_image_pixels if max_pixels is None else max_pixels
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, str | Path):
        regular_file(Path(source))
        source = Path(source)
    return dicom.read_frames(source, frames, limit, each=each, notes=notes)


def regular_file(path: Path) -> os.stat_result:
    """Refuse what is not a regular file before opening it: a FIFO would block the reader,
    a directory is not an image. -> its stat."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise Unreadable("no such file") from None
    except OSError as err:
        raise Unreadable(f"cannot be read ({err.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise Unreadable("a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise Unreadable("not a regular file")
    return st


def _raster(fp, limit: int, notes: list | None = None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    said = None
    try:
        # Pillow warns about harmless oddities (corrupt EXIF, odd TIFF tags); the pixel
        # limit below is medsim's own, so its bomb warning would say nothing new either
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(fp)
        with img:
            w, h = img.size
            if w * h > limit:
                raise Unreadable(f"{w} x {h} = {w * h:,} pixels is over the limit of {limit:,} "
                                 f"(MEDSIM_MAX_IMAGE_PIXELS)")
            if getattr(img, "n_frames", 1) > 1:
                raise Unreadable(f"a multi-page image ({img.n_frames} pages); save each page as its own file")
            with chatter.captured() as said, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
            x = _array(img)
    except Unreadable:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError,
            EOFError) as err:
        raise Unreadable(f"not a readable image ({err})" + (f" (the decoder said: {said.text})" if said else "")) \
            from None
    if said and notes is not None:
        notes.append(f"the decoder said: {said.text}")
    return as_stored(x)


def _array(img) -> np.ndarray:
    """A Pillow image -> uint8 (grey or RGB), uint16 (grey), int32 or float32, nothing clipped."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        x = np.asarray(img).astype(np.uint16)
        return _declared_depth(img, x)
    if mode in ("I", "F"):
        return np.asarray(img)  # as_stored: int32 that fits 16 bits; float in 0..1
    if mode in ("1", "L", "LA") or (mode == "P" and palette_is_grey(img)):
        return np.asarray(img.convert("L"))
    return np.asarray(img.convert("RGB"))


def _declared_depth(img, x: np.ndarray) -> np.ndarray:
    """A TIFF that declares fewer than 16 bits per sample (12-bit data in a 16-bit
    container) is scaled to the 16-bit range it is read against: full scale stays full."""
    bits = getattr(img, "tag_v2", {}).get(258) if img.format == "TIFF" else None
    bits = bits[0] if isinstance(bits, tuple) and bits else bits
    if isinstance(bits, int) and 8 < bits < 16:
        top = (1 << bits) - 1
        return np.rint(np.minimum(x, top).astype(np.float64) * (65535.0 / top)).astype(np.uint16)
    return x


def palette_is_grey(img) -> bool:
    if img.mode != "P":
        return True
    rgb = np.asarray(img.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
