"""DICOM pixels through pydicom, rendered the way a viewer shows them.

The Modality LUT (rescale slope/intercept, e.g. to Hounsfield units), then the VOI LUT
(the file's window) when it has one, then MONOCHROME1 inverted so that bright means dense
everywhere; the display values are spread over 16 bits (8 when the file stores 8).
Colour (RGB, YBR, palette) becomes RGB. A compressed transfer syntax is decoded when an
installed handler can (pylibjpeg's libjpeg/openjpeg/rle, GDCM, Pillow, pydicom's own RLE);
otherwise the failure names the syntax and what would decode it. Each frame is decoded once.
Objects that are not images (segmentations, dose grids, reports, plans) are refused by SOP
class before any pixel is decoded.

What is kept of a file's tags, and patients' keyed hashes, are the sources' business
(medsim.sources.dicom): this module only reads headers and renders pixels.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import numpy as np

from medsim.errors import Unreadable
from medsim.images import chatter
from medsim.images.convert import as_stored
from medsim.images.dicom_frames import data_refusal, frame_count, frame_refusal

__all__ = ["data_refusal", "frame_count", "frame_refusal", "header", "read", "read_frames", "refusal", "render",
           "render_frames"]

# What pydicom raises for a file that is not (or not entirely) DICOM
NOT_DICOM = (OSError, ValueError, KeyError, AttributeError, EOFError, TypeError)


def header(fp, pixels: bool = False):
    """A pydicom Dataset (without its pixel data unless ``pixels``), or Unreadable.

    A file without File Meta (no preamble, no "DICM": old exports, some modalities' raw
    dumps) is read again with pydicom's force=True, and kept only if what comes out is a
    DICOM object (it has a SOP Class UID or an image's Rows); its transfer syntax is then
    the one pydicom found the data set to be in. pydicom's "use force=True" advice was no
    help to someone at a command line."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every odd vendor tag
            try:
                return pydicom.dcmread(fp, stop_before_pixels=not pixels)
            except InvalidDicomError:
                if hasattr(fp, "seek"):
                    fp.seek(0)
                ds = pydicom.dcmread(fp, stop_before_pixels=not pixels, force=True)
                if "SOPClassUID" not in ds and "Rows" not in ds:
                    raise Unreadable("not a DICOM file: no File Meta header (no 'DICM' preamble), and read "
                                     "without one it holds no SOP class and no image") from None
                _guess_syntax(ds)
                return ds
    except Unreadable:
        raise
    except (InvalidDicomError, *NOT_DICOM) as err:
        raise Unreadable(f"not a readable DICOM file ({type(err).__name__}: {err})") from None


def _guess_syntax(ds) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        little, implicit = ds.original_encoding if hasattr(ds, "original_encoding") else (True, True)
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    ds.file_meta = meta


def refuse_non_image(ds) -> None:
    """Objects that are DICOM but not pictures to search, refused by SOP class with a
    sentence: a segmentation's masks, a dose grid, a report, a plan are not images of a
    patient, and storing them as images put masks among the neighbours."""
    why = refusal(ds, None)
    if why:
        raise Unreadable(why)


def refusal(ds, max_pixels: int | None, size_required: bool = True) -> str | None:
    """Why a header (a file's, or a QIDO answer's) refuses its object before any pixel is
    fetched or decoded, or None: a SOP class that is not a picture, then (given max_pixels)
    no Rows and Columns (unless not size_required: QIDO may leave them out), or more pixels
    than max_pixels."""
    uid = str(ds.get("SOPClassUID", "") or "").strip()
    what = non_image(uid)
    if what:
        return f"a {what} object (SOP class {uid}), not an image to search: refused"
    if max_pixels is None:
        return None
    h, w = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if h * w == 0:
        return f"no image in it (a {ds.get('Modality') or 'non-image'} object)" if size_required else None
    if h * w > max_pixels:
        return f"{w} x {h} = {w * h:,} pixels is over the limit of {max_pixels:,} (MEDSIM_MAX_IMAGE_PIXELS)"
    return None


def non_image(sop_class_uid: str) -> str | None:
    """What a non-image SOP class is, or None for an image (or unknown) class."""
    uid = sop_class_uid.strip()
    if uid == RT_IMAGE:  # a portal or simulator image: a picture of the patient
        return None
    if uid in NON_IMAGE:
        return NON_IMAGE[uid]
    for prefix, what in NON_IMAGE_FAMILIES:
        if uid.startswith(prefix):
            return what
    return None


# PS3.4 Annex B's storage SOP classes whose objects carry no picture of the patient
NON_IMAGE = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.481.4": "RT Beams Treatment Record",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT Plan",
    "1.2.840.10008.5.1.4.1.1.481.8": "RT Ion Plan",
    "1.2.840.10008.5.1.4.1.1.66": "Raw Data",
    "1.2.840.10008.5.1.4.1.1.66.1": "Spatial Registration",
    "1.2.840.10008.5.1.4.1.1.66.3": "Deformable Spatial Registration",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.104.2": "Encapsulated CDA",
    "1.2.840.10008.5.1.4.1.1.104.3": "Encapsulated STL",
}
NON_IMAGE_FAMILIES = (
    ("1.2.840.10008.5.1.4.1.1.88.", "Structured Report"),   # SR, KOS, CAD reports
    ("1.2.840.10008.5.1.4.1.1.11.", "Presentation State"),
    ("1.2.840.10008.5.1.4.1.1.9.", "Waveform"),            # ECG, audio, haemodynamics
    ("1.2.840.10008.5.1.4.1.1.481.", "Radiotherapy"),       # but RT Image, below
)
RT_IMAGE = "1.2.840.10008.5.1.4.1.1.481.1"


