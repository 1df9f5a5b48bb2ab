"""Leakage audit: what makes retrieval figures look better than they are.

- Exact duplicates: the same pixels (sha256) stored more than once, within a split or
  across splits (a test image that is also a training image is found at distance 0), and
  whether the copies are labelled differently (the same picture cannot be two diagnoses).
- Near duplicates: the same picture flipped, shifted a little, or brighter. Each image's 10
  nearest neighbours in the model's embedding are candidates, and a candidate is a near
  duplicate when the two images' pixels, at the model's input size, correlate at 0.995 or
  more once aligned (the better of flipped or not, shifted by up to 2 pixels). The rule is
  the pixels', not the embedding's: a threshold on embedding distances (a tenth of the
  median nearest-neighbour distance) fell to 4.9e-05 once three archives were present and
  found no flipped copy, while one set from the model's own copies flagged most of an
  archive (a 2-pixel shift moves the demo model's embedding further than the distance to
  a different image's). `threshold` (an embedding distance) brings the older rule back.
- Patients in two splits.

`datasets` scopes everything to those datasets. Findings go to medsim.audits /
medsim.audit_findings (view medsim.leakage); evaluation can leave out the test queries
involved (evaluate --exclude-leaked, within the model's own datasets).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from medsim import registry
from medsim.errors import NotFound
from medsim.images import StoredRow
from medsim.images.copies import (  # noqa: F401 (the pixel rule's names, as the search pipeline imports them)
    CANDIDATES,
    CHUNK,
    MAX_SHIFT,
    MIN_CORRELATION,
    aligned_correlation,
    candidates,
    near_copies,
)
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
    labels_differ: bool | None = None


def verified_pairs(conn, model, ids: np.ndarray, xb: np.ndarray, datasets) -> list:
    """Near duplicates by the pixel rule -> [(id a, id b, embedding distance, correlation)]."""
    size = int(model.config.get("image_size", 28))
    grey = np.zeros((len(ids), size, size), np.uint8)
    row_of = {int(i): n for n, i in enumerate(ids)}
    for r in rows(conn, Q.audit_pixels, {"model_id": model.id, "datasets": datasets}, as_=StoredRow):
        try:
            grey[row_of[r.id]] = r.model_input(size).mean(axis=2).round().astype(np.uint8)
        except ValueError:  # a row stored broken: nothing to compare (it stays all zeros, r = -1)
            continue
    return [(int(ids[x]), int(ids[y]), float(dist), float(c)) for x, y, dist, c in near_copies(grey, xb)]


def distance_pairs(ids: np.ndarray, xb: np.ndarray, threshold: float) -> list:
    """The older rule: embedding distance under threshold -> [(id a, id b, distance, None)]."""
    import faiss

    index = faiss.IndexFlatL2(xb.shape[1])
    index.add(xb)
    lims, D, I = index.range_search(xb, threshold**2)
    return [(int(ids[q]), int(ids[j]), float(np.sqrt(max(d, 0))), None)
            for q in range(len(xb)) for d, j in zip(D[lims[q]:lims[q + 1]], I[lims[q]:lims[q + 1]], strict=True)
            if q < j]


def run(conn, model_ref="current", threshold: float | None = None, datasets: list | None = None) -> dict:
    """Audit the datasets (default all); near duplicates among the model's embeddings. Writes
    one audit row and its findings (the caller owns the transaction)."""
    row = registry.get(conn, model_ref)
    scope = list(datasets) if datasets else None
    vecs = rows(conn, Q.model_vectors, {"model_id": row.id, "datasets": scope}, as_=Vec)
    if not vecs:
        raise NotFound(f"model {row.id} has embedded nothing{' in ' + ', '.join(scope) if scope else ''} yet: "
                       f"run the embedding worker first")
    ids = np.array([v.image_id for v in vecs], np.int64)
    split = {v.image_id: v.split for v in vecs}
    xb = np.stack([v.embedding.to_numpy() for v in vecs]).astype(np.float32)
    if threshold is None:
        rule = (f"pixels correlating at {MIN_CORRELATION} or more once aligned (flipped or not, shifted by up to "
                f"{MAX_SHIFT} px), among each image's {CANDIDATES} nearest neighbours")
        near = verified_pairs(conn, row, ids, xb, scope)
    else:
        rule = f"embedding distance under {threshold:.4g}"
        near = distance_pairs(ids, xb, threshold)
    exact = rows(conn, Q.exact_duplicate_pairs, {"datasets": scope}, as_=Pair)
    patients = rows(conn, Q.patient_split_pairs, {"datasets": scope}, as_=Pair)
    exact_set = {(p.image_a, p.image_b) for p in exact}
    near = [n for n in near if (n[0], n[1]) not in exact_set]  # an exact copy is not also "near"
    summary = {
        "images": int(scalar(conn, Q.count_images, {"datasets": scope})), "embedded": len(vecs),
        "datasets": scope, "near_rule": rule, "threshold": threshold,
        "exact_pairs": len(exact), "exact_pairs_across_splits": sum(p.split_a != p.split_b for p in exact),
        "exact_pairs_labels_differ": sum(bool(p.labels_differ) for p in exact),
        "near_pairs": len(near), "near_pairs_across_splits": sum(split[a] != split[b] for a, b, _, _ in near),
        "patient_pairs_across_splits": len(patients),
    }
    audit_id = scalar(conn, Q.insert_audit, {"model_id": row.id, "threshold": threshold,
                                             "summary": json.dumps(summary)})
    findings = ([("exact", p.image_a, p.image_b, p.split_a, p.split_b, 0.0, p.labels_differ, 1.0) for p in exact]
                + [("near", a, b, split[a], split[b], d, None, c) for a, b, d, c in near]
                + [("patient", p.image_a, p.image_b, p.split_a, p.split_b, None, None, None) for p in patients])
    with conn.cursor() as cur, cur.copy(Q.copy_audit_findings) as copy:
        for f in findings:
            copy.write_row((audit_id, *f))
    return {"audit_id": audit_id, "model_id": row.id, **summary}


def format_report(r: dict) -> str:
    scope = f" in {', '.join(r['datasets'])}" if r.get("datasets") else ""
    return "\n".join([
        f"leakage audit {r['audit_id']} (model {r['model_id']}): {r['images']} images{scope}, {r['embedded']} embedded",
        f"  exact duplicates (same pixels): {r['exact_pairs']} pairs, {r['exact_pairs_across_splits']} across splits, "
        f"{r['exact_pairs_labels_differ']} with different labels",
        f"  near duplicates ({r['near_rule']}): {r['near_pairs']} pairs, {r['near_pairs_across_splits']} across splits",
        f"  patients in two splits: {r['patient_pairs_across_splits']} image pairs",
        "  details: SELECT * FROM medsim.leakage WHERE across_splits; medsim.exact_duplicates (labels_differ); "
        "medsim.patients_in_two_splits",
    ])
