"""FAISS indexes rebuilt from the SQL views, never a bare file.

Vectors are read from a view in batches with their image ids, and added with
``add_with_ids``: a result maps to an image by id, never by position. Every build
writes ``<index>.json`` beside the index (model, view, kind, parameters, dimension,
metric, row count, fingerprint, build seconds) and a row in medsim.index_builds.
Loading compares the fingerprint with the database and refuses a stale index.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from psycopg import sql

from medsim import registry
from medsim.queries import Q

KINDS = ("flat", "hnsw", "ivfflat", "ivfpq", "seed")
DEFAULT_SPLITS = ("train", "val")


class StaleIndex(RuntimeError):
    pass


def default_params(kind: str, n: int, dim: int) -> dict:
    nlist = int(max(1, min(4 * np.sqrt(max(n, 1)), n // 39 or 1)))  # >= 39 training points per list
    return {
        "flat": {},
        "hnsw": {"M": 32, "efConstruction": 80, "efSearch": 64},
        "ivfflat": {"nlist": nlist, "nprobe": max(1, nlist // 4)},
        "ivfpq": {"nlist": nlist, "M": max(1, dim // 2), "nbits": 8, "nprobe": max(1, nlist // 4)},
        # the published notebook's index: IVFPQ, nlist 2, M 4, 8 bits, nprobe 10
        "seed": {"nlist": 2, "M": 4, "nbits": 8, "nprobe": 10},
    }[kind]


def check_params(kind: str, p: dict, n: int, given: dict) -> dict:
    """Refuse unknown or impossible parameters before FAISS does (its C++ assertions end
    in a RuntimeError several lines long, after the vectors have been read)."""
    known = default_params(kind, 1, 2)  # only its keys matter here
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for a {kind} index; "
                         f"known: {', '.join(known) or 'none'}")
    bad = [f"{k}={v}" for k, v in p.items() if not isinstance(v, int) or v < 1]
    if bad:
        raise ValueError(f"{kind} index parameters must be positive integers: {', '.join(bad)}")
    if "nlist" in p and p["nlist"] > n:
        raise ValueError(f"nlist={p['nlist']} is more lists than the {n} vectors to cluster; "
                         f"use at most {n} (default for this gallery: "
                         f"{default_params(kind, n, 2)['nlist']})")
    if "nbits" in p and not 1 <= p["nbits"] <= 16:
        raise ValueError(f"nbits={p['nbits']} must be between 1 and 16")
    return p


def make_index(kind: str, dim: int, p: dict) -> faiss.Index:
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatL2(dim))
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, p["M"])
        inner.hnsw.efConstruction = p["efConstruction"]
        inner.hnsw.efSearch = p["efSearch"]
        return faiss.IndexIDMap2(inner)
    quantizer = faiss.IndexFlatL2(dim)
    if kind == "ivfflat":
        index = faiss.IndexIVFFlat(quantizer, dim, p["nlist"])
    elif kind in ("ivfpq", "seed"):
        if dim % p["M"]:
            raise ValueError(f"PQ M={p['M']} must divide the dimension {dim}")
        index = faiss.IndexIVFPQ(quantizer, dim, p["nlist"], p["M"], p["nbits"])
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
    index.nprobe = p["nprobe"]  # faiss's Python wrapper keeps `quantizer` alive with it
    # k-means warns below 39 points per centroid; small galleries (and the seed preset's
    # 256-centroid PQ codebooks) are fine with fewer, so we say it once in the metadata.
    index.cp.min_points_per_centroid = 1
    if hasattr(index, "pq"):
        index.pq.cp.min_points_per_centroid = 1
    return index


def source_view(splits) -> str:
    return "medsim.gallery" if tuple(splits) == DEFAULT_SPLITS else "medsim.embedded_images"


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


def build(conn, model_ref="current", kind: str = "flat", params: dict | None = None,
          out: Path | str | None = None, splits=DEFAULT_SPLITS, out_dir="medsim_out") -> Built:
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
    row = registry.get(conn, model_ref)
    t0 = time.perf_counter()
    n_before, fp = fingerprint(conn, row.id, splits)
    if n_before == 0:
        raise LookupError(f"model {row.id} has no embeddings in {source_view(splits)} for splits "
                          f"{', '.join(splits)}: run the embedding worker first")
    p = check_params(kind, {**default_params(kind, n_before, row.embedding_dim), **(params or {})},
                     n_before, params or {})
    index = make_index(kind, row.embedding_dim, p)
    batches = list(read_batches(conn, row.id, splits))
    if not index.is_trained:
        xt = np.concatenate([x for _, x in batches])
        rng = np.random.default_rng(0)
        xt = xt[rng.permutation(len(xt))[: 256 * max(p.get("nlist", 1), 1) * 4]]
        index.train(xt)
    for ids, x in batches:
        index.add_with_ids(x, ids)
    n_after, fp_after = fingerprint(conn, row.id, splits)
    if fp_after != fp:  # a worker wrote while we read: the snapshot would be ambiguous
        raise StaleIndex("embeddings changed during the build; run it again once workers are idle")
    seconds = time.perf_counter() - t0
    path = Path(out) if out else Path(out_dir) / "indexes" / f"model{row.id}-{kind}.faiss"
    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path))
    meta = {"model_id": row.id, "model_name": row.name, "kind": kind, "params": p,
            "source_view": source_view(splits), "splits": list(splits), "dim": row.embedding_dim,
            "metric": "l2", "n_rows": int(index.ntotal), "fingerprint": fp,
            "build_seconds": round(seconds, 4), "faiss_version": faiss.__version__}
    meta["build_id"] = conn.execute(Q.insert_index_build, {
        **{k: meta[k] for k in ("model_id", "kind", "source_view", "splits", "dim", "metric",
                                "n_rows", "fingerprint")},
        "params": json.dumps(p), "path": str(path.resolve()), "build_seconds": seconds}).fetchone()[0]
    conn.commit()
    meta_path(path).write_text(json.dumps(meta, indent=2))
    return Built(index, meta, path)


def meta_path(path: Path) -> Path:
    return Path(str(path) + ".json")


def load(conn, path: Path | str, model_ref=None, rebuild_if_stale: bool = False) -> Built:
    """Open an index and check it still describes the database; StaleIndex if not."""
    path = Path(path)
    if not path.exists() or not meta_path(path).exists():
        raise FileNotFoundError(f"{path} (and its .json metadata) not found: build it with `medsim index build`")
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
            conn.commit()
            return build(conn, meta["model_id"], meta["kind"], meta["params"], out=path, splits=meta["splits"])
        raise StaleIndex(f"{path} is stale: {problem}. Rebuild it (medsim index build, or --rebuild).")
    return Built(faiss.read_index(str(path)), meta, path)


def search(index: faiss.Index, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (D, I): L2 distances (not squared) and image ids; -1 ids where fewer than k exist."""
    D, I = index.search(np.ascontiguousarray(xq, np.float32), k)
    return np.sqrt(np.maximum(D, 0)), I
