"""The engines a search can run on: pgvector (the model's HNSW index, or an exact scan)
and FAISS (the model's latest build). Each returns the same Hits for the same request;
tests hold them to pgvector exact search."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg.types.json import Jsonb

from medsim.queries import Q, rows
from medsim.search import MAX_K


@dataclass
class Hit:
    image_id: int
    dataset: str
    split: str
    label_name: str  # for display: names joined with ", "
    label_names: list  # the names themselves: what "same label" and filters compare
    distance: float
    patient_key: str | None = None
    study_id: str | None = None
    p_same: float | None = None  # calibrated P(same diagnosis as the query), when fitted
    same_label: bool | None = None  # the query's label is one of this image's (None: the query has none)
    viewer_url: str | None = None  # its study in the PACS's viewer (images a PACS sync stored; filled by callers)


@dataclass
class _Meta:
    image_id: int
    dataset: str
    split: str
    label_name: str
    label_names: list
    patient_key: str | None
    study_id: str | None


def pgvector(ctx, model_id: int, q, k: int, f, exact: bool) -> list[Hit]:
    """medsim.search_gallery: HNSW when the model has its index; `exact` turns index scans
    off for this one statement (SET LOCAL in its own transaction), a sequential scan."""
    exclude = q.in_gallery[0] if len(q.in_gallery) == 1 else None
    args = {"q": q.vector, "k": min(k + len(q.in_gallery), MAX_K), "model_id": model_id,
            "filter": Jsonb(f.where), "exclude_patient": f.exclude_patient(q.patient_key), "exclude": exclude,
            "per_patient": f.per_patient, "splits": list(f.splits)}
    conn = ctx.conn
    if exact:
        with conn.transaction():
            conn.execute("SET LOCAL enable_indexscan = off")
            hits = rows(conn, Q.search_gallery, args, as_=Hit)
    else:
        hits = rows(conn, Q.search_gallery, args, as_=Hit)
    return [h for h in hits if h.image_id not in q.in_gallery][:k]


def faiss(ctx, model_id: int, q, k: int, f) -> tuple[list[Hit], int]:
    """The model's FAISS index (ctx.faiss), restricted by an IDSelector to the rows the same
    filter allows in SQL -> (hits, build id). With a per-patient cap, fetch more until k
    survive it (or none are left)."""
    from medsim.search import faiss_index

    built = ctx.faiss(model_id, f.splits)
    params = ctx.selector(model_id, f.where, f.exclude_patient(q.patient_key), f.splits)
    want = k + len(q.in_gallery)
    fetch = want if f.per_patient is None else want * 4
    ntotal = built.index.ntotal
    while True:
        D, I = faiss_index.search(built.index, q.vector[None], min(fetch, ntotal), params)
        pairs = [(int(i), float(d)) for d, i in zip(D[0], I[0], strict=True) if i >= 0 and i not in q.in_gallery]
        meta = {m.image_id: m for m in rows(ctx.conn, Q.image_metadata, {"ids": [i for i, _ in pairs]}, as_=_Meta)}
        hits, per = [], {}
        for i, d in pairs:
            m = meta.get(i)
            if m is None:  # not readable by this role (a grant revoked since the selector was built)
                continue
            group = m.patient_key or f"image:{i}"
            if f.per_patient is not None and per.get(group, 0) >= f.per_patient:
                continue
            per[group] = per.get(group, 0) + 1
            hits.append(Hit(distance=d, **vars(m)))
        exhausted = (I[0] < 0).any() or fetch >= ntotal
        if len(hits) >= k or f.per_patient is None or exhausted:
            return hits[:k], built.meta["build_id"]
        fetch *= 4
