"""Recall of FAISS indexes (and pgvector HNSW) against pgvector exact search.

Ground truth is pgvector exact search (index scans disabled) for every query. Recall
is tie-aware, in the spirit of faiss contrib/evaluation.py: a returned neighbour
counts when its true distance is within the k-th exact distance, so equal distances
returned in any order are not punished. Throughput and latency are measured one query
at a time for every engine, so the numbers compare.
"""

from __future__ import annotations

import json
import time

import numpy as np
from psycopg import sql

from medsim import registry
from medsim.errors import BadArgument, NotFound
from medsim.queries import Q, scalar
from medsim.search import GALLERY_SPLITS, faiss_index, pgvector_hnsw

DEFAULT_KS = (1, 10, 100)
DEFAULT_EF = (10, 20, 40, 80, 160)


def knn_query(dim: int) -> sql.Composed:
    expr = sql.SQL("e.embedding::vector({d}) <-> %(q)s::vector({d})").format(d=sql.Literal(int(dim)))
    return sql.SQL(
        "SELECT e.image_id, {expr} FROM medsim.embeddings e JOIN medsim.images i ON i.id = e.image_id "
        "WHERE e.model_id = %(model_id)s AND i.split = ANY(%(splits)s) ORDER BY {expr} LIMIT %(k)s"
    ).format(expr=expr)


def pgvector_search(conn, model_id: int, dim: int, xq: np.ndarray, k: int, splits,
                    exact: bool, ef_search: int | None = None):
    """-> (D, I, latencies_s, plan_uses_hnsw). exact: index scans off (sequential scan +
    sort). Otherwise the model's HNSW index with the given ef_search and strict iterative
    scans (so the split filter cannot starve the result); sequential scans are disabled
    because on a small gallery the planner rightly prefers one, and we are measuring the
    index. Whether the plan really used it is checked with EXPLAIN and returned."""
    q = knn_query(dim)
    D = np.full((len(xq), k), np.inf, np.float32)
    I = np.full((len(xq), k), -1, np.int64)
    lat = np.empty(len(xq))
    with conn.transaction():
        if exact:
            conn.execute("SET LOCAL enable_indexscan = off")
        else:
            conn.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(int(ef_search))))
            conn.execute("SET LOCAL hnsw.iterative_scan = strict_order")
            conn.execute("SET LOCAL enable_seqscan = off")
        params = {"q": xq[0], "model_id": model_id, "splits": list(splits), "k": k}
        plan = "\n".join(r[0] for r in conn.execute(sql.SQL("EXPLAIN ") + q, params, prepare=False))
        uses_hnsw = pgvector_hnsw.index_name(model_id) in plan
        for i, v in enumerate(xq):
            t0 = time.perf_counter()
            # prepare=False: a prepared (generic) plan cannot prove the partial index's
            # `model_id = M` predicate and would fall back to a sequential scan
            rows = conn.execute(q, {"q": v, "model_id": model_id, "splits": list(splits), "k": k},
                                prepare=False).fetchall()
            lat[i] = time.perf_counter() - t0
            if rows:
                I[i, : len(rows)] = [r[0] for r in rows]
                D[i, : len(rows)] = [r[1] for r in rows]
        # inside an outer transaction this block is only a savepoint, and SET LOCAL would
        # outlive it: reset explicitly so the next measurement starts clean
        for setting in ("enable_indexscan", "enable_seqscan", "hnsw.ef_search", "hnsw.iterative_scan"):
            conn.execute(sql.SQL("RESET {}").format(sql.Identifier(*setting.split("."))))
    return D, I, lat, uses_hnsw


def faiss_search_timed(index, xq: np.ndarray, k: int):
    D = np.empty((len(xq), k), np.float32)
    I = np.empty((len(xq), k), np.int64)
    lat = np.empty(len(xq))
    for i in range(len(xq)):
        t0 = time.perf_counter()
        d, ids = faiss_index.search(index, xq[i : i + 1], k)
        lat[i] = time.perf_counter() - t0
        D[i], I[i] = d[0], ids[0]
    t0 = time.perf_counter()
    faiss_index.search(index, xq, k)
    batch_qps = len(xq) / (time.perf_counter() - t0)
    return D, I, lat, batch_qps


def tie_aware_recall(xq, I_res, D_gt, gallery_ids, xb, k: int) -> float:
    """Mean over queries of |{returned in top k with true distance <= k-th exact}| / k'.

    k' = min(k, gallery size). True distances of returned ids are recomputed from xb,
    so approximate (e.g. PQ) distances cannot flatter an index.
    """
    kk = min(k, len(gallery_ids))
    n = len(gallery_ids)
    hits = 0
    for qi in range(len(xq)):
        ids = np.unique(I_res[qi, :k])  # duplicates cannot count twice
        ids = ids[ids >= 0]
        pos = np.minimum(np.searchsorted(gallery_ids, ids), n - 1)
        pos = pos[gallery_ids[pos] == ids]  # ids outside the gallery are misses
        d = np.linalg.norm(xb[pos] - xq[qi], axis=1)
        hits += int((d <= D_gt[qi, kk - 1] * (1 + 1e-5) + 1e-6).sum())
    return hits / (len(xq) * kk)


def drop_self(I: np.ndarray, D: np.ndarray | None, qids: np.ndarray, k: int):
    """Results for k + 1 neighbours -> k, without each query's own image. When the
    queries are in the gallery (the default gallery holds every split), every engine finds
    the query itself at distance 0: recall is then measured as if it were not there, the
    same for the ground truth and for the engine under test."""
    keep = qids[:, None] != I
    keep[keep.sum(axis=1) > k, -1] = False  # the query was not found: drop the farthest
    I = I[keep].reshape(len(I), k)
    return I, (None if D is None else D[keep].reshape(len(D), k))


