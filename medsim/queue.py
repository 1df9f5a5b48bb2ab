"""The embedding work queue: what is pending for which model, claims, results, failures.

Every statement the worker runs is a function here (procrastinate's manager/worker split:
the worker never writes SQL). The queries themselves, with the reasoning behind each
lock, are in queries.sql under the names used below.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import psycopg

from medsim import pgcopy
from medsim.images import StoredRow
from medsim.queries import Q, rows, scalar

ENQUEUE_RETRIES = 5


@dataclass
class StatusRow:
    """medsim.embedding_status: one model and dataset."""

    model_id: int
    model_name: str
    is_current: bool
    dataset: str
    total: int
    embedded: int
    pending: int
    failed: int
    oldest_pending: datetime | None

    @property
    def note(self) -> str | None:
        """The row in a sentence when something is not embedded yet (pending or failed)."""
        missing = self.total - self.embedded
        return not_embedded_sentence(self.model_id, self.dataset, missing, self.total, self.failed) if missing else None


@dataclass
class Missing:
    """A dataset's images (in some splits) that a model has not embedded yet."""

    dataset: str
    missing: int  # waiting, failed, or not queued yet
    failed: int  # of those, failed for good (medsim status lists why)
    total: int  # the dataset's images in those splits


def not_embedded_sentence(model_id: int, dataset: str, missing: int, total: int, failed: int = 0) -> str:
    """The one wording of a partial state, for every door (search notes, status)."""
    return (f"{missing} of {total} images of {dataset} are not embedded yet for model {model_id} (run `medsim worker`)"
            + (f"; {failed} of them failed (`medsim status` lists why)" if failed else ""))


@dataclass
class Failure:
    model_id: int
    image_id: int
    attempts: int
    last_error: str
    failed_at: datetime | None


def enqueue(conn, model_id: int) -> int:
    """Queue every image model_id has not embedded yet (idempotent) -> rows added.

    Holds the model's queue lock exclusively so no worker batch is in flight while the
    "not embedded yet" set is computed (see Q.lock_queue_shared for the race it closes).
    Inside an outer transaction this is a savepoint: the lock is then held until the
    outer transaction ends. The outer transaction must be READ COMMITTED (the default).

    An image deleted while it is being queued (its deletion commits between this
    statement's snapshot and its foreign-key check) fails the statement; it runs again
    without it, a few times at most.
    """
    for attempt in range(ENQUEUE_RETRIES):
        try:
            with conn.transaction():
                conn.execute(Q.lock_queue_exclusive, {"model_id": model_id})
                return conn.execute(Q.enqueue_model, {"model_id": model_id}).rowcount
        except psycopg.errors.ForeignKeyViolation:
            if attempt == ENQUEUE_RETRIES - 1:
                raise


def pending_count(conn, model_id: int) -> int:
    return scalar(conn, Q.pending_count, {"model_id": model_id})


def embedded_count(conn, model_id: int) -> int:
    return scalar(conn, Q.count_model_embeddings, {"model_id": model_id})


def status(conn, model_id: int | None = None) -> list[StatusRow]:
    return rows(conn, Q.embedding_status, {"model_id": model_id}, as_=StatusRow)


def not_embedded(conn, model_id: int, splits) -> list[Missing]:
    """Per dataset the caller may see, the model's images in these splits without an
    embedding: cheap where little is missing (Q.not_embedded_by_dataset says how)."""
    mark = scalar(conn, Q.not_embedded_mark, {"model_id": model_id})
    return rows(conn, Q.not_embedded_by_dataset, {"model_id": model_id, "mark": mark, "splits": list(splits)},
                as_=Missing)


def failures(conn, model_id: int | None = None) -> list[Failure]:
    return rows(conn, Q.failures, {"model_id": model_id}, as_=Failure)


# ------------------------------------------------------------------ a worker's batch
# Each of these runs inside the batch's one transaction (medsim.worker.batch), in this
# order: claim -> lock_for_write -> write_embeddings -> dequeue -> record_failure.
def claim(conn, model_id: int, batch_size: int) -> list[StoredRow]:
    """Lock up to batch_size due queue rows of the model (FOR UPDATE SKIP LOCKED) and
    return their images' pixels. Why this is safe: Q.claim_batch."""
    return rows(conn, Q.claim_batch, {"model_id": model_id, "batch_size": batch_size}, as_=StoredRow)


def lock_for_write(conn, model_id: int) -> None:
    """The model's row, shared, from now to commit: no enqueue may overlap a batch that
    has written but not committed (Q.lock_queue_shared says why, and why not earlier)."""
    conn.execute(Q.lock_queue_shared, {"model_id": model_id})


def write_embeddings(conn, model_id: int, ids: list[int], vectors: np.ndarray) -> None:
    """Binary COPY of (model_id, image_id, embedding) rows."""
    with conn.cursor() as cur, cur.copy(Q.copy_embeddings) as copy:
        copy.write(pgcopy.HEADER)
        copy.write(pgcopy.embeddings_rows(model_id, ids, vectors))
        copy.write(pgcopy.TRAILER)


def dequeue(conn, model_id: int, ids: list[int]) -> None:
    conn.execute(Q.dequeue, {"model_id": model_id, "ids": ids})


def record_failure(conn, model_id: int, image_id: int, error: str, delay_s: float, max_attempts: int) -> bool:
    """One more failed attempt for the image (exponential backoff) -> True when that was
    its last (failed for good, no longer claimed)."""
    return bool(scalar(conn, Q.record_failure, {"model_id": model_id, "image_id": image_id, "error": error,
                                                "delay_s": delay_s, "max_attempts": max_attempts}))


def drop_embedded(conn, model_id: int) -> int:
    """Queue rows whose embedding already exists (a COPY would fail on them) -> dropped."""
    return conn.execute(Q.drop_embedded_from_queue, {"model_id": model_id}).rowcount


def workers_on_host(conn, application_name: str) -> int:
    """Connections with this application name (medsim workers on one host, this one included)."""
    return scalar(conn, Q.workers_on_host, {"app": application_name}) or 1


def refresh_statistics(conn) -> None:
    """ANALYZE the embeddings after a drain: a bulk load leaves the planner no statistics."""
    conn.execute(Q.analyze_embeddings)


def listen(conn) -> None:
    """New images NOTIFY medsim_images (sql/002_embeddings.sql): a sleeping worker wakes."""
    conn.execute(Q.listen_images)
