"""Leakage audit: what makes retrieval figures look better than they are.

- Exact duplicates: the same pixels (sha256) stored more than once, within a split or
  across splits (a test image that is also a training image is found at distance 0).
- Near duplicates: pairs of images whose embeddings (one model) are closer than a
  threshold, found with a FAISS range search. The default threshold is a tenth of the
  median nearest-neighbour distance of that model's embeddings, so it adapts to how
  tightly a model clusters; every report states the threshold used.
- Patients in two splits.

Findings go to medsim.audits / medsim.audit_findings (view medsim.leakage); evaluation
can leave out the test queries involved (evaluate --exclude-leaked).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from medsim import registry
from medsim.errors import NotFound
from medsim.queries import Q, rows, scalar


@dataclass
class Vec:
    image_id: int
    split: str
    embedding: object


@dataclass
class Pair:
    image_a: int
    image_b: int
    split_a: str
    split_b: str


def near_pairs(ids: np.ndarray, xb: np.ndarray, threshold: float | None) -> tuple[list, float]:
    """-> ([(i, j, distance)] with i < j, the threshold used)."""
    import faiss

    index = faiss.IndexFlatL2(xb.shape[1])
    index.add(xb)
    if threshold is None:
        D, _ = index.search(xb, 2)  # itself, then its nearest other image
        nn = np.sqrt(np.maximum(D[:, 1], 0))
        nn = nn[nn > 0]  # exact copies say nothing about how tightly the model clusters
        threshold = float(np.median(nn) / 10) if len(nn) else 1e-6
    lims, D, I = index.range_search(xb, threshold**2)
    out = []
    for q in range(len(xb)):
        for d, j in zip(D[lims[q]:lims[q + 1]], I[lims[q]:lims[q + 1]], strict=True):
            if q < j:
                out.append((int(ids[q]), int(ids[j]), float(np.sqrt(max(d, 0)))))
    return out, threshold


def run(conn, model_ref="current", threshold: float | None = None) -> dict:
    """Audit everything stored; near duplicates in the model's embeddings. Writes one
    audit row and its findings (the caller owns the transaction)."""
    row = registry.get(conn, model_ref)
    vecs = rows(conn, Q.model_vectors, {"model_id": row.id}, as_=Vec)
    if not vecs:
        raise NotFound(f"model {row.id} has embedded nothing yet: run the embedding worker first")
    ids = np.array([v.image_id for v in vecs], np.int64)
    split = {v.image_id: v.split for v in vecs}
    xb = np.stack([v.embedding.to_numpy() for v in vecs]).astype(np.float32)
    near, threshold = near_pairs(ids, xb, threshold)
    exact = rows(conn, Q.exact_duplicate_pairs, as_=Pair)
    patients = rows(conn, Q.patient_split_pairs, as_=Pair)
    exact_set = {(p.image_a, p.image_b) for p in exact}
    near = [(a, b, d) for a, b, d in near if (a, b) not in exact_set]  # an exact copy is not also "near"
    summary = {
        "images": int(scalar(conn, Q.count_images)), "embedded": len(vecs), "threshold": threshold,
        "exact_pairs": len(exact), "exact_pairs_across_splits": sum(p.split_a != p.split_b for p in exact),
        "near_pairs": len(near), "near_pairs_across_splits": sum(split[a] != split[b] for a, b, _ in near),
        "patient_pairs_across_splits": len(patients),
    }
    audit_id = scalar(conn, Q.insert_audit, {"model_id": row.id, "threshold": threshold,
                                             "summary": json.dumps(summary)})
    findings = ([("exact", p.image_a, p.image_b, p.split_a, p.split_b, 0.0) for p in exact]
                + [("near", a, b, split[a], split[b], d) for a, b, d in near]
                + [("patient", p.image_a, p.image_b, p.split_a, p.split_b, None) for p in patients])
    with conn.cursor() as cur, cur.copy(Q.copy_audit_findings) as copy:
        for f in findings:
            copy.write_row((audit_id, *f))
    return {"audit_id": audit_id, "model_id": row.id, **summary}


def format_report(r: dict) -> str:
    return "\n".join([
        f"leakage audit {r['audit_id']} (model {r['model_id']}): {r['images']} images, {r['embedded']} embedded",
        f"  exact duplicates (same pixels): {r['exact_pairs']} pairs, {r['exact_pairs_across_splits']} across splits",
        f"  near duplicates (embedding distance < {r['threshold']:.4g}): {r['near_pairs']} pairs, "
        f"{r['near_pairs_across_splits']} across splits",
        f"  patients in two splits: {r['patient_pairs_across_splits']} image pairs",
        "  details: SELECT * FROM medsim.leakage WHERE across_splits; medsim.exact_duplicates; "
        "medsim.patients_in_two_splits",
    ])
