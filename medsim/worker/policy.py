"""A worker's decisions that are not a batch: how many threads torch gets, whether a
backlog is loaded without the model's HNSW index, and what happens once the queue drains."""

from __future__ import annotations

import logging
import os
import time

import psycopg

from medsim import queue, settings
from medsim.search import pgvector_hnsw

log = logging.getLogger("medsim.worker")

# How many images make a bulk load: with the index in place each insert walks the HNSW
# graph (ef_construction 200). Measured on 2 cores, 64-d: 340 images/s into a model with
# its index against 4,117 without (2.7 ms more per image), while a rebuild costs about
# 0.64 ms per image the model holds (306k in 196 s). Dropping pays off once the backlog
# is about a quarter of the total.
BULK_SHARE = 0.25


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Threads:
    """Torch threads: --threads if given; OMP_NUM_THREADS if set; else this host's cores
    divided among the medsim workers on it (every worker's torch used to take every core:
    4 workers on 2 cores ran 2.2x slower than one). Re-counted every 30 s."""

    EVERY_S = 30.0

    def __init__(self, wanted: int | None, application_name: str):
        self.wanted, self.app = wanted, application_name
        self.now, self.checked = None, 0.0
        self.runtime = None  # the model's runtime (an ONNX Runtime session has its own pool)

    def runtime_for(self, net, runtime: str | None, device: str, keep_as: str | None = None):
        """The network's runtime (medsim.model.runtime), kept so that fit() sizes its pool.
        ``keep_as``: the checkpoint's sha256, under which an ONNX export is kept on disk
        (runtime.keep), so that a search by file from the shell needs no torch."""
        # imported here, not at the top: main() installs the SIGTERM handler first, so a stop
        # during the 2-3 s torch import is a clean exit 0 and not a kill
        from medsim.model import runtime as runtimes

        self.runtime = runtimes.prepare(net, runtime, threads=self.now or 1, device=device)
        if keep_as is not None:
            runtimes.keep(self.runtime, keep_as)
        return self.runtime

    def fit(self, conn, force: bool = False) -> int:
        import torch

        if not force and time.monotonic() - self.checked < self.EVERY_S:
            return self.now
        self.checked = time.monotonic()
        if self.wanted is not None:
            want = self.wanted
        elif settings.get().omp_threads:
            want = torch.get_num_threads()  # the user's setting, which torch already read
        else:
            want = max(1, available_cores() // queue.workers_on_host(conn, self.app))
        if want != self.now:
            torch.set_num_threads(want)
            if self.runtime is not None:
                self.runtime.set_threads(want)
            if self.now is not None:
                log.info("torch threads %d -> %d", self.now, want)
            self.now = want
        return want


def drop_index_for_bulk_load(conn, model_id: int, pending: int, threshold: int) -> bool:
    """A large backlog into a model that has its HNSW index: drop the index now and rebuild
    it after the drain -> True if dropped. Searches meanwhile run exact."""
    if not threshold or pending < threshold or not pgvector_hnsw.exists(conn, model_id):
        return False
    held = queue.embedded_count(conn, model_id)
    if pending < BULK_SHARE * (held + pending):
        return False
    try:
        dropped = pgvector_hnsw.drop(conn, model_id)
    except psycopg.errors.LockNotAvailable:
        log.info("HNSW index not dropped for the bulk load: another session holds its lock")
        return False
    if dropped:
        log.info("%d images pending, %d embedded: dropped HNSW index %s for the bulk load; it is rebuilt once "
                 "the queue drains", pending, held, pgvector_hnsw.index_name(model_id))
    return dropped


def after_drain(conn, model_id: int, dim: int, embedded_any: bool, build_index: bool) -> None:
    """Once the queue is empty: fresh planner statistics (a bulk load leaves none, and the
    exact-search plans were 4x slower without them), then the model's HNSW index if it is
    missing (pgvector: build it after the bulk load, not row by row)."""
    if embedded_any:
        queue.refresh_statistics(conn)
    if not build_index or queue.pending_count(conn, model_id):
        return
    try:
        if pgvector_hnsw.ensure(conn, model_id, dim):
            log.info("built HNSW index %s", pgvector_hnsw.index_name(model_id))
    except psycopg.errors.LockNotAvailable:
        # another worker is building it (it holds the model's row), or a long write is
        # under way: the index is that process's job, not a reason to hang here
        log.info("HNSW index %s not built now: another session holds its lock", pgvector_hnsw.index_name(model_id))
