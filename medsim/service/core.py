"""What `medsim serve` keeps warm between requests, and search as the service runs it.

Two connection pools:
- **reader**: every search and listing. Each connection runs ``SET ROLE medsim_reader``
  (and the role's statement timeout) when the pool opens it, so a search endpoint can
  read what an analyst can and nothing more: no pixels, no checkpoints, no file paths.
  Its URL is ``DATABASE_READ_URL`` when set (a streaming replica), else the main one.
- **owner**: the few things the reader may not touch: a model's checkpoint (read once
  per model), pixels for thumbnails, and pixels of a stored image not embedded yet.

The network is loaded once per model, the FAISS index once per model and build; a
request checks the index with one indexed lookup (medsim.gallery_versions) and reloads it
only when that says the gallery changed.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

import numpy as np
import psycopg
from psycopg import sql

from medsim import db, migrate, registry
from medsim.errors import BadArgument, DatabaseUnavailable, NotFound
from medsim.pixels import StoredRow, load_image_bytes
from medsim.queries import Q, one, scalar
from medsim.search import GALLERY_SPLITS, MAX_K, similar
from medsim.service.metrics import Metrics

log = logging.getLogger("medsim.serve")

@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str | None = None  # default: DATABASE_URL, PG*, then the embedded server
    read_url: str | None = None  # default: $DATABASE_READ_URL, then database_url
    reader_role: str | None = "medsim_reader"  # None: search as the login role (not advised)
    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    pool_size: int = 8
    statement_timeout_ms: int = 30_000
    preload: bool = True  # load the current model (and its FAISS index, if built) at start


@dataclass
class QueryImage:
    id: int
    dataset: str
    split: str
    label_name: str
    patient_key: str | None
    embedding: object


@dataclass
class SearchOutcome:
    model: registry.ModelRow
    engine: str
    query: similar.Query
    hits: list
    index_build: int | None = None
    notes: list = field(default_factory=list)


class Service:
    def __init__(self, cfg: ServeConfig):
        from psycopg_pool import ConnectionPool

        self.cfg = cfg
        owner_url = cfg.database_url if cfg.database_url is not None else db.database_url()
        read_url = cfg.read_url or os.environ.get(db.READ_URL_ENV) or owner_url
        self.read_is_replica = read_url != owner_url
        self.metrics = Metrics()
        self.reader = ConnectionPool(read_url, min_size=2, max_size=cfg.pool_size, open=False, name="medsim-read",
                                     kwargs={"autocommit": True}, configure=self._configure_reader, timeout=10)
        self.owner = ConnectionPool(owner_url, min_size=1, max_size=4, open=False, name="medsim-owner",
                                    kwargs={"autocommit": True}, configure=db.register, timeout=10)
        self.nets: dict[int, object] = {}  # model id -> network (torch), loaded once
        self.indexes: dict[int, object] = {}  # model id -> faiss_index.Built
        self.cals: dict[int, tuple] = {}  # model id -> (loaded at, calibrations)
        self.lock = threading.Lock()  # loading a model or an index happens once, not per racing request

    def _configure_reader(self, conn: psycopg.Connection) -> None:
        db.register(conn)
        if self.cfg.reader_role:
            # ALTER ROLE ... SET applies at login only, so the timeout is set here too
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(self.cfg.reader_role)))
        conn.execute("SELECT set_config('statement_timeout', %s, false)", (f"{self.cfg.statement_timeout_ms}ms",))

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        try:
            self.owner.open(wait=True, timeout=15)
            self.reader.open(wait=True, timeout=15)
        except Exception as err:  # PoolTimeout, or a configure() failure (no such role)
            self.close()
            raise DatabaseUnavailable(f"cannot open connections to the database ({db.source()}): "
                                      f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
                                      ) from err
        with self.owner.connection() as conn:
            migrate.check(conn)
        if self.cfg.preload:
            self.preload()

    def preload(self) -> None:
        with self.reader.connection() as conn:
            try:
                row = registry.get(conn, "current")
            except NotFound:
                log.warning("no current model yet: searches answer 404 until one is trained")
                return
        self.net(row)
        try:
            with self.reader.connection() as conn:
                self.faiss(conn, row.id)
        except Exception as err:  # no build yet, or stale: pgvector still answers
            log.info("FAISS not preloaded for model %s: %s", row.id, err)

    def close(self) -> None:
        self.reader.close()
        self.owner.close()

    # ------------------------------------------------------------------ warm state
    def net(self, model: registry.ModelRow):
        if model.id not in self.nets:
            with self.lock:
                if model.id not in self.nets:
                    with self.owner.connection() as conn:
                        self.nets[model.id] = model.load(conn)
                    log.info("model %s (%s) loaded", model.id, model.name)
        return self.nets[model.id]

    def embed(self, model: registry.ModelRow, x: np.ndarray) -> np.ndarray:
        from medsim.training import network

        net = self.net(model)
        with self.metrics.stage("embed"):
            return network.embed(net, x[None])[0]

    def faiss(self, conn, model_id: int):
        """The model's loaded FAISS index, reloaded (the latest build) when the gallery
        version moved; StaleIndex when even the latest build no longer matches."""
        from medsim.search import faiss_index

        built = self.indexes.get(model_id)
        if built is not None and faiss_index.still_fresh(conn, built):
            return built
        with self.lock:
            built = self.indexes.get(model_id)
            if built is None or not faiss_index.still_fresh(conn, built):
                with self.owner.connection() as oc:  # the build's path is not the reader's to see
                    built = faiss_index.load_build(oc, faiss_index.latest_build(oc, model_id), model_ref=model_id)
                self.indexes[model_id] = built
                log.info("FAISS build %s (%s) loaded for model %s", built.meta["build_id"], built.meta["kind"],
                         model_id)
        return built

    # Calibrations change only when `medsim evaluate` runs: read once per model and kept
    # for CALIBRATION_TTL_S (one query per search cost 18% of the search-by-id throughput)
    CALIBRATION_TTL_S = 30.0

    def calibrations(self, conn, model_id: int) -> dict:
        import time

        from medsim.training import calibration

        hit = self.cals.get(model_id)
        if hit is None or time.monotonic() - hit[0] > self.CALIBRATION_TTL_S:
            hit = (time.monotonic(), calibration.load(conn, model_id))
            self.cals[model_id] = hit
        return hit[1]

    # ------------------------------------------------------------------ search
    def search(self, *, image_id: int | None = None, vector: list | None = None, upload: bytes | None = None,
               upload_name: str = "the upload", k: int = 4, engine: str = "pgvector", filters: dict | None = None,
               include_own_patient: bool = False, per_patient: int | None = None,
               max_distance: float | None = None, model: int | None = None) -> SearchOutcome:
        given = [name for name, v in (("image", upload), ("image_id", image_id), ("vector", vector))
                 if v is not None]
        if len(given) != 1:
            raise BadArgument("give exactly one query: an uploaded image, an image_id or a vector"
                              + (f" (got {' and '.join(given)})" if given else ""))
        if not 1 <= k <= MAX_K:
            raise BadArgument(f"k must be between 1 and {MAX_K}, got {k}")
        f = similar.Filters(dict(filters or {}), include_own_patient, per_patient)
        with self.reader.connection() as conn:
            with self.metrics.stage("fetch"):
                row = registry.get(conn, "current" if model is None else model)
            q = self._query(conn, row, image_id, vector, upload, upload_name)
            out = SearchOutcome(row, engine, q, [])
            with self.metrics.stage("search"):
                if engine == "faiss":
                    built = self.faiss(conn, row.id)
                    out.index_build = built.meta["build_id"]
                    hits = similar.FaissSearcher(conn, row.id, built=built)(q, k, f)
                else:
                    hits = similar.search_pgvector(conn, q, k, row.id, f, exact=engine == "exact")
            if not hits:  # counted only then: a count over the gallery costs O(n)
                similar.check_gallery(conn, row.id, f.where)
            similar.calibrate(conn, row.id, [(q, hits)], self.calibrations(conn, row.id))
        if max_distance is not None:
            out.notes.append(f"{sum(h.distance > max_distance for h in hits)} of {len(hits)} neighbours were "
                             f"farther than max_distance {max_distance}")
            hits = [h for h in hits if h.distance <= max_distance]
        out.hits = hits
        if q.in_gallery and q.image_id is None:
            out.notes.append(f"the uploaded image is itself in the gallery (image id "
                             f"{', '.join(map(str, q.in_gallery))}); left out of its neighbours")
        return out

    def _query(self, conn, row: registry.ModelRow, image_id, vector, upload, upload_name) -> similar.Query:
        if vector is not None:
            v = np.asarray(vector, dtype=np.float32)
            if v.ndim != 1 or len(v) != row.embedding_dim:
                raise BadArgument(f"the vector has {v.size} values; model {row.id} embeds into "
                                  f"{row.embedding_dim} dimensions")
            if not np.isfinite(v).all():
                raise BadArgument("the vector holds NaN or infinite values")
            return similar.Query("a vector", np.zeros((1, 1, 3), np.uint8), v)
        if image_id is not None:
            with self.metrics.stage("fetch"):
                r = one(conn, Q.service_query_image, {"id": image_id, "model_id": row.id}, as_=QueryImage)
            if r is None:
                raise NotFound(f"no image with id {image_id}")
            if r.embedding is not None:
                v = r.embedding.to_numpy().astype(np.float32)
            else:  # not embedded yet for this model: its pixels, read as the owner
                with self.owner.connection() as oc:
                    p = one(oc, Q.image_pixels_one, {"id": image_id}, as_=StoredRow)
                v = self.embed(row, p.decode_or_refuse())
            q = similar.Query(f"image {image_id}", np.zeros((1, 1, 3), np.uint8), v, image_id, r.dataset,
                              r.label_name, patient_key=r.patient_key)
            if r.split in GALLERY_SPLITS:
                q.in_gallery = [image_id]
            return q
        size = int(row.config.get("image_size", 28))
        with self.metrics.stage("decode"):
            x = load_image_bytes(upload, size=size, max_pixels=self.cfg.max_image_pixels, name=upload_name)
        return similar.query_from_pixels(conn, _Embedder(self, row), x, upload_name)

    # ------------------------------------------------------------------ reads
    def image(self, image_id: int) -> dict:
        with self.reader.connection() as conn, self.metrics.stage("fetch"):
            cur = conn.execute(Q.image_details, {"id": image_id})
            r = cur.fetchone()
            if r is None:
                raise NotFound(f"no image with id {image_id}")
            return dict(zip([d.name for d in cur.description], r, strict=True))

    def thumbnail(self, image_id: int, size: int) -> tuple[bytes, str]:
        """-> (PNG bytes, sha256 hex). Rendered from the stored pixels; grey stays grey."""
        import io

        from PIL import Image

        with self.owner.connection() as conn:
            p = one(conn, Q.image_pixels_one, {"id": image_id}, as_=StoredRow)
            sha = scalar(conn, Q.image_sha256, {"id": image_id})
        if p is None:
            raise NotFound(f"no image with id {image_id}")
        x = p.decode_or_refuse()
        img = Image.fromarray(x[..., 0] if p.channels == 1 else x)
        if max(img.size) > size:
            img.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue(), sha

    def sha256(self, image_id: int) -> str | None:
        with self.reader.connection() as conn:
            return scalar(conn, Q.image_sha256, {"id": image_id})

    def random_image(self, split: str, dataset: str | None) -> int:
        with self.reader.connection() as conn:
            args = {"split": split, "dataset": dataset}
            found = scalar(conn, Q.random_image, args) or scalar(conn, Q.first_image_in, args)
        if found is None:
            raise NotFound(f"no {split} image" + (f" in {dataset}" if dataset else ""))
        return found

    def models(self) -> list:
        with self.reader.connection() as conn:
            return registry.list_models(conn)

    def datasets(self) -> list[dict]:
        with self.reader.connection() as conn:
            cur = conn.execute(Q.datasets_overview)
            names = [d.name for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def status(self) -> list:
        from medsim import queue

        with self.reader.connection() as conn:
            return queue.status(conn)

    def health(self) -> tuple[bool, dict]:
        checks: dict = {"database": None, "schema": None, "model": None}
        ok = {"database": False, "schema": False, "model": False}
        try:
            with self.reader.connection(timeout=2) as conn:
                conn.execute("SELECT 1")
                checks["database"], ok["database"] = "reachable", True
                try:
                    with self.owner.connection(timeout=2) as oc:  # alembic_version is not the reader's
                        migrate.check(oc)
                    checks["schema"], ok["schema"] = f"current ({migrate.HEAD})", True
                except Exception as err:
                    checks["schema"] = str(err)
                    raise
                try:
                    row = registry.get(conn, "current")
                    checks["model_id"] = row.id
                    self.net(row)  # a model made current since start is loaded here, once
                    checks["model"], ok["model"] = f"model {row.id} loaded", True
                except NotFound:
                    checks["model"] = "no current model: train one (medsim train)"
                except Exception as err:
                    checks["model"] = f"cannot load: {err}"
        except Exception as err:
            if not ok["database"]:
                checks["database"] = f"unreachable: {(str(err).strip().splitlines() or [repr(err)])[0]}"
        checks["read_from"] = "replica (DATABASE_READ_URL)" if self.read_is_replica else "primary"
        return all(ok.values()), checks


class _Embedder(similar.Embedder):
    """similar.query_from_pixels's embedder, backed by the service's warm network."""

    def __init__(self, service: Service, row: registry.ModelRow):
        self.service, self.model_row = service, row

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.service.embed(self.model_row, x)


def hit_rows(out: SearchOutcome) -> list[dict]:
    qlabels = set((out.query.label_name or "").split(", ")) - {""}
    return [{"image_id": h.image_id, "dataset": h.dataset, "split": h.split, "label_name": h.label_name,
             "distance": h.distance, "p_same": h.p_same, "patient_key": h.patient_key, "study_id": h.study_id,
             "same_label": (bool(qlabels & set(h.label_name.split(", "))) and h.dataset == out.query.dataset)
             if qlabels else None,
             "thumbnail_url": f"/images/{h.image_id}/thumbnail.png",
             "rank": i} for i, h in enumerate(out.hits, 1)]

