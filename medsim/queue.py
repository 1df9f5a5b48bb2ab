"""The embedding work queue: what is pending for which model, and how far it has got.

The worker (medsim.embed_worker) claims from it; this module fills it and reports on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from medsim.queries import Q, rows, scalar


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
    """
    with conn.transaction():
        conn.execute(Q.lock_queue_exclusive, {"model_id": model_id})
        return conn.execute(Q.enqueue_model, {"model_id": model_id}).rowcount


def pending_count(conn, model_id: int) -> int:
    return scalar(conn, Q.pending_count, {"model_id": model_id})


def status(conn, model_id: int | None = None) -> list[StatusRow]:
    return rows(conn, Q.embedding_status, {"model_id": model_id}, as_=StatusRow)


def failures(conn, model_id: int | None = None) -> list[Failure]:
    return rows(conn, Q.failures, {"model_id": model_id}, as_=Failure)
