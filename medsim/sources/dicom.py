"""DICOM files (a PACS export): what an archive lists of them, and their pixels.

Pixels are rendered by medsim.images.dicom (the Modality and VOI LUTs, MONOCHROME1, one
image per frame). This module decides what an archive keeps of a file.

Privacy: of all the tags, only these are kept, as filterable metadata: Modality,
BodyPartExamined, ViewPosition, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID.
PatientID is stored only as a keyed hash (sources/base.py); names, birth dates and every
other tag are dropped.
"""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

from medsim import images, settings
from medsim.errors import Unreadable
from medsim.images import dicom as render
from medsim.sources.base import Entry, Loaded, Problem

KEPT_TAGS = ("Modality", "BodyPartExamined", "ViewPosition", "StudyInstanceUID", "SeriesInstanceUID",
             "SOPInstanceUID")


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in images.files.DICOM_SUFFIXES:
        return True
    if path.suffix:
        return False
    try:  # PACS exports often have no suffix: the preamble's "DICM" says it
        with open(path, "rb") as f:
            return images.sniff(f.read(132)) == "dicom"
    except OSError:
        return False


def entries(path: Path, rel: str, labels: tuple | None, label_tag: str | None) -> list[Entry]:
    """One entry per frame, from the header alone; the frame count is bounded first
    (images/dicom_frames.py), against the file's size, before an entry is made for one."""
    ds = render.header(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _entries(ds, rel, labels, label_tag, _size(path))
    except Unreadable:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as err:  # tags parse lazily
        raise Problem(f"a malformed header ({type(err).__name__}: {err})") from None


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _entries(ds, rel: str, labels: tuple | None, label_tag: str | None, size: int | None = None) -> list[Entry]:
    # the header alone (pixels not read): an image has Rows and Columns, and a SOP class
    # that is a picture (a segmentation or a dose grid has Rows too)
    render.refuse_non_image(ds)
    if not ds.get("Rows") or not ds.get("Columns"):
        raise Problem(f"no image in it (a {ds.get('Modality') or 'non-image'} object)")
    why = render.frame_refusal(ds, settings.get().max_image_pixels, size)
    if why:
        raise Problem(why)
    if label_tag:
        value = str(ds.get(label_tag, "") or "").strip()
        if not value:
            raise Problem(f"no {label_tag} to label it with")
        labels = (value,)
    meta = {t: str(ds.get(t)) for t in KEPT_TAGS if ds.get(t) not in (None, "")}
    frames = render.frame_count(ds)
    patient = str(ds.get("PatientID", "") or "").strip() or None
    study = meta.get("StudyInstanceUID")
    # a frame's index is kept (medsim keys locate finds its file by it: the path is keyed)
    return [Entry(rel if frames == 1 else f"{rel}#frame{i}", labels, None, patient, study,
                  dict(meta) if frames == 1 else {**meta, "frame": i}, frame=i if frames > 1 else None)
            for i in range(frames)]


def load_entries(source, group: list[Entry], max_side: int) -> list[Loaded]:
    """The frames of one file (a path, its bytes, or a pydicom Dataset), the file decoded
    once however many frames it has, each shrunk as soon as it is decoded. What a decoder
    printed is the first frame's note (the file's report line), not the terminal's."""
    notes: list[str] = []
    out = images.read_dicom_frames(source, [e.frame for e in group], each=partial(Loaded.shrunk, max_side=max_side),
                                   notes=notes)
    if notes and out:
        out[0].note = "; ".join(notes)
    return out
