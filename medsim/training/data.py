"""Read images, labels and splits from Postgres into arrays for training and evaluation."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import numpy as np
from psycopg.rows import class_row

from medsim.errors import NotFound
from medsim.images import StoredRow
from medsim.queries import Q, rows

CHUNK = 256  # rows per fetch from Postgres while the uint8 cache is built


@dataclass
class Split:
    ids: np.ndarray  # (N,) image ids, ascending
    dataset_ids: np.ndarray  # (N,)
    label_keys: np.ndarray  # (N,) one int per (dataset, label vector): "same diagnosis"
    labels: list  # (N,) label vectors as stored
    images: np.ndarray  # (N, S, S, 3) uint8: the model's input (medsim.images.model_input)
    flags: dict  # dataset_id -> MedMNIST flag
    skipped: list = field(default_factory=list)  # (image id, reason): rows that cannot be used
    tasks: dict = field(default_factory=dict)  # dataset_id -> task ("ordinal-regression", ...)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def grades(self) -> np.ndarray:
        """(N,) the label as a grade for ordinal subsets (RetinaMNIST's 0-4), else -1."""
        return np.array([int(lab[0]) if self.tasks.get(int(d)) == "ordinal-regression" and len(lab) == 1 else -1
                         for d, lab in zip(self.dataset_ids, self.labels, strict=True)], dtype=np.int64)


@dataclass
class ImageRow(StoredRow):
    dataset_id: int
    labels: list


@dataclass
class DatasetFlag:
    id: int
    flag: str
    task: str


def label_keys(dataset_ids: np.ndarray, labels: list) -> np.ndarray:
    """One int per (dataset, label vector): "the same diagnosis" is equal keys, compared
    across splits (val and test queries against the train gallery) and across datasets.
    So a key depends on the pair alone, never on which pairs a split happens to hold: it
    used to be a position in one split's own sorted set, and a val split without one of
    train's classes shifted every key after it (val mAP@5 0.0000 on a real archive)."""
    return np.array([_label_key(int(d), tuple(int(x) for x in lab)) for d, lab in zip(dataset_ids, labels, strict=True)],
                    dtype=np.int64)


@functools.lru_cache(maxsize=65536)
def _label_key(dataset_id: int, labels: tuple) -> int:
    # the dataset id in the high bits, 40 bits of a hash of the label vector below: distinct
    # datasets never share a key, and two label vectors of one dataset collide with
    # probability ~1e-12 per pair
    digest = hashlib.blake2b(repr(labels).encode(), digest_size=5).digest()
    return (dataset_id << 40) | int.from_bytes(digest, "big")


def load_split(conn, splits, flags=None, image_size: int = 28, input_size: int | None = None) -> Split:
    """All images of the given splits (and datasets, default all) as the network's input
    (medsim.images.model_input) at input_size (default image_size). image_size says which
    MedMNIST size to read (each size is its own dataset); archive images come at any size.
    Every image is resized by the one resize path when its size is not input_size."""
    input_size = input_size or image_size
    params = {"splits": list(splits), "flags": flags, "size": image_size}
    usable, images, skipped, seen = [], [], [], 0
    # A server-side cursor, CHUNK rows at a time: the stored pixels (a 512 px archive's are
    # ~0.8 MB an image) never sit in memory all at once, only the uint8 cache at input size.
    with conn.transaction(), conn.cursor(name="medsim_load_split", row_factory=class_row(ImageRow)) as cur:
        cur.itersize = CHUNK
        cur.execute(Q.load_images, params)
        for r in cur:
            seen += 1
            # one broken row is skipped and named, never the end of training or evaluation
            try:
                x = r.model_input(input_size)
            except ValueError as err:
                skipped.append((r.id, str(err)))
                continue
            r.pixels = b""  # decoded: the row keeps its id and labels only
            usable.append(r)
            images.append(x)
    if not seen:
        raise NotFound(
            f"no {'/'.join(splits)} images at size {image_size}"
            + (f" for {', '.join(flags)}" if flags else "")
            + f" in the database; a MedMNIST subset: `medsim ingest {' '.join(flags) if flags else 'FLAG'}"
            + (f" --size {image_size}" if image_size in (64, 128, 224) else "") + "`; an archive of your own: "
            "`medsim ingest-folder DIR --name NAME` (its manifest may give each image its split)"
        )
    if not usable:
        raise NotFound(f"none of the {seen} {'/'.join(splits)} images can be used "
                       f"(e.g. image {skipped[0][0]}: {skipped[0][1]})")
    ids = np.array([r.id for r in usable], dtype=np.int64)
    ds = np.array([r.dataset_id for r in usable], dtype=np.int64)
    labels = [r.labels for r in usable]
    found_ds = rows(conn, Q.dataset_flags, as_=DatasetFlag)
    return Split(ids, ds, label_keys(ds, labels), labels, np.stack(images), {d.id: d.flag for d in found_ds},
                 skipped, {d.id: d.task for d in found_ds})


def describe_skipped(skipped: list, limit: int = 5) -> str:
    shown = "; ".join(f"image {i}: {why}" for i, why in skipped[:limit])
    return f"skipped {len(skipped)} image(s) that cannot be used ({shown}{'; ...' if len(skipped) > limit else ''})"
