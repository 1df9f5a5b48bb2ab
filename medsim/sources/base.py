"""What every source of images gives medsim (MedMNIST files, folders, DICOM exports).

A source lists its entries first, cheaply (path, labels, split if it has one, patient,
study, metadata), so splits can be assigned over the whole archive, grouped by patient,
before any pixel is decoded; then it loads each entry's pixels on demand. An entry that
cannot be read becomes a Problem with its path and reason, never an exception that stops
the archive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medsim.errors import Unreadable

SPLITS = ("train", "val", "test")


@dataclass
class Entry:
    path: str  # relative to the archive's root: how reports name it
    labels: tuple[str, ...]  # label names (several for multi-label)
    split: str | None = None  # given by the source, else assigned
    patient_id: str | None = None  # as the source gives it; only its keyed hash is stored (keys.py)
    study_id: str | None = None
    metadata: dict = field(default_factory=dict)
    frame: int | None = None  # for sources with several images per file (DICOM frames)
    patient_key: str | None = None  # the keyed hash, filled in by the ingest
    file: str | None = None  # the file, when `path` names one frame of it
    stamp: tuple | None = None  # the file's (size, mtime_ns, sha256) as read for this ingest (ledger.py)


@dataclass
class Loaded:
    """Pixels as they will be stored: (H, W, C) uint8 or uint16, C in {1, 3}."""

    pixels: np.ndarray
    original_size: tuple[int, int] | None = None  # (h, w) before shrinking to max_side
    metadata: dict = field(default_factory=dict)  # found while decoding (DICOM tags)
    stamp: tuple | None = None  # the file's (size, mtime_ns, sha256), read with the same bytes
    note: str | None = None  # what a decoder printed while decoding it: its report line, not the terminal

    @classmethod
    def shrunk(cls, x: np.ndarray, max_side: int) -> Loaded:
        """Stored-form pixels shrunk to max_side on the longest side, the size before recorded
        when it was larger: what every source stores of an image it decoded."""
        from medsim import images

        original = x.shape[:2] if max(x.shape[:2]) > max_side else None
        return cls(images.shrink(x, max_side), original)


class Problem(Unreadable):
    """One entry cannot be used; the message is the reason the report shows. An image
    reader's Unreadable is the same thing, and sources catch both as Unreadable."""
