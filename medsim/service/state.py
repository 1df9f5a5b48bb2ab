"""What `medsim serve` keeps warm between requests, created once at start-up.

Two connection pools:
- **reader**: every search and listing, run as the user who asked: ``connection(p)``
  SETs the user's own role (medsim.access), so row-level security shows the request only
  the datasets granted to that user. Between requests a connection is ``medsim_nobody``,
  a role that can read nothing (with --no-auth: ``medsim_reader``, which sees every
  dataset). No role there reads pixels, checkpoints or file paths. Its URL is
  ``DATABASE_READ_URL`` when set (a streaming replica), else the main one.
- **owner**: what the reader may not touch, always after the user's own connection has
  shown the row to be theirs: a model's checkpoint (read once per model), pixels for
  thumbnails and of a stored image not embedded yet, calibrations (cached for all users;
  a request uses only those of datasets its hits come from); and tokens and the access
  log, which are the owner's alone.

The network is loaded once per model, the FAISS index once per model and build; a
request checks the index with one indexed lookup (medsim.gallery_versions) and reloads it
only when that says the gallery changed. Searches run the one pipeline
(medsim.search.pipeline) through a WarmContext that serves these caches.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql

from medsim import access, db, migrate, queue, registry, settings
from medsim.errors import BadArgument, DatabaseUnavailable, NotFound, StaleIndex
from medsim.images import StoredRow
from medsim.queries import Q, one
from medsim.search import GALLERY_SPLITS
from medsim.search.context import Context
from medsim.service.guard import Client, FailureLimiter, TrustedProxies
from medsim.service.metrics import Metrics
from medsim.service.reaper import Reaper
from medsim.sources.pacs_log import hide_uids

log = logging.getLogger("medsim.serve")
hide_uids(log.name)  # a failed request's traceback can hold a PACS's URL, and the UIDs in it


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str | None = None  # default: DATABASE_URL, PG*, then the embedded server
    read_url: str | None = None  # default: $DATABASE_READ_URL, then database_url
    reader_role: str | None = "medsim_reader"  # with auth off; None: search as the login role (not advised)
    auth: bool = True  # every request needs a token (medsim token create); False: --no-auth
    # auth off on an address other machines reach: refused unless this says it is meant
    no_auth_public: bool = False
    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = settings.DEFAULT_MAX_IMAGE_PIXELS
    pool_size: int = 8
    statement_timeout_ms: int = 30_000
    preload: bool = True  # load the current model (and its FAISS index, if built) at start
    # torch threads per forward pass. A query is one small image: a pass is over before a
    # second thread would help, and concurrent requests are the parallelism (the thread
    # pool). Every core per pass, per request, oversubscribed a busy 2-core machine: one
    # upload at a time ran 14-16 requests/s, against 154 with OMP_NUM_THREADS=1. None: 1,
    # or OMP_NUM_THREADS when set (the worker's rule for a user's own setting).
    torch_threads: int | None = None
    runtime: str | None = None  # what runs the network (medsim.model.runtime); None: the setting
    upload_retention_h: float = 24.0  # uploads kept for their URL (medsim.service.uploads); 0: none
    # peers whose X-Forwarded-For is believed (uvicorn's --forwarded-allow-ips); None: none
    forwarded_allow_ips: str | None = None


    def __post_init__(self):
        if not self.auth and not self.no_auth_public and not loopback_host(self.host):
            raise BadArgument(f"--no-auth on {self.host} would serve every dataset, without a token, to every machine "
                              f"that reaches it: listen on 127.0.0.1, use tokens (`medsim token create NAME`), or give "
                              f"--no-auth-public if that is truly meant")


def loopback_host(host: str) -> bool:
    """Only this machine reaches an address it listens on (127.0.0.1, ::1, localhost)."""
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Service:
    # Calibrations change only when `medsim evaluate` runs: read once per model and kept
    # for CALIBRATION_TTL_S (one query per search cost 18% of the search-by-id throughput)
    CALIBRATION_TTL_S = 30.0

    def __init__(self, cfg: ServeConfig):
        from psycopg_pool import ConnectionPool

        self.cfg = cfg
        owner_url = cfg.database_url if cfg.database_url is not None else db.database_url()
        read_url = cfg.read_url or settings.get().read_url or owner_url
        self.read_is_replica = read_url != owner_url
        self.metrics = Metrics()
        self.guard = FailureLimiter()
        self.proxies = TrustedProxies(cfg.forwarded_allow_ips)
        self.reaper: Reaper | None = None
        self.reader = ConnectionPool(read_url, min_size=2, max_size=cfg.pool_size, open=False, name="medsim-read",
                                     kwargs={"autocommit": True}, configure=self._configure_reader, timeout=10)
        self.owner = ConnectionPool(owner_url, min_size=1, max_size=4, open=False, name="medsim-owner",
                                    kwargs={"autocommit": True}, configure=db.register, timeout=10)
        self.nets: dict[int, object] = {}  # model id -> network (torch), loaded once
        self.indexes: dict[tuple, object] = {}  # (model id, splits) -> faiss_index.Built
        self.cals: dict[int, tuple] = {}  # model id -> (loaded at, calibrations)
        self.not_embedded = NotEmbedded(self.owner)
        self.lock = threading.Lock()  # loading a model or an index happens once, not per racing request

    def _configure_reader(self, conn: psycopg.Connection) -> None:
        db.register(conn)
        role = "medsim_nobody" if self.cfg.auth else self.cfg.reader_role
        if role:
            # ALTER ROLE ... SET applies at login only, so the timeout is set here too
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            conn._medsim_role = role  # what access.act_as compares with
        conn.execute("SELECT set_config('statement_timeout', %s, false)", (f"{self.cfg.statement_timeout_ms}ms",))

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        try:
            self.owner.open(wait=True, timeout=15)
            self.reader.open(wait=True, timeout=15)
        except Exception as err:  # PoolTimeout, or a configure() failure (no such role)
            self.close()
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DatabaseUnavailable(f"cannot open connections to the database ({db.source()}): {first}") from err
        with self.owner.connection() as conn:
            migrate.check(conn)
            from medsim.service import uploads

            uploads.purge(conn)  # uploads whose retention passed while the service was down
        if self.cfg.preload:
            self.preload()
        self.reaper = Reaper(self.owner)  # SQL logins' limits, enforced while the service runs
        self.reaper.start()

    def preload(self) -> None:
        with self.owner.connection() as conn:
            try:
                row = registry.get(conn, "current")
            except NotFound:
                log.warning("no current model yet: searches answer 404 until one is trained")
                return
            self.net(row)
            try:
                self.faiss(row.id)
            except Exception as err:  # no build yet, or stale: pgvector still answers
                log.info("FAISS not preloaded for model %s: %s", row.id, err)

    def close(self) -> None:
        self.reaper and self.reaper.stop()
        self.reader.close()
        self.owner.close()

    @contextmanager
    def connection(self, principal: access.Principal):
        """A reader connection acting as the principal (its role, its grants)."""
        with self.reader.connection() as conn:
            if self.cfg.auth:
                access.act_as(conn, principal)
            yield conn

    @contextmanager
    def context(self, principal: access.Principal):
        """A search context acting as the principal, served from the warm caches."""
        with self.connection(principal) as conn:
            yield WarmContext(self, conn, restricted=self.cfg.auth and not principal.sees_all)

    def log(self, principal: access.Principal, client, action: str, image_ids, **query) -> None:
        """One access-log row, on the primary, before the response leaves. `client` is
        deps.client_address's Client (the address and the forwarded chain), or a string."""
        address, forwarded = (client.address, client.forwarded) if isinstance(client, Client) else (client, None)
        with self.owner.connection() as conn:
            access.log(conn, principal, address, action, image_ids, forwarded=forwarded, **query)

    # ------------------------------------------------------------------ warm state
    def net(self, model: registry.ModelRow):
        if model.id not in self.nets:
            with self.lock:
                if model.id not in self.nets:
                    with self.owner.connection() as conn:
                        net = model.load(conn)
                    from medsim.model import runtime

                    # an ONNX Runtime session with this many threads, shared by the requests
                    # (its run() is thread-safe); torch's count is set per request thread below
                    self.nets[model.id] = runtime.prepare(net, self.cfg.runtime, threads=self.threads_per_pass())
                    log.info("model %s (%s) loaded; embeds with %s", model.id, model.name, self.nets[model.id].name)
        return self.nets[model.id]

    def threads_per_pass(self) -> int:
        return self.cfg.torch_threads or settings.get().omp_threads or 1

    def size_threads(self) -> None:
        """Called in the thread that runs a forward pass: OpenMP's thread count belongs to
        the calling thread, so setting it once at start-up does not reach the pool's."""
        import torch

        want = self.threads_per_pass()
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)
            log.info("torch threads per search: %d", want)

    def faiss(self, model_id: int, splits: tuple = GALLERY_SPLITS):
        """The model's loaded FAISS index over these splits, reloaded (the latest build) when
        the gallery version moved; StaleIndex when even the latest build no longer matches."""
        from medsim.search import faiss_index

        key = (model_id, tuple(splits))
        built = self.indexes.get(key)
        with self.owner.connection() as oc:  # a user's role may not read the gallery's version
            if built is not None and faiss_index.still_fresh(oc, built):
                return built
        with self.lock:
            built = self.indexes.get(key)
            with self.owner.connection() as oc:  # the build's path is not the reader's to see either
                if built is not None and faiss_index.still_fresh(oc, built):
                    return built
                built = faiss_index.load_build(oc, faiss_index.latest_build(oc, model_id, splits=splits),
                                               model_ref=model_id)
            self.indexes[key] = built
            log.info("FAISS build %s (%s) loaded for model %s", built.meta["build_id"], built.meta["kind"], model_id)
        return built

    def calibrations(self, model_id: int) -> dict:
        from medsim.training import calibration

        hit = self.cals.get(model_id)
        if hit is None or time.monotonic() - hit[0] > self.CALIBRATION_TTL_S:
            with self.owner.connection() as conn:  # every dataset's, shared by all users
                hit = (time.monotonic(), calibration.load(conn, model_id))
            self.cals[model_id] = hit
        return hit[1]