def latency_stats(lat: np.ndarray) -> dict:
    return {"qps": float(len(lat) / lat.sum()), "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3)}


def report(conn, builds: list, ks=DEFAULT_KS, query_splits=("test",), ef_searches=DEFAULT_EF,
           model_ref=None, store: bool = True, max_queries: int | None = None, seed: int = 0) -> dict:
    """Recall table for the given FAISS builds (same model) plus pgvector exact and HNSW.
    max_queries: a seeded sample of the query images (exact ground truth costs one
    brute-force scan per query, which at a million images is the slow part)."""
    row = registry.get(conn, builds[0].meta["model_id"] if builds else model_ref)
    model_id = row.id
    if any(b.meta["model_id"] != model_id for b in builds):
        raise BadArgument("all indexes in one report must belong to the same model")
    splits = builds[0].meta["splits"] if builds else list(GALLERY_SPLITS)
    qrows = conn.execute(Q.query_vectors, {"model_id": model_id, "splits": list(query_splits)}).fetchall()
    if not qrows:
        raise NotFound(f"model {model_id} has no embedded {'/'.join(query_splits)} images to query with")
    n_all = len(qrows)
    if max_queries is not None and 0 < max_queries < n_all:
        pick = np.sort(np.random.default_rng(seed).choice(n_all, max_queries, replace=False))
        qrows = [qrows[i] for i in pick]
    xq = np.stack([r[1].to_numpy() for r in qrows]).astype(np.float32)
    qids = np.array([r[0] for r in qrows], np.int64)
    batches = list(faiss_index.read_batches(conn, model_id, splits))
    gallery_ids = np.concatenate([b[0] for b in batches])
    xb = np.concatenate([b[1] for b in batches])
    kmax = max(ks)
    # queries inside the gallery: one more neighbour each, then their own image dropped
    inside = bool(set(query_splits) & set(splits))
    kq = kmax + 1 if inside else kmax

    def own(I, D=None):
        return drop_self(I, D, qids, kmax) if inside else (I, D)

    t_gt = time.perf_counter()
    D_gt, I_gt, lat, _ = pgvector_search(conn, model_id, row.embedding_dim, xq, kq, splits, exact=True)
    t_gt = time.perf_counter() - t_gt
    I_gt, D_gt = own(I_gt, D_gt)
    rows = [{"engine": "pgvector", "kind": "exact", "params": {},
             "recall": {str(k): tie_aware_recall(xq, I_gt, D_gt, gallery_ids, xb, k) for k in ks},
             **latency_stats(lat)}]
    if pgvector_hnsw.exists(conn, model_id):
        for ef in ef_searches:
            _, I, lat, used = pgvector_search(conn, model_id, row.embedding_dim, xq, kq, splits,
                                              exact=False, ef_search=ef)
            I, _ = own(I)
            rows.append({"engine": "pgvector", "kind": "hnsw", "params": {"ef_search": ef}, "plan_uses_hnsw": used,
                         "recall": {str(k): tie_aware_recall(xq, I, D_gt, gallery_ids, xb, k) for k in ks},
                         **latency_stats(lat)})
    for b in builds:
        _, I, lat, batch_qps = faiss_search_timed(b.index, xq, kq)
        I, _ = own(I)
        rows.append({"engine": "faiss", "kind": b.meta["kind"], "params": b.meta["params"],
                     "build_id": b.meta.get("build_id"), "build_seconds": b.meta["build_seconds"],
                     "recall": {str(k): tie_aware_recall(xq, I, D_gt, gallery_ids, xb, k) for k in ks},
                     **latency_stats(lat), "batch_qps": batch_qps})
    exact_qps = rows[0]["qps"]
    for r in rows:
        r["speedup_vs_exact"] = r["qps"] / exact_qps
    out = {"model_id": model_id, "n_queries": len(xq), "n_query_images": n_all, "ground_truth_s": t_gt,
           "n_gallery": len(gallery_ids),
           "gallery_splits": list(splits), "query_splits": list(query_splits), "queries_in_gallery": inside,
           "ks": list(ks), "rows": rows}
    if store:
        out["report_id"] = scalar(conn, Q.insert_recall_report, {
            "model_id": model_id, "build_ids": [b.meta.get("build_id") for b in builds if b.meta.get("build_id")],
            "report": json.dumps(out)})
    return out


def format_table(r: dict) -> str:
    ks = r["ks"]
    sampled = (f" (a seeded sample of {r['n_query_images']})"
               if r.get("n_query_images", r["n_queries"]) > r["n_queries"] else "")
    lines = [f"recall vs pgvector exact: model {r['model_id']}, {r['n_queries']} queries{sampled} "
             f"({'/'.join(r['query_splits'])}) over {r['n_gallery']} gallery vectors "
             f"({'/'.join(r['gallery_splits'])})"
             + ("; each query's own image left out of every engine's answer" if r.get("queries_in_gallery") else ""),
             f"{'engine':9s} {'kind':8s} {'params':34s}" + "".join(f"{'R@' + str(k):>8s}" for k in ks)
             + f"{'q/s':>9s}{'p50 ms':>8s}{'p99 ms':>8s}{'x exact':>8s}"]
    for row in r["rows"]:
        params = ",".join(f"{k}={v}" for k, v in row["params"].items())
        if row.get("plan_uses_hnsw") is False:
            params += " (NOT the index!)"
        lines.append(f"{row['engine']:9s} {row['kind']:8s} {params[:34]:34s}"
                     + "".join(f"{row['recall'][str(k)]:8.4f}" for k in ks)
                     + f"{row['qps']:9.0f}{row['p50_ms']:8.2f}{row['p99_ms']:8.2f}{row['speedup_vs_exact']:8.1f}")
    return "\n".join(lines)
