"""DICOM pixels through pydicom, rendered the way a viewer shows them.

The Modality LUT (rescale slope/intercept, e.g. to Hounsfield units), then the VOI LUT
(the file's window) when it has one, then MONOCHROME1 inverted so that bright means dense
everywhere; the display values are spread over 16 bits (8 when the file stores 8).
Colour (RGB, YBR, palette) becomes RGB. A compressed transfer syntax is decoded when an
installed handler can (pydicom's own RLE, Pillow's JPEG and JPEG 2000); otherwise the
failure names the syntax.

What is kept of a file's tags, and patients' keyed hashes, are the sources' business
(medsim.sources.dicom): this module only reads headers and renders pixels.
"""

from __future__ import annotations

import warnings

import numpy as np

from medsim.errors import Unreadable
from medsim.images.convert import as_stored

# What pydicom raises for a file that is not (or not entirely) DICOM
NOT_DICOM = (OSError, ValueError, KeyError, AttributeError, EOFError, TypeError)


def header(fp, pixels: bool = False):
    """A pydicom Dataset (without its pixel data unless ``pixels``), or Unreadable."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every odd vendor tag
            return pydicom.dcmread(fp, stop_before_pixels=not pixels)
    except (InvalidDicomError, *NOT_DICOM) as err:
        raise Unreadable(f"not a readable DICOM file ({type(err).__name__}: {err})") from None


def read(fp, frame: int | None, max_pixels: int) -> np.ndarray:
    """One frame's display values in stored form (H, W, C) uint8/uint16, or Unreadable.
    The size is checked from the header before any pixel is decoded."""
    ds = header(fp)
    h, w = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if h * w == 0:
        raise Unreadable(f"no image in it (a {ds.get('Modality') or 'non-image'} object)")
    if h * w > max_pixels:
        raise Unreadable(f"{w} x {h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                         f"(MEDSIM_MAX_IMAGE_PIXELS)")
    if hasattr(fp, "seek"):
        fp.seek(0)
    return as_stored(render(header(fp, pixels=True), frame))


def render(ds, frame: int | None) -> np.ndarray:
    """Display values of one frame: (H, W) uint8/uint16 grey or (H, W, 3) RGB, or Unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _display(ds, ds.pixel_array, frame)
    except Exception as err:  # pydicom raises many kinds for a missing codec or bad data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", None) or "an unknown transfer syntax"
        raise Unreadable(f"cannot decode its pixels ({name}): {(str(err).splitlines() or [''])[0][:200]}") from None


def _display(ds, arr, frame) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[frame or 0]
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if pi == "PALETTE COLOR":
        return _to_bits(apply_color_lut(arr, ds), 8)
    if arr.ndim == 3:  # colour; pydicom gives RGB (YBR converted)
        return _to_bits(arr, 8 if arr.dtype.itemsize == 1 else 16)
    x = apply_modality_lut(arr, ds)
    x = apply_voi_lut(x, ds) if ("WindowCenter" in ds or "VOILUTSequence" in ds) else x
    x = np.asarray(x, dtype=np.float64)
    if pi == "MONOCHROME1":  # low values are bright: flip so every image reads the same way
        x = x.max() + x.min() - x
    bits = 8 if int(ds.get("BitsStored", 8) or 8) <= 8 else 16
    return _to_bits(x, bits)


def _to_bits(x: np.ndarray, bits: int) -> np.ndarray:
    """Display values -> uint8 or uint16 over their own range (8-bit data already in
    0..255 is kept as it is). Unchanged since the first DICOM ingest (revision 0008):
    stored archives keep matching their files."""
    if bits == 8 and x.dtype == np.uint8:
        return x
    x = np.asarray(x, dtype=np.float64)
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    top = 255 if bits == 8 else 65535
    y = (x - lo) / (hi - lo) * top if hi > lo else np.zeros_like(x)
    return np.clip(np.rint(np.nan_to_num(y)), 0, top).astype(np.uint8 if bits == 8 else np.uint16)
