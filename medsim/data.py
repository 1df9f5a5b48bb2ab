"""Read images, labels and splits from Postgres into arrays for training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsim.queries import Q


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


def decode(pixels: bytes, h: int, w: int, c: int) -> np.ndarray:
    """Stored bytes -> (h, w, 3) uint8. Raises ValueError on anything inconsistent."""
    if c not in (1, 3):
        raise ValueError(f"unsupported channel count {c}")
    if len(pixels) != h * w * c:
        raise ValueError(f"pixel data is {len(pixels)} bytes, expected {h}x{w}x{c} = {h * w * c}")
    x = np.frombuffer(pixels, np.uint8).reshape(h, w, c)
    return np.repeat(x, 3, axis=2) if c == 1 else x


def label_keys(dataset_ids: np.ndarray, labels: list) -> np.ndarray:
    keyed = [(int(d), tuple(lab)) for d, lab in zip(dataset_ids, labels, strict=True)]
    index = {k: i for i, k in enumerate(sorted(set(keyed)))}
    return np.array([index[k] for k in keyed], dtype=np.int64)


def load_split(conn, splits, flags=None, image_size: int = 28) -> Split:
    """All images of the given splits (and MedMNIST flags, default all) at one image size."""
    rows = conn.execute(Q.load_images, {"splits": list(splits), "flags": flags,
                                        "size": image_size}).fetchall()
    if not rows:
        raise LookupError(
            f"no {'/'.join(splits)} images at size {image_size}"
            + (f" for {', '.join(flags)}" if flags else "")
            + " in the database; run `medsim ingest` first"
        )
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    ds = np.array([r[1] for r in rows], dtype=np.int64)
    labels = [r[2] for r in rows]
    images = np.stack([decode(r[3], r[4], r[5], r[6]) for r in rows])
    flag_map = dict(conn.execute(Q.dataset_flags).fetchall())
    return Split(ids, ds, label_keys(ds, labels), labels, images, flag_map)
