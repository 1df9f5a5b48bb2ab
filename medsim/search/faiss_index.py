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

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from psycopg import sql

from medsim import registry
from medsim.errors import BadArgument, DataRefused, NotFound, StaleIndex
from medsim.queries import Q, one, scalar
from medsim.search import GALLERY_SPLITS
from medsim.search.index_builds import BuildLine, BuildRow, DeletionAfter, builds, latest_build
from medsim.search.index_files import (
    default_path,
    file_sha256,
    meta_path,
    path_lock,
    read_meta,
    rebuild_command,
    remove_files_before,
)
from medsim.search.index_kinds import Kind, kind, resolve_params

__all__ = ["BuildLine", "Built", "build", "builds", "latest_build", "load", "load_build", "meta_path",
           "remove_files_before", "search", "still_fresh"]

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


SPLITS = ("train", "val", "test")


def check_splits(splits) -> tuple[str, ...]:
    """Refuse split names that cannot exist (they used to be recorded with an empty index)."""
    splits = tuple(splits)
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or not splits:
        raise BadArgument(f"unknown split(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SPLITS)}")
    return splits


def source_view(splits) -> str:
    return "medsim.gallery" if tuple(splits) == GALLERY_SPLITS else "medsim.embedded_images"


def read_batches(conn, model_id: int, splits, batch_size: int = 4096, sample: int | None = None):
    """Yield (ids (n,) int64, xb (n, dim) float32) from the view via a server-side cursor,
    in id order; or, with `sample`, that many rows in a fixed pseudo-random order."""
    schema, name = source_view(splits).split(".")
    q = sql.SQL("SELECT image_id, embedding FROM {} WHERE model_id = %s AND split = ANY(%s) ").format(
        sql.Identifier(schema, name))
    args = [model_id, list(splits)]
    if sample is None:
        q += sql.SQL("ORDER BY image_id")
    else:
        q += sql.SQL("ORDER BY hashint8(image_id) LIMIT %s")
        args.append(int(sample))
    with conn.transaction(), conn.cursor(name="medsim_faiss_read") as cur:
        cur.itersize = batch_size
        cur.execute(q, args)
        while rows := cur.fetchmany(batch_size):
            yield (np.array([r[0] for r in rows], np.int64),
                   np.stack([r[1].to_numpy() for r in rows]).astype(np.float32))


def gallery_version(conn, model_id: int) -> int:
    """The model's gallery version: one indexed lookup (revision 0011)."""
    return int(scalar(conn, Q.gallery_version, {"model_id": model_id}))


TRAIN_PER_LIST = 64


def read_sample(conn, model_id: int, splits, n: int) -> np.ndarray:
    """Up to n vectors, a fixed pseudo-random sample (ordered by a hash of the id, so a
    rebuild trains on the same points and no dataset's block of ids dominates), read in
    batches like the gallery itself."""
    return np.concatenate([x for _, x in read_batches(conn, model_id, splits, sample=n)])


def fingerprint(conn, model_id: int, splits) -> tuple[int, str]:
    n, digest = conn.execute(Q.embedding_fingerprint, {"model_id": model_id, "splits": list(splits)}).fetchone()
    return int(n), digest


@dataclass
class Built:
    index: faiss.Index
    meta: dict
    path: Path


def build(conn, model_ref="current", kind_name: str = "flat", params: dict | None = None,
          out: Path | str | None = None, splits=GALLERY_SPLITS, out_dir="medsim_out",
          index_dir: Path | str | None = None) -> Built:
    """Build, write index + metadata, record the build. The file is `out`, else one named
    after the build in `index_dir` (default: <out_dir>/indexes). Builds to the same `out`
    take their ids and write one after another (index_files.path_lock). Writes one row;
    the caller owns the transaction (with autocommit it commits on its own)."""
    k = kind(kind_name)
    splits = check_splits(splits)
    row = registry.get(conn, model_ref)
    t0 = time.perf_counter()
    version = gallery_version(conn, row.id)
    n_before, fp = fingerprint(conn, row.id, splits)
    if n_before == 0:
        raise NotFound(f"model {row.id} has no embeddings in {source_view(splits)} for splits "
                       f"{', '.join(splits)}: run the embedding worker first")
    p = resolve_params(k, params or {}, n_before, row.embedding_dim)
    index = make_index(k, row.embedding_dim, p)
    if not index.is_trained:
        # k-means learns from a sample read on its own (64 points per list, FAISS's advice
        # is 30-256), then every vector streams in batch by batch: the process holds the
        # index and one batch, never the whole gallery as Python lists
        # (a PQ's codebooks are k-means too: 2^nbits centroids per sub-vector)
        centroids = max(p.get("nlist", 1), 2 ** p["nbits"] if "nbits" in p else 1)
        index.train(read_sample(conn, row.id, splits, TRAIN_PER_LIST * centroids))
    for ids, x in read_batches(conn, row.id, splits):
        index.add_with_ids(x, ids)
    # a worker committed while we read: the snapshot would be ambiguous. The version
    # moves with every such commit, so this costs one lookup, not a second hash.
    if gallery_version(conn, row.id) != version:
        raise StaleIndex("embeddings changed during the build; run it again once workers are idle")
    seconds = time.perf_counter() - t0
    # a file named by the caller may be another build's target too: the id, the files and
    # the row under its lock (a default path is named after the build, so it is its own)
    with path_lock(Path(out)) if out else contextlib.nullcontext():
        return _write(conn, index, k, p, row, splits, fp, version, seconds, out, index_dir or Path(out_dir) / "indexes")


