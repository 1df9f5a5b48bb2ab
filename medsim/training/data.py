"""Read images, labels and splits from Postgres into arrays for training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsim.errors import NotFound
from medsim.pixels import decode
from medsim.queries import Q, rows


@dataclass
class Split:
    ids: np.ndarray  # (N,) image ids, ascending
    dataset_ids: np.ndarray  # (N,)
    label_keys: np.ndarray  # (N,) one int per (dataset, label vector): "same diagnosis"
    labels: list  # (N,) label vectors as stored
    images: np.ndarray  # (N, S, S, 3) uint8; grey repeated to 3 channels
    flags: dict  # dataset_id -> MedMNIST flag

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class ImageRow:
    id: int
    dataset_id: int
    labels: list
    pixels: bytes
    height: int
    width: int
    channels: int


@dataclass
class DatasetFlag:
    id: int
    flag: str


def label_keys(dataset_ids: np.ndarray, labels: list) -> np.ndarray:
    keyed = [(int(d), tuple(lab)) for d, lab in zip(dataset_ids, labels, strict=True)]
    index = {k: i for i, k in enumerate(sorted(set(keyed)))}
    return np.array([index[k] for k in keyed], dtype=np.int64)


def load_split(conn, splits, flags=None, image_size: int = 28) -> Split:
    """All images of the given splits (and MedMNIST flags, default all) at one image size."""
    found = rows(conn, Q.load_images, {"splits": list(splits), "flags": flags, "size": image_size},
                 as_=ImageRow)
    if not found:
        raise NotFound(
            f"no {'/'.join(splits)} images at size {image_size}"
            + (f" for {', '.join(flags)}" if flags else "")
            + " in the database; run `medsim ingest` first"
        )
    ids = np.array([r.id for r in found], dtype=np.int64)
    ds = np.array([r.dataset_id for r in found], dtype=np.int64)
    labels = [r.labels for r in found]
    images = np.stack([decode(r.pixels, r.height, r.width, r.channels) for r in found])
    flag_map = {d.id: d.flag for d in rows(conn, Q.dataset_flags, as_=DatasetFlag)}
    return Split(ids, ds, label_keys(ds, labels), labels, images, flag_map)
