"""Read images, labels and splits from Postgres into arrays for training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medsim.errors import NotFound
from medsim.pixels import StoredRow
from medsim.queries import Q, rows


@dataclass
class Split:
    ids: np.ndarray  # (N,) image ids, ascending
    dataset_ids: np.ndarray  # (N,)
    label_keys: np.ndarray  # (N,) one int per (dataset, label vector): "same diagnosis"
    labels: list  # (N,) label vectors as stored
    images: np.ndarray  # (N, S, S, 3) uint8; grey repeated to 3 channels
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
    keyed = [(int(d), tuple(lab)) for d, lab in zip(dataset_ids, labels, strict=True)]
    index = {k: i for i, k in enumerate(sorted(set(keyed)))}
    return np.array([index[k] for k in keyed], dtype=np.int64)


def load_split(conn, splits, flags=None, image_size: int = 28) -> Split:
    """All images of the given splits (and datasets, default all) as image_size x image_size:
    MedMNIST datasets of that size, archive images resized to it."""
    found = rows(conn, Q.load_images, {"splits": list(splits), "flags": flags, "size": image_size},
                 as_=ImageRow)
    if not found:
        raise NotFound(
            f"no {'/'.join(splits)} images at size {image_size}"
            + (f" for {', '.join(flags)}" if flags else "")
            + " in the database; run `medsim ingest` first"
        )
    usable, images, skipped = [], [], []
    for r in found:
        # one broken row is skipped and named, never the end of training or evaluation
        try:
            x = r.decode()
            if x.shape[:2] != (image_size, image_size):
                x = resize(x, image_size)  # archives: any size; the network's input is one size
        except Exception as err:
            skipped.append((r.id, str(err)))
            continue
        usable.append(r)
        images.append(x)
    if not usable:
        raise NotFound(f"none of the {len(found)} {'/'.join(splits)} images can be used "
                       f"(e.g. image {skipped[0][0]}: {skipped[0][1]})")
    ids = np.array([r.id for r in usable], dtype=np.int64)
    ds = np.array([r.dataset_id for r in usable], dtype=np.int64)
    labels = [r.labels for r in usable]
    found_ds = rows(conn, Q.dataset_flags, as_=DatasetFlag)
    return Split(ids, ds, label_keys(ds, labels), labels, np.stack(images), {d.id: d.flag for d in found_ds},
                 skipped, {d.id: d.task for d in found_ds})


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3), bilinear (the network's own resize at its input)."""
    from PIL import Image

    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"empty image ({x.shape[0]}x{x.shape[1]})")
    return np.asarray(Image.fromarray(np.ascontiguousarray(x)).resize((size, size), Image.Resampling.BILINEAR))


def describe_skipped(skipped: list, limit: int = 5) -> str:
    shown = "; ".join(f"image {i}: {why}" for i, why in skipped[:limit])
    return f"skipped {len(skipped)} image(s) that cannot be used ({shown}{'; ...' if len(skipped) > limit else ''})"