def read(fp, frame: int | None, max_pixels: int, notes: list | None = None) -> np.ndarray:
    """One frame's display values in stored form (H, W, C) uint8/uint16, or Unreadable."""
    return read_frames(fp, [frame], max_pixels, notes=notes)[0]


def read_frames(fp, frames: list, max_pixels: int, each=None, notes: list | None = None) -> list:
    """The display values of several frames of one file (or pydicom Dataset), each in stored
    form, decoding the file once and each wanted frame once: a 120-frame JPEG cine decoded
    the whole file for every frame (3.3 s a frame). The size and the frame count are checked
    from the header before any pixel is read (the frames against the file's size), then
    against the pixel data itself before any is decoded; a non-image SOP class is refused
    before it too. ``each``: applied to each frame as soon as it is decoded (an ingest
    shrinks it there, so a long cine is never held at full size). ``notes`` gets what the
    decoders said (chatter.py) when they said anything."""
    ds = fp if _is_dataset(fp) else header(fp)
    why = refusal(ds, max_pixels) or frame_refusal(ds, max_pixels, None if _is_dataset(fp) else _size(fp))
    if why:
        raise Unreadable(why)
    if not _is_dataset(fp):
        if hasattr(fp, "seek"):
            fp.seek(0)
        ds = header(fp, pixels=True)
    return render_frames(ds, frames, lambda x: (each or _same)(as_stored(x)), notes)


def _same(x):
    return x


def _size(fp) -> int | None:
    """The bytes a file (a path or an open file) holds: what its pixel data cannot exceed."""
    try:
        if hasattr(fp, "getbuffer"):
            return fp.getbuffer().nbytes
        return os.stat(fp).st_size if isinstance(fp, str | os.PathLike) else None
    except OSError:
        return None


def _is_dataset(x) -> bool:
    from pydicom.dataset import Dataset

    return isinstance(x, Dataset)


def render(ds, frame: int | None) -> np.ndarray:
    """Display values of one frame: (H, W) uint8/uint16 grey or (H, W, 3) RGB, or Unreadable."""
    return render_frames(ds, [frame])[0]


def render_frames(ds, frames: list, each=None, notes: list | None = None) -> list:
    """Display values of the given frames (None: the first), each decoded once and passed
    through ``each`` at once. The frame count is held against the pixel data first
    (data_refusal). What the decoders print is captured (chatter.py): on a failure it ends
    the sentence, otherwise it goes to ``notes``."""
    from pydicom.pixels import iter_pixels

    n = frame_count(ds)
    why = data_refusal(ds, n)
    if why:
        raise Unreadable(why)
    each = each or _same
    wanted = sorted({min(max(f or 0, 0), n - 1) for f in frames})
    _without_gdcm()
    said = None
    try:
        with chatter.captured() as said, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if n == 1:
                done = {0: each(_display(ds, ds.pixel_array))}
            else:  # one frame at a time: decoded, displayed and passed on before the next
                done = {i: each(_display(ds, arr)) for i, arr in zip(wanted, iter_pixels(ds, indices=wanted),
                                                                        strict=True)}
    except Unreadable as err:
        raise Unreadable(_with(str(err), said)) from None
    except Exception as err:  # pydicom raises many kinds for a missing codec or bad data
        raise Unreadable(_with(cannot_decode(ds, err), said)) from None
    if said and notes is not None:
        notes.append(f"the decoder said: {said.text}")
    return [done[min(max(f or 0, 0), n - 1)] for f in frames]


def _with(reason: str, said) -> str:
    return f"{reason} (the decoder said: {said.text})" if said else reason


@functools.cache
def _without_gdcm() -> None:
    """GDCM is kept as a decoder only where nothing else is installed for a syntax: on a
    corrupt JPEG its bundled libjpeg throws a C++ exception that nothing catches, and the
    whole process aborts (an upload took the service down; an ingest died with its report
    'running'). pylibjpeg and Pillow decode every syntax GDCM does here and fail in Python."""
    from pydicom.pixels.decoders.base import get_decoder

    for uid in DECODERS:
        with contextlib.suppress(Exception):  # a syntax this pydicom has no decoder for
            decoder = get_decoder(uid)
            if "gdcm" in decoder.available_plugins and len(decoder.available_plugins) > 1:
                decoder.remove_plugin("gdcm")


# Which installed package decodes a compressed transfer syntax (pydicom's pixel data
# handlers); medsim declares pylibjpeg's and GDCM's as dependencies.
DECODERS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg, python-gdcm or Pillow",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg or python-gdcm (12-bit: pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg or python-gdcm",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg or python-gdcm",
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg or python-gdcm",
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg or python-gdcm",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg, python-gdcm or Pillow",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg, python-gdcm or Pillow",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pydicom itself or pylibjpeg-rle",
}


def cannot_decode(ds, err: Exception) -> str:
    """One sentence: the transfer syntax, then either what would decode it (no decoder is
    installed) or what each installed decoder said (the data itself is at fault)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    name = f"{syntax.name} ({syntax})" if syntax else "an unknown transfer syntax"
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if "missing dependencies" in text or "no pixel data handlers" in text.lower() or "plugins are missing" in text:
        packages = DECODERS.get(str(syntax), "a decoder for it")
        return f"cannot decode its pixels ({name}): no decoder for it is installed; {packages} decodes it"
    return f"cannot decode its pixels ({name}): {text[:300]}"


def _display(ds, arr) -> np.ndarray:
    """One decoded frame -> display values (LUTs, MONOCHROME1 flipped, spread over 8 or 16 bits)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

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