def _write(conn, index, k: Kind, p: dict, row, splits, fp: str, version: int, seconds: float, out,
           index_dir) -> Built:
    import faiss

    build_id = scalar(conn, Q.next_index_build_id)
    path = Path(out) if out else default_path(index_dir, row.id, k.name, build_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written under a temporary name and renamed into place: a reader never opens half a
    # file, and a crash leaves no file under the build's name
    tmp = path.with_name(f".{path.name}.{build_id}.tmp")
    faiss.write_index(index, str(tmp))
    sha, size = file_sha256(tmp)
    meta = {"build_id": build_id, "model_id": row.id, "model_name": row.name, "kind": k.name,
            "factory": k.factory.format(**p), "params": p, "source_view": source_view(splits),
            "splits": list(splits), "dim": row.embedding_dim, "metric": "l2",
            "n_rows": int(index.ntotal), "fingerprint": fp, "gallery_version": version,
            "file_sha256": sha, "file_bytes": size,
            "build_seconds": round(seconds, 4), "faiss_version": faiss.__version__}
    tmp_meta = tmp.with_name(tmp.name + ".json")
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path)
    os.replace(tmp_meta, meta_path(path))
    conn.execute(Q.insert_index_build, {
        **{key: meta[key] for key in ("build_id", "model_id", "kind", "source_view", "splits", "dim",
                                      "metric", "n_rows", "fingerprint", "file_sha256", "file_bytes",
                                      "gallery_version")},
        "params": json.dumps(p), "path": str(path.resolve()), "build_seconds": seconds})
    return Built(index, meta, path)


