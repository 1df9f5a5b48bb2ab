"""DICOM files (a PACS export) through pydicom.

Pixels become display values the way a viewer shows them: the Modality LUT (rescale
slope/intercept, e.g. to Hounsfield units), then the VOI LUT (the file's window), then
MONOCHROME1 inverted so that bright means dense everywhere; grey results are kept at 16
bits (8 when the file stores 8). Colour (RGB, YBR, palette) becomes RGB. A file with
several frames gives one image per frame. A compressed transfer syntax is decoded when
an installed handler can (pydicom's own RLE, Pillow's JPEG and JPEG 2000); otherwise the
file is skipped with the syntax named.

Privacy: of all the tags, only these are kept, as filterable metadata: Modality,
BodyPartExamined, ViewPosition, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID.
PatientID is stored only as a keyed hash (sources/base.py); names, birth dates and every
other tag are dropped.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from medsim.sources.base import Entry, Loaded, Problem, as_stored

KEPT_TAGS = ("Modality", "BodyPartExamined", "ViewPosition", "StudyInstanceUID", "SeriesInstanceUID",
             "SOPInstanceUID")


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    if path.suffix:
        return False
    try:  # PACS exports often have no suffix: the preamble's "DICM" says it
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _read(path: Path, header_only: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every odd vendor tag
            return pydicom.dcmread(path, stop_before_pixels=header_only)
    except (InvalidDicomError, OSError, ValueError, KeyError, AttributeError, EOFError) as err:
        raise Problem(f"not a readable DICOM file ({type(err).__name__}: {err})") from None


def entries(path: Path, rel: str, labels: tuple | None, label_tag: str | None) -> list[Entry]:
    """One entry per frame, from the header alone."""
    ds = _read(path, header_only=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _entries(ds, rel, labels, label_tag)
    except Problem:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as err:  # tags parse lazily
        raise Problem(f"a malformed header ({type(err).__name__}: {err})") from None


def _entries(ds, rel: str, labels: tuple | None, label_tag: str | None) -> list[Entry]:
    # the header alone (pixels not read): an image has Rows and Columns
    if not ds.get("Rows") or not ds.get("Columns"):
        raise Problem(f"no image in it (a {ds.get('Modality') or 'non-image'} object)")
    if label_tag:
        value = str(ds.get(label_tag, "") or "").strip()
        if not value:
            raise Problem(f"no {label_tag} to label it with")
        labels = (value,)
    meta = {t: str(ds.get(t)) for t in KEPT_TAGS if ds.get(t) not in (None, "")}
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    patient = str(ds.get("PatientID", "") or "").strip() or None
    study = meta.get("StudyInstanceUID")
    return [Entry(rel if frames == 1 else f"{rel}#frame{i}", labels, None, patient, study, dict(meta),
                  frame=i if frames > 1 else None) for i in range(frames)]


def load(path: Path, frame: int | None) -> np.ndarray:
    """Display values of one frame: (H, W) uint8/uint16 grey or (H, W, 3) RGB, or Problem."""
    ds = _read(path, header_only=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
            return _display(ds, arr, frame)
    except Exception as err:  # pydicom raises many kinds for a missing codec or bad data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", None) or "an unknown transfer syntax"
        raise Problem(f"cannot decode its pixels ({name}): {(str(err).splitlines() or [''])[0][:200]}") from None


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
    0..255 is kept as it is)."""
    if bits == 8 and x.dtype == np.uint8:
        return x
    x = np.asarray(x, dtype=np.float64)
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    top = 255 if bits == 8 else 65535
    y = (x - lo) / (hi - lo) * top if hi > lo else np.zeros_like(x)
    return np.clip(np.rint(np.nan_to_num(y)), 0, top).astype(np.uint8 if bits == 8 else np.uint16)


def load_entry(path: Path, entry: Entry, max_side: int) -> Loaded:
    from medsim.sources.folder import shrink

    x = as_stored(load(path, entry.frame))
    original = None
    if max(x.shape[:2]) > max_side:
        original = x.shape[:2]
        x = shrink(x, max_side)
    return Loaded(x, original)
