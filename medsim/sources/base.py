"""What every source of images gives medsim (MedMNIST files, folders, DICOM exports).

A source lists its entries first, cheaply (path, labels, split if it has one, patient,
study, metadata), so splits can be assigned over the whole archive, grouped by patient,
before any pixel is decoded; then it loads each entry's pixels on demand. An entry that
cannot be read becomes a Problem with its path and reason, never an exception that stops
the archive.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

import numpy as np

from medsim import settings
from medsim.errors import BadArgument, Unreadable

SPLITS = ("train", "val", "test")
PATIENT_KEY_ENV = "MEDSIM_PATIENT_KEY"


@dataclass
class Entry:
    path: str  # relative to the archive's root: how reports name it
    labels: tuple[str, ...]  # label names (several for multi-label)
    split: str | None = None  # given by the source, else assigned
    patient_id: str | None = None  # as the source gives it; only its keyed hash is stored
    study_id: str | None = None
    metadata: dict = field(default_factory=dict)
    frame: int | None = None  # for sources with several images per file (DICOM frames)
    patient_key: str | None = None  # the keyed hash, filled in by the ingest
    file: str | None = None  # the file, when `path` names one frame of it


@dataclass
class Loaded:
    """Pixels as they will be stored: (H, W, C) uint8 or uint16, C in {1, 3}."""

    pixels: np.ndarray
    original_size: tuple[int, int] | None = None  # (h, w) before shrinking to max_side
    metadata: dict = field(default_factory=dict)  # found while decoding (DICOM tags)


class Problem(Unreadable):
    """One entry cannot be used; the message is the reason the report shows. An image
    reader's Unreadable is the same thing, and sources catch both as Unreadable."""


def patient_hasher():
    """-> a function patient id -> keyed hash (HMAC-SHA256, hex). The key comes from the
    MEDSIM_PATIENT_KEY environment variable and is never written to the database: without
    it a stored hash cannot be linked back to an id, and with it the same patient gets the
    same hash in every archive (so deletion and patient filters work across datasets)."""
    key = settings.get().patient_key or ""
    if len(key) < 16:
        raise BadArgument(f"this archive has patient ids, which medsim stores only as a keyed hash: set "
                          f"{PATIENT_KEY_ENV} to a secret of at least 16 characters (keep it: the same key "
                          f"must be used for every later ingest, search filter and deletion)")

    def keyed(patient_id: str) -> str:
        return hmac.new(key.encode(), patient_id.strip().encode(), hashlib.sha256).hexdigest()

    return keyed
