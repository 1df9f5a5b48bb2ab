"""One batch of the embedding queue: one transaction, read top to bottom.

    claim (FOR UPDATE SKIP LOCKED) -> decode -> embed -> lock the model row (shared)
    -> COPY the vectors -> dequeue -> record failures -> commit

A crash anywhere rolls everything back and the images are simply claimable again (the
claim's docstring in queries.sql says why that is safe with any number of workers). The
SQL is the queue module's; this module decides what happens to each image.

Only two kinds of trouble stay with an image: a row that cannot be decoded, and an
ImageFailure raised around the network's forward pass (the batch is bisected to find the
image it belongs to). Anything else (a lost connection, a lock timeout, a bug) leaves the
transaction, rolls it back, and is the caller's: a bug stops the worker with its traceback.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from medsim import queue


class ImageFailure(Exception):
    """The network cannot take these images (raised by the embed function around the
    forward pass; the batch is bisected to find the image it belongs to)."""


@dataclass
class Job:
    """What every batch of one worker shares."""

    model_id: int
    input_size: int  # the network's input (medsim.images.model_input)
    dim: int
    embed: Callable[[np.ndarray], np.ndarray]  # (n, S, S, 3) uint8 -> (n, dim) float32, or ImageFailure
    batch_size: int
    retry_delay_s: float
    max_attempts: int
    throttle_s: float = 0.0
    # held around the forward pass: with two lanes (prefetch) one batch is embedded while the
    # other is claimed, decoded and written, never both embedded at once
    compute: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)


@dataclass
class Result:
    claimed: int = 0
    embedded: int = 0
    failures: list = field(default_factory=list)  # (image id, error, final)
    seconds: dict = field(default_factory=dict)  # wall seconds per stage


def one_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:500]


def run_batch(conn, job: Job) -> Result:
    """Claim, embed and write one batch in one transaction -> what happened (committed)."""
    r = Result()
    t = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t
        now = time.perf_counter()
        r.seconds[stage] = r.seconds.get(stage, 0.0) + now - t
        t = now

    with conn.transaction():
        claimed = queue.claim(conn, job.model_id, job.batch_size)
        lap("claim")
        r.claimed = len(claimed)
        if not claimed:
            return r
        items, bad = decode(claimed, job.input_size)
        lap("decode")
        with job.compute:
            ids, vectors, failed = embed_items(job.embed, items, job.dim)
        lap("embed")
        # The model's row, shared, from here to commit: the window in which this batch has
        # written embeddings and deleted its queue rows without committing, which an enqueue
        # must not overlap (Q.lock_queue_shared). Taken here, not at the claim: a prefetching
        # worker's two overlapping batches would otherwise hold it without a gap and starve
        # every enqueue (seen in testing: three of four workers waited out their start-up).
        queue.lock_for_write(conn, job.model_id)
        if ids:
            queue.write_embeddings(conn, job.model_id, ids, vectors)
        lap("copy")
        queue.dequeue(conn, job.model_id, ids)
        for image_id, error in bad + failed:
            final = queue.record_failure(conn, job.model_id, image_id, error, job.retry_delay_s, job.max_attempts)
            r.failures.append((image_id, error, final))
        lap("dequeue")
        if job.throttle_s:
            # written but not committed: the widest window for a crash or a race
            time.sleep(job.throttle_s)
    lap("commit")  # (and the --throttle pause, when set)
    r.embedded = len(ids)
    return r


def decode(claimed: list, size: int) -> tuple[list, list]:
    """Claimed rows -> ([(image id, model input)], [(image id, error)]): a row stored broken
    (a 0x0 image, truncated bytes) stays with that row."""
    items, bad = [], []
    for row in claimed:
        try:
            items.append((row.id, row.model_input(size)))
        except ValueError as err:
            bad.append((row.id, f"undecodable image: {one_line(err)}"))
    return items, bad


def embed_items(embed, items: list, dim: int) -> tuple[list[int], np.ndarray, list]:
    """-> (ids written, their vectors, [(image id, error)]). An ImageFailure of the whole
    batch is bisected: an image the network cannot take is found in log2(batch) steps and
    the rest is still written. If every image fails on its own, the images are not the
    problem: the first one's failure is raised again, with its cause (a bug keeps its
    traceback instead of becoming a failure row per image)."""
    ids, vectors, failed = _bisect(embed, items, dim)
    if len(items) > 1 and len(failed) == len(items) and all(e.startswith("cannot embed") for _, e in failed):
        embed(np.stack([items[0][1]]))
    return ids, vectors, failed


def _bisect(embed, items: list, dim: int):
    if not items:
        return [], np.zeros((0, dim), np.float32), []
    try:
        v = embed(np.stack([x for _, x in items]))
    except ImageFailure as err:
        if len(items) == 1:
            return [], np.zeros((0, dim), np.float32), [(items[0][0], f"cannot embed: {one_line(err)}")]
        half = len(items) // 2
        a, b = _bisect(embed, items[:half], dim), _bisect(embed, items[half:], dim)
        return a[0] + b[0], np.concatenate([a[1], b[1]]), a[2] + b[2]
    finite = np.isfinite(v).all(axis=1)
    ids = [i for (i, _), ok in zip(items, finite, strict=True) if ok]
    bad = [(i, "non-finite embedding") for (i, _), ok in zip(items, finite, strict=True) if not ok]
    return ids, v[finite], bad


def forward(rt) -> Callable[[np.ndarray], np.ndarray]:
    """The network's runtime (medsim.model.runtime) as a batch's embed function: model
    inputs -> vectors, with what it raises for inputs it cannot take turned into
    ImageFailure (bisected by embed_items)."""

    def embed(x: np.ndarray) -> np.ndarray:
        try:
            return rt.embed(x)
        except (RuntimeError, ValueError) as err:
            raise ImageFailure(f"{type(err).__name__}: {one_line(err)}") from err

    return embed