def load(conn, path: Path | str, model_ref=None, rebuild_if_stale: bool = False,
         build_id: int | None = None, recorded: BuildRow | None = None) -> Built:
    """Open an index, once, after checking that it is the file its build wrote and that it
    still describes the database: StaleIndex (or DataRefused, NotFound) with the fix if
    not. Its search-time parameters are set from the metadata. ``recorded``: the build's
    row, when loaded by build id; the fix rebuilds what it records, whatever the file holds."""
    path = Path(path)
    # Loaded by build id (the service, --engine faiss), a message names the build, never a
    # server path (an HTTP answer carries it); given a file (--index), it names the file.
    where = f"FAISS build {build_id}'s file" if build_id is not None else str(path)
    if recorded is not None:
        rebuild = f"Rebuild it: {rebuild_command(recorded.model_id, recorded.kind, recorded.splits)}."
    if not path.exists():
        if recorded is None:
            raise NotFound(f"{where} does not exist: build one with `medsim index build`")
        # the build is on record and its file is gone (a deletion removed it, or a person):
        # the database holds everything to make it again, so this is a stale index (409),
        # not an unknown one
        deleted = one(conn, Q.deletion_after, {"build_id": recorded.id}, as_=DeletionAfter)
        why = f" (deletion {deleted.id} removed it: it held deleted vectors)" if deleted is not None else ""
        raise StaleIndex(f"{where} is missing{why}. {rebuild}")
    meta = read_meta(path)
    if recorded is None:
        rebuild = f"Rebuild it: {rebuild_command(meta['model_id'], meta['kind'], meta['splits'])}."
    if build_id is not None and meta["build_id"] != build_id:
        raise StaleIndex(f"{where} now holds build {meta['build_id']} (another build was written over it). "
                         f"{rebuild}")
    sha, size = file_sha256(path)
    if sha != meta["file_sha256"]:
        raise StaleIndex(f"{where} is not the file build {meta['build_id']} wrote ({size} bytes, sha256 "
                         f"{sha[:12]}..., the metadata says {meta['file_sha256'][:12]}...): it was replaced, "
                         f"truncated or overwritten. {rebuild}")
    recorded = one(conn, Q.index_build, {"id": meta["build_id"]}, as_=BuildRow)
    if recorded is None or recorded.file_sha256 != sha:
        raise StaleIndex(f"{where} holds build {meta['build_id']}, which "
                         + ("this database has no record of" if recorded is None else
                            "medsim.index_builds records with other contents") + f". {rebuild}")
    if os.path.realpath(recorded.path) != os.path.realpath(path):
        # a build's .faiss and .json copied over another build's: consistent with each other,
        # and with their own row, but not the file asked for
        raise StaleIndex(f"{where} holds build {meta['build_id']}, which medsim.index_builds records at another "
                         f"file: it was copied or moved. {rebuild}")
    deleted = one(conn, Q.deletion_after, {"build_id": meta["build_id"]}, as_=DeletionAfter)
    wanted = registry.get(conn, model_ref).id if model_ref is not None else meta["model_id"]
    problem = None
    if deleted is not None:
        problem = (f"it was built before deletion {deleted.id} ({deleted.kind}, {deleted.deleted_at:%Y-%m-%d %H:%M}) "
                   f"and may hold deleted vectors: remove the file")
    elif wanted != meta["model_id"]:
        problem = f"it was built for model {meta['model_id']}, not model {wanted}"
    elif meta.get("gallery_version") is not None and gallery_version(conn, wanted) == meta["gallery_version"]:
        pass  # nothing touched the model's embeddings since the build: no need to hash them
    else:
        n, fp = fingerprint(conn, meta["model_id"], meta["splits"])
        if n != meta["n_rows"]:
            problem = (f"it holds {meta['n_rows']} rows of model {meta['model_id']}, the database now has "
                       f"{n} ({n - meta['n_rows']:+d})")
        elif fp != meta["fingerprint"]:
            problem = "the row count is unchanged but embeddings or image ids differ (re-embedded or replaced)"
    if problem:
        if rebuild_if_stale:
            return build(conn, meta["model_id"], meta["kind"], meta["params"], splits=meta["splits"],
                         index_dir=path.parent)
        raise StaleIndex(f"{where} is stale: {problem}. {rebuild}")
    import faiss

    try:
        index = faiss.read_index(str(path))
    except RuntimeError as err:  # checksum matched, so the build itself wrote a bad file
        raise DataRefused(f"{where}: FAISS cannot read it ({str(err).splitlines()[0]}). {rebuild}") from None
    if index.ntotal != meta["n_rows"] or index.d != meta["dim"]:
        raise StaleIndex(f"{where} holds {index.ntotal} vectors of dimension {index.d}, its metadata says "
                         f"{meta['n_rows']} of {meta['dim']}. {rebuild}")
    set_params(index, meta["params"], kind(meta["kind"]).search_params)
    return Built(index, meta, path)


def still_fresh(conn, built: Built) -> bool:
    """The per-request check of a loaded index: one lookup. False for a build made before
    revision 0011 (no version recorded): the caller reloads it, which checks the fingerprint."""
    v = built.meta.get("gallery_version")
    return v is not None and gallery_version(conn, built.meta["model_id"]) == v


def load_build(conn, build_id: int, model_ref=None, rebuild_if_stale: bool = False) -> Built:
    recorded = one(conn, Q.index_build, {"id": build_id}, as_=BuildRow)
    if recorded is None:
        raise NotFound(f"no index build with id {build_id} (see `medsim index list`)")
    return load(conn, recorded.path, model_ref=model_ref, rebuild_if_stale=rebuild_if_stale, build_id=build_id,
                recorded=recorded)


def search(index: faiss.Index, xq: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
    """-> (D, I): L2 distances (not squared) and image ids; -1 ids where fewer than k exist.

    A single query to a flat or HNSW index runs on one OpenMP thread. Split over the
    cores it finishes in about 0.1 ms, but whenever another process holds a core, the
    parallel region waits for a thread the scheduler put aside: beside one busy process
    on this 2-core machine, HNSW answered 1,487 single queries/s (p99 8 ms) on two
    threads and 13,646 (p99 0.14 ms) on one. IVF indexes keep every thread (they split a
    single query over its lists, and measured faster that way even under load), as do
    batches."""
    import faiss

    xq = np.ascontiguousarray(xq, np.float32)
    if len(xq) == 1 and faiss.try_extract_index_ivf(index) is None:
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # this thread's setting: other threads keep theirs
        try:
            D, I = index.search(xq, k, params=params)
        finally:
            faiss.omp_set_num_threads(before)
    else:
        D, I = index.search(xq, k, params=params)
    return np.sqrt(np.maximum(D, 0)), I
