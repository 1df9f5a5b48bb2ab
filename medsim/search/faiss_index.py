"""FAISS indexes rebuilt from the SQL views, never a bare file.

An index kind is data (``medsim.search.index_kinds``): a ``faiss.index_factory``
string with its parameters, build-time and search-time parameters (set here through
``faiss.ParameterSpace``) and defaults. Adding a kind is one entry in that table.

Vectors are read from a view with their image ids and added with ``add_with_ids``: a
result maps to an image by id, never by position. A build writes the index, then
``<index>.json`` beside it (model, view, kind, parameters, dimension, metric, row count,
fingerprint, build id), and only then its medsim.index_builds row, so a row never
points at a file without metadata. Loading compares the fingerprint with the database
and refuses a stale index. FAISS itself is imported only where an index is made or
opened: listing builds (`medsim index list`) does not pay for it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from psycopg import sql

from medsim import registry
from medsim.errors import NotFound, StaleIndex
from medsim.queries import Q, rows, scalar
from medsim.search import GALLERY_SPLITS
from medsim.search.index_kinds import Kind, kind, resolve_params

if TYPE_CHECKING:
    import faiss


def set_params(index: faiss.Index, params: dict, names) -> None:
    import faiss

    ps = faiss.ParameterSpace()
    for name in names:
        ps.set_index_parameter(index, name, params[name])


def make_index(k: Kind, dim: int, p: dict) -> faiss.Index:
    import faiss

    index = faiss.index_factory(dim, k.factory.format(**p), faiss.METRIC_L2)
    set_params(index, p, k.build_params + k.search_params)
    if not index.is_trained:
        # k-means warns below 39 points per centroid; small galleries (and the seed preset's
        # 256-centroid PQ codebooks) are fine with fewer
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))  # IndexIVFPQ, to reach .pq
        ivf.cp.min_points_per_centroid = 1
        if hasattr(ivf, "pq"):
            ivf.pq.cp.min_points_per_centroid = 1
    return index


def source_view(splits) -> str:
    return "medsim.gallery" if tuple(splits) == GALLERY_SPLITS else "medsim.embedded_images"


def read_batches(conn, model_id: int, splits, batch_size: int = 4096):
    """Yield (ids (n,) int64, xb (n, dim) float32) from the view via a server-side cursor."""
    schema, name = source_view(splits).split(".")
    q = sql.SQL("SELECT image_id, embedding FROM {} WHERE model_id = %s AND split = ANY(%s) "
                "ORDER BY image_id").format(sql.Identifier(schema, name))
    with conn.transaction(), conn.cursor(name="medsim_faiss_read") as cur:
        cur.itersize = batch_size
        cur.execute(q, (model_id, list(splits)))
        while rows := cur.fetchmany(batch_size):
            yield (np.array([r[0] for r in rows], np.int64),
                   np.stack([r[1].to_numpy() for r in rows]).astype(np.float32))


def fingerprint(conn, model_id: int, splits) -> tuple[int, str]:
    n, digest = conn.execute(Q.embedding_fingerprint, {"model_id": model_id, "splits": list(splits)}).fetchone()
    return int(n), digest


@dataclass
class Built:
    index: faiss.Index
    meta: dict
    path: Path


def meta_path(path: Path) -> Path:
    return Path(str(path) + ".json")


def build(conn, model_ref="current", kind_name: str = "flat", params: dict | None = None,
          out: Path | str | None = None, splits=GALLERY_SPLITS, out_dir="medsim_out") -> Built:
    """Build, write index + metadata, record the build. Writes one row; the caller owns
    the transaction (with autocommit it commits on its own)."""
    import faiss

    k = kind(kind_name)
    row = registry.get(conn, model_ref)
    t0 = time.perf_counter()
    n_before, fp = fingerprint(conn, row.id, splits)
    if n_before == 0:
        raise NotFound(f"model {row.id} has no embeddings in {source_view(splits)} for splits "
                       f"{', '.join(splits)}: run the embedding worker first")
    p = resolve_params(k, params or {}, n_before, row.embedding_dim)
    index = make_index(k, row.embedding_dim, p)
    if index.is_trained:  # nothing to learn: add each batch as it streams in
        for ids, x in read_batches(conn, row.id, splits):
            index.add_with_ids(x, ids)
    else:
        batches = list(read_batches(conn, row.id, splits))
        xt = np.concatenate([x for _, x in batches])
        rng = np.random.default_rng(0)
        index.train(xt[rng.permutation(len(xt))[: 256 * p.get("nlist", 1) * 4]])
        for ids, x in batches:
            index.add_with_ids(x, ids)
    n_after, fp_after = fingerprint(conn, row.id, splits)
    if fp_after != fp:  # a worker wrote while we read: the snapshot would be ambiguous
        raise StaleIndex("embeddings changed during the build; run it again once workers are idle")
    seconds = time.perf_counter() - t0
    build_id = scalar(conn, Q.next_index_build_id)
    path = Path(out) if out else Path(out_dir) / "indexes" / f"model{row.id}-{k.name}.faiss"
    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path))
    meta = {"build_id": build_id, "model_id": row.id, "model_name": row.name, "kind": k.name,
            "factory": k.factory.format(**p), "params": p, "source_view": source_view(splits),
            "splits": list(splits), "dim": row.embedding_dim, "metric": "l2",
            "n_rows": int(index.ntotal), "fingerprint": fp, "build_seconds": round(seconds, 4),
            "faiss_version": faiss.__version__}
    meta_path(path).write_text(json.dumps(meta, indent=2))
    conn.execute(Q.insert_index_build, {
        **{key: meta[key] for key in ("build_id", "model_id", "kind", "source_view", "splits", "dim",
                                      "metric", "n_rows", "fingerprint")},
        "params": json.dumps(p), "path": str(path.resolve()), "build_seconds": seconds})
    return Built(index, meta, path)


def load(conn, path: Path | str, model_ref=None, rebuild_if_stale: bool = False) -> Built:
    """Open an index and check, once, that it still describes the database; StaleIndex
    if not. Its search-time parameters are set from the metadata."""
    path = Path(path)
    if not path.exists() or not meta_path(path).exists():
        raise NotFound(f"{path} (and its .json metadata) not found: build it with `medsim index build`")
    meta = json.loads(meta_path(path).read_text())
    problem = None
    wanted = registry.get(conn, model_ref).id if model_ref is not None else meta["model_id"]
    if wanted != meta["model_id"]:
        problem = f"it was built for model {meta['model_id']}, not model {wanted}"
    else:
        n, fp = fingerprint(conn, meta["model_id"], meta["splits"])
        if n != meta["n_rows"]:
            problem = (f"it holds {meta['n_rows']} rows of model {meta['model_id']}, the database now has "
                       f"{n} ({n - meta['n_rows']:+d})")
        elif fp != meta["fingerprint"]:
            problem = "the row count is unchanged but embeddings or image ids differ (re-embedded or replaced)"
    if problem:
        if rebuild_if_stale:
            return build(conn, meta["model_id"], meta["kind"], meta["params"], out=path, splits=meta["splits"])
        raise StaleIndex(f"{path} is stale: {problem}. Rebuild it (medsim index build, or --rebuild).")
    import faiss

    index = faiss.read_index(str(path))
    set_params(index, meta["params"], kind(meta["kind"]).search_params)
    return Built(index, meta, path)


@dataclass
class BuildRow:
    id: int
    model_id: int
    kind: str
    n_rows: int
    path: str
    created_at: object


def builds(conn, model_id: int | None = None) -> list[BuildRow]:
    return rows(conn, Q.index_builds, {"model_id": model_id}, as_=BuildRow)


def build_path(conn, build_id: int) -> str:
    path = scalar(conn, Q.index_build_path, {"id": build_id})
    if path is None:
        raise NotFound(f"no index build with id {build_id}")
    return path


def latest_path(conn, model_id: int) -> str:
    """The newest gallery build of the model, an exact (flat) one first."""
    path = scalar(conn, Q.latest_index_build, {"model_id": model_id, "splits": list(GALLERY_SPLITS)})
    if path is None:
        raise NotFound(f"no FAISS index built for model {model_id}: run `medsim index build` "
                       f"or use --engine pgvector")
    return path


def search(index: faiss.Index, xq: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
    """-> (D, I): L2 distances (not squared) and image ids; -1 ids where fewer than k exist."""
    D, I = index.search(np.ascontiguousarray(xq, np.float32), k, params=params)
    return np.sqrt(np.maximum(D, 0)), I