class NotEmbedded:
    """What a model has not embedded yet, per dataset (queue.not_embedded). Every search asks
    (its answer's notes) and it moves while a worker runs: counted as the owner at most once
    per TTL_S per model and splits, for all users; each request keeps only the datasets its
    own user sees (WarmContext.not_embedded)."""

    TTL_S = 5.0

    def __init__(self, owner_pool):
        self.owner = owner_pool
        self.kept: dict[tuple, tuple] = {}  # (model id, splits) -> (counted at, [queue.Missing])

    def __call__(self, model_id: int, splits: tuple = GALLERY_SPLITS) -> list:
        key = (model_id, tuple(splits))
        hit = self.kept.get(key)
        if hit is None or time.monotonic() - hit[0] > self.TTL_S:
            with self.owner.connection() as conn:
                hit = (time.monotonic(), queue.not_embedded(conn, model_id, splits))
            self.kept[key] = hit
        return hit[1]


class WarmContext(Context):
    """The pipeline's context for one request: the reader connection it holds, and the
    service's warm network, FAISS index and calibrations instead of loading its own."""

    def __init__(self, service: Service, conn, restricted: bool = False):
        super().__init__(conn)
        self.service = service
        self.restricted = restricted

    def stage(self, name: str):
        return self.service.metrics.stage(name)

    def network(self, model):
        return self.service.net(model)

    def embed(self, model, x):
        self.service.size_threads()
        return super().embed(model, x)

    def stored(self, image_id: int) -> StoredRow | None:
        with self.service.owner.connection() as oc:  # pixels are not the reader's
            return one(oc, Q.image_pixels_one, {"id": image_id}, as_=StoredRow)

    def faiss(self, model_id: int, splits: tuple = GALLERY_SPLITS):
        try:
            return self.service.faiss(model_id, splits)
        except StaleIndex:
            if not self.restricted:
                raise
            # the full sentence counts rows of the whole gallery and names deletions: an
            # administrator's business, not a user's who may see part of it
            raise StaleIndex("the FAISS index is out of date (an administrator runs medsim index build); "
                             "use the pgvector engine meanwhile") from None

    def calibrations(self, model_id: int) -> dict:
        return self.service.calibrations(model_id)

    def not_embedded(self, model_id: int, splits: tuple = GALLERY_SPLITS) -> list:
        found = self.service.not_embedded(model_id, splits)
        if found and self.restricted:  # counted as the owner: only the datasets this user sees
            seen = set(access.visible_datasets(self.conn))
            found = [m for m in found if m.dataset in seen]
        return found
