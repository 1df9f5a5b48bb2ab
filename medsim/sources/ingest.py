"""Ingest MedMNIST .npz files into medsim.datasets / medsim.images.

One transaction per dataset: a failure leaves no partial dataset. Rows go in by binary
COPY; the payload is built with numpy in one pass (every row of a split has the same
layout), so the database, not Python, sets the pace.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np
import psycopg

from medsim import pgcopy
from medsim.errors import DataRefused
from medsim.images import perceptual
from medsim.queries import Q, one, rows, scalar
from medsim.sources import medmnist

INT2_OID = 21
CHUNK_ROWS = 2048


@dataclass
class IngestResult:
    flag: str
    added: int
    total: int
    official: bool
    md5: str
    read_s: float = 0.0
    copy_s: float = 0.0

    def line(self) -> str:
        status = "official md5" if self.official else f"UNOFFICIAL file (md5 {self.md5})"
        if self.added == 0:
            return f"{self.flag}: already ingested ({self.total} images, {status}); 0 added"
        rate = self.added / self.copy_s if self.copy_s else float("inf")
        return (
            f"{self.flag}: {self.added} images added ({status}); read {self.read_s:.2f}s, "
            f"COPY {self.copy_s:.2f}s ({rate:,.0f} images/s)"
        )


@dataclass
class ExistingDataset:
    id: int
    source_md5: str
    n_images: int


@dataclass
class SplitCount:
    """A line of the summary `medsim ingest` prints."""

    flag: str
    image_size: int
    md5_official: bool
    split: str
    n: int


def summary(conn, flags, size: int) -> list[SplitCount]:
    return rows(conn, Q.dataset_summary, {"flags": [f.lower() for f in flags], "size": size}, as_=SplitCount)


def copy_rows_dtype(split: str, n_labels: int, n_pixels: int) -> np.dtype:
    """Binary COPY tuple layout, in Q.copy_images column order, big-endian."""
    return np.dtype(
        [
            ("nfields", ">i2"),
            ("l_ds", ">i4"), ("dataset_id", ">i4"),
            ("l_split", ">i4"), ("split", f"S{len(split)}"),
            ("l_idx", ">i4"), ("split_index", ">i4"),
            # int2[] in binary: ndim, has_null, element oid, (size, lower bound), elements
            ("l_labels", ">i4"), ("ndim", ">i4"), ("has_null", ">i4"), ("oid", ">i4"),
            ("dim", ">i4"), ("lbound", ">i4"),
            ("labels", [("l", ">i4"), ("v", ">i2")], (n_labels,)),
            ("l_h", ">i4"), ("height", ">i4"),
            ("l_w", ">i4"), ("width", ">i4"),
            ("l_c", ">i4"), ("channels", ">i2"),
            ("l_pix", ">i4"), ("pixels", "u1", (n_pixels,)),
            ("l_sha", ">i4"), ("sha256", "u1", (32,)),
            ("l_phash", ">i4"), ("phash", ">i8"),
        ]
    )


def encode_copy_rows(dataset_id: int, split: str, images: np.ndarray, labels: np.ndarray,
                     start: int = 0) -> np.ndarray:
    """(N, H, W[, C]) uint8 images and (N, L) labels -> structured array of COPY tuples;
    split indexes run from `start`."""
    n = images.shape[0]
    h, w = images.shape[1:3]
    c = 1 if images.ndim == 3 else images.shape[3]
    flat = np.ascontiguousarray(images.reshape(n, h * w * c))
    n_labels = labels.shape[1]
    rows = np.zeros(n, dtype=copy_rows_dtype(split, n_labels, h * w * c))
    rows["nfields"] = 10
    rows["l_ds"], rows["dataset_id"] = 4, dataset_id
    rows["l_split"], rows["split"] = len(split), split.encode()
    rows["l_idx"], rows["split_index"] = 4, np.arange(start, start + n)
    rows["l_labels"] = 20 + 6 * n_labels
    rows["ndim"], rows["oid"], rows["dim"], rows["lbound"] = 1, INT2_OID, n_labels, 1
    rows["labels"]["l"], rows["labels"]["v"] = 2, labels.astype(np.int16)
    rows["l_h"], rows["height"], rows["l_w"], rows["width"] = 4, h, 4, w
    rows["l_c"], rows["channels"] = 2, c
    rows["l_pix"], rows["pixels"] = h * w * c, flat
    rows["l_sha"] = 32
    rows["sha256"] = np.frombuffer(b"".join(hashlib.sha256(x).digest() for x in flat),
                                   dtype=np.uint8).reshape(n, 32)
    rows["l_phash"], rows["phash"] = 8, perceptual.phashes(images if images.ndim == 4 else images[..., None])
    return rows


def copy_images(cur: psycopg.Cursor, dataset_id: int, v: medmnist.Verified, progress=None) -> None:
    """Encode and send in chunks: psycopg ships each chunk from a writer thread while the
    next one is hashed and encoded, so client and server work side by side."""
    with cur.copy(Q.copy_images) as copy:
        copy.write(pgcopy.HEADER)
        for split in medmnist.SPLITS:
            x, y = v.images[split], v.labels[split]
            for start in range(0, len(x), CHUNK_ROWS):
                xs, ys = x[start : start + CHUNK_ROWS], y[start : start + CHUNK_ROWS]
                copy.write(encode_copy_rows(dataset_id, split, xs, ys, start).tobytes())
                if progress is not None:
                    progress.update(len(xs))
        copy.write(pgcopy.TRAILER)


def already_there(conn, e: medmnist.Entry, v: medmnist.Verified) -> IngestResult | None:
    """The dataset as already ingested (0 added), None if absent; DataRefused if it came
    from a different file."""
    existing = one(conn, Q.dataset_by_flag, {"flag": e.flag, "size": e.size}, as_=ExistingDataset)
    if existing is None:
        return None
    if existing.source_md5 != v.md5:
        raise DataRefused(
            f"{e.flag} (size {e.size}) is already ingested from a different file (md5 "
            f"{existing.source_md5}, this file {v.md5}); refusing to mix them. Delete the dataset first "
            f"(DELETE FROM medsim.datasets WHERE id = {existing.id}) to replace it."
        )
    return IngestResult(e.flag, 0, existing.n_images, v.official, v.md5)


def ingest_verified(conn: psycopg.Connection, e: medmnist.Entry, v: medmnist.Verified, show_progress=True) -> IngestResult:
    try:
        return _ingest_verified(conn, e, v, show_progress)
    except psycopg.errors.UniqueViolation:
        # Two ingests of the same subset at once: the other committed first, and ours
        # rolled back whole. Its rows are the same file's (or we say so): report them.
        found = already_there(conn, e, v)
        if found is None:
            raise
        return found


def _ingest_verified(conn, e: medmnist.Entry, v: medmnist.Verified, show_progress: bool) -> IngestResult:
    total = sum(len(v.images[s]) for s in medmnist.SPLITS)
    with conn.transaction():
        found = already_there(conn, e, v)
        if found is not None:
            return found
        ds_id = scalar(
            conn, Q.insert_dataset,
            {
                "flag": e.flag, "size": e.size, "python_class": e.python_class,
                "description": e.description, "task": e.task, "n_channels": e.n_channels,
                "label_names": json.dumps(e.label_names), "n_samples": json.dumps(e.n_samples),
                "license": e.license, "url": e.url, "source_file": str(v.path),
                "source_md5": v.md5, "official_md5": e.md5, "md5_official": v.official,
            },
        )
        from tqdm import tqdm

        t0 = time.perf_counter()
        with conn.cursor() as cur, tqdm(
            total=total, desc=f"COPY {e.flag}", unit="img", disable=not show_progress, leave=False
        ) as bar:
            copy_images(cur, ds_id, v, bar)
        copy_s = time.perf_counter() - t0
    # planner statistics right after a bulk load: without them the split filter was
    # estimated at 8% of its real size and similarity queries skipped the HNSW index
    conn.execute("ANALYZE medsim.images")
    return IngestResult(e.flag, total, total, v.official, v.md5, copy_s=copy_s)


def ingest(conn, flag: str, size: int = 28, data_dir=None, accept_unofficial=False,
           allow_download=True, show_progress=True) -> IngestResult:
    """Locate, verify and load one subset. Raises DataMissing / DataRefused / BadArgument."""
    e = medmnist.entry(flag, size)
    t0 = time.perf_counter()
    path = medmnist.locate(e, data_dir, allow_download=allow_download)
    v = medmnist.verify(e, path, accept_unofficial=accept_unofficial)
    read_s = time.perf_counter() - t0
    result = ingest_verified(conn, e, v, show_progress=show_progress)
    result.read_s = read_s
    return result


def backfill_phashes(conn, batch: int = 1000) -> int:
    """Perceptual hashes for rows stored without one (before revision 0021) -> how many.
    One transaction per batch, so an interrupted run keeps what it did and resumes; a row
    stored broken gets none (it could never be a query's match)."""
    from medsim.images import StoredRow

    done, after = 0, 0
    while True:
        with conn.transaction():
            got = rows(conn, Q.images_without_phash, {"after": after, "n": batch}, as_=StoredRow)
            if not got:
                return done
            ids, hashes = [], []
            for r in got:
                try:
                    hashes.append(perceptual.phash(r.array()))
                    ids.append(r.id)
                except ValueError:
                    continue
            conn.execute(Q.set_phashes, {"ids": ids, "phashes": hashes})
        done += len(ids)
        after = got[-1].id
