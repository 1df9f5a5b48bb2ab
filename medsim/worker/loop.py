"""The worker's run loop: connect, load the model, run batches until the queue drains,
then wait for more (LISTEN) or exit (--once); reconnect when the database goes away."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

import psycopg

from medsim import db, migrate, queue, registry
from medsim.errors import DatabaseUnavailable, NotFound
from medsim.worker import models, policy
from medsim.worker.batch import Job, forward, one_line
from medsim.worker.config import WorkerConfig
from medsim.worker.lanes import Lanes
from medsim.worker.summary import Summary

log = logging.getLogger("medsim.worker")

# At most 63 bytes (NAMEDATALEN); the host name tells one machine's workers from another's
APP_NAME = f"medsim-worker@{socket.gethostname()}"[:63]
LANE_NAME = f"medsim-worker-lane@{socket.gethostname()}"[:63]  # a second lane is not a second worker


class Worker:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.stopping = False
        self.summary = Summary()
        self.url = cfg.database_url or db.database_url()
        self.conns: list = []  # one per lane; the first also enqueues, listens for work, sizes threads
        self.listener = None
        self.model_row = None
        self.job = None
        self.threads = policy.Threads(cfg.threads, APP_NAME)

    def request_stop(self, signum=None, frame=None) -> None:
        """Signal handler: finish (or roll back) the batches in hand, then exit 0."""
        self.stopping = True

    # -- connections and the model ---------------------------------------------------
    def connect(self) -> None:
        self.conns = sessions(self.url, self.cfg, lambda: self.stopping)

    def close(self) -> None:
        for c in [*self.conns, self.listener]:
            if c is not None:
                c.close()
        self.conns, self.listener = [], None

    def load_model(self, ref=None) -> None:
        conn = self.conns[0]
        migrate.check(conn)
        row = registry.get(conn, ref or self.cfg.model)
        rt = self.threads.runtime_for(row.load(conn, self.cfg.device), self.cfg.runtime, self.cfg.device,
                                      keep_as=row.checkpoint_sha256(conn))
        log.info("model %s embeds with %s", row.id, rt.name)
        compute = threading.Lock() if self.cfg.lanes > 1 else contextlib.nullcontext()
        self.model_row = row
        self.job = Job(row.id, rt.cfg.image_size, row.embedding_dim, forward(rt),
                       self.cfg.batch_size, self.cfg.retry_delay_s, self.cfg.max_attempts, self.cfg.throttle_s,
                       compute)
        queue.enqueue(conn, row.id)

    def wait_for_model(self) -> bool:
        """Load the model; a long-running worker (compose) may start before any model is
        trained, and waits for one -> False when stopped first. --once: NotFound."""
        while True:
            try:
                self.load_model()
                return True
            except NotFound as err:
                if self.cfg.once:
                    raise
                log.info("%s; waiting", err)
            except psycopg.errors.LockNotAvailable as err:  # the start-up enqueue waits like a batch
                log.warning("waited %.0fs for a lock at start-up (%s); trying again", self.cfg.lock_timeout_s,
                            one_line(err))
                self.summary.lock_waits += 1
                if self.stopping:
                    return False
                continue
            if self.stopping:
                return False
            time.sleep(self.cfg.poll_interval)

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> Summary:
        from tqdm import tqdm

        t0 = time.perf_counter()
        self.connect()
        try:
            if not self.wait_for_model():
                return self.summary
            mid = self.first_model = self.model_row.id
            pending = queue.pending_count(self.conns[0], mid)
            self.threads.fit(self.conns[0], force=True)
            if self.cfg.build_index:
                policy.drop_index_for_bulk_load(self.conns[0], mid, pending, self.cfg.bulk_threshold)
            self.summary.credit("start", time.perf_counter() - t0)
            with tqdm(total=pending, unit="img", desc=f"model {mid}", disable=not self.cfg.progress,
                      leave=False) as bar:
                self.drain(bar)
            if not self.stopping:
                t = time.perf_counter()
                policy.after_drain(self.conns[0], self.model_row.id, self.model_row.embedding_dim,
                                   self.summary.embedded > 0, self.cfg.build_index)
                self.summary.credit("after", time.perf_counter() - t)
        finally:
            self.close()  # no model, schema not ready, interrupted: no leaked connection
        self.summary.seconds = time.perf_counter() - t0
        return self.summary

    def drain(self, bar) -> None:
        """Batches until stopped (or, with --once, until nothing is pending)."""
        lanes = Lanes(self.conns)
        try:
            while not self.stopping:
                try:
                    self.threads.fit(self.conns[0])
                    n = lanes.next(self.job, self.summary, more=not self.stopping)
                    if not n:
                        n, errors = lanes.settle(self.summary)
                        if errors:
                            raise errors[0]
                    bar.update(n)
                    if n:
                        continue
                    added = queue.enqueue(self.conns[0], self.model_row.id)  # images inserted since we looked
                    if added:
                        bar.total += added
                        continue
                    if models.next_in_line(self):  # the current model done: a candidate's gallery
                        bar.reset(total=queue.pending_count(self.conns[0], self.model_row.id))
                        continue
                    if self.cfg.once:
                        break
                    self.wait_for_work()
                except (psycopg.errors.LockNotAvailable, psycopg.errors.TransactionRollback) as err:
                    rolled_back(err, self.cfg.lock_timeout_s)
                    self.summary.lock_waits += 1
                    settle_quietly(lanes, self.summary)
                except psycopg.errors.UniqueViolation as err:
                    settle_quietly(lanes, self.summary)
                    drop_already_embedded(self.conns[0], self.model_row.id, err)
                except (psycopg.OperationalError, DatabaseUnavailable) as err:
                    # the batches in flight rolled back with their connections; reconnect with
                    # backoff, or give up with DatabaseUnavailable after db_retries
                    log.warning("lost the database (%s); reconnecting", one_line(err))
                    settle_quietly(lanes, self.summary)
                    lanes.close()
                    self.close()
                    self.connect()
                    lanes = Lanes(self.conns)
            settle_quietly(lanes, self.summary)
        finally:
            lanes.close()

    # -- idle ---------------------------------------------------------------------------
    def wait_for_work(self) -> None:
        """Sleep until NOTIFY medsim_images, the poll interval, or a stop request. Polling
        stays as the fallback: retries come due without any notification."""
        if self.listener is None:
            self.listener = db.connect(self.url, autocommit=True)
            queue.listen(self.listener)
        deadline = time.monotonic() + self.cfg.poll_interval
        while not self.stopping and time.monotonic() < deadline:
            for _ in self.listener.notifies(timeout=min(1.0, self.cfg.poll_interval), stop_after=1):
                return
        models.follow_current(self)


def sessions(url: str, cfg: WorkerConfig, stopping) -> list:
    """One connection per lane, with exponential backoff while the database is away ->
    the connections, or DatabaseUnavailable after cfg.db_retries. Autocommit: each batch's
    `with conn.transaction()` is then a real transaction. The application name says "a
    medsim worker on this host" (policy.Threads counts them; a second lane is not one)."""
    delay, conns = 1.0, []
    for attempt in range(cfg.db_retries + 1):
        try:
            for i in range(cfg.lanes):
                conns.append(db.connect(url, autocommit=True, application_name=APP_NAME if i == 0 else LANE_NAME))
                db.set_lock_timeout(conns[-1], cfg.lock_timeout_s)
            return conns
        except DatabaseUnavailable as err:
            for c in conns:
                c.close()
            conns = []
            if attempt == cfg.db_retries or stopping():
                raise DatabaseUnavailable(f"database unavailable after {attempt + 1} attempts: {err}") from err
            log.warning("database unavailable (%s); retrying in %.0fs", err, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30)


def rolled_back(err, lock_timeout_s: float) -> None:
    """A batch rolled back (a lock wait too long, or a deadlock with a deletion that Postgres
    resolved against this worker): its images are simply claimable again."""
    waited = isinstance(err, psycopg.errors.LockNotAvailable)
    log.warning("%s (%s); trying again", f"waited {lock_timeout_s:.0f}s for a lock" if waited
                else "the database rolled the batch back", one_line(err))


def settle_quietly(lanes: Lanes, summary: Summary) -> None:
    """After one batch's error: the other lane's batch finishes on its own; its error, if
    any, is the same trouble seen twice and is logged, not raised."""
    for err in lanes.settle(summary)[1]:
        log.warning("a batch in flight also failed: %s", one_line(err))


def drop_already_embedded(conn, model_id: int, err) -> None:
    """A queue row whose embedding already exists made the COPY fail on the primary key and
    the batch roll back: drop such rows (anything else is raised)."""
    dropped = queue.drop_embedded(conn, model_id)
    if not dropped:
        raise err
    log.warning("dropped %d queue rows of model %s that were already embedded (%s)", dropped, model_id, one_line(err))
