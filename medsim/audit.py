"""Leakage audit: what makes retrieval figures look better than they are.

- Exact duplicates: the same pixels (sha256) stored more than once, within a split or
  across splits (a test image that is also a training image is found at distance 0), and
  whether the copies are labelled differently (the same picture cannot be two diagnoses).
- Near duplicates: pairs whose embeddings (one model) are closer than a threshold, found
  with a FAISS range search. The default threshold is the model's own: the 95th percentile
  of the distances between a sample of images (up to 200 per audited dataset) and copies
  of them flipped, shifted by 2 pixels or brightened by 10%. It does not shrink when an
  archive full of near-identical images is added (a threshold from nearest-neighbour
  distances did: three archives took it to 4.9e-05 and no flipped copy was found), and
  every report states it.
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
from medsim.queries import Q, rows, scalar

SAMPLE_PER_DATASET = 200
COPY_QUANTILE = 95


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


def copies(x: np.ndarray) -> list[np.ndarray]:
    """(S, S, 3) uint8 model input -> copies a person would call the same picture."""
    shifted = np.pad(x, ((0, 0), (2, 0), (0, 0)), mode="edge")[:, : x.shape[1]]
    brighter = np.clip(x.astype(np.float32) * 1.1, 0, 255).astype(np.uint8)
    return [np.ascontiguousarray(x[:, ::-1]), shifted, brighter]


def copy_threshold(conn, model, datasets) -> float:
    """The 95th percentile of distances between sampled images and their copies."""
    from medsim.training import network

    net = model.load(conn)
    size = net.cfg.image_size
    sample = rows(conn, Q.audit_sample, {"datasets": datasets, "n": SAMPLE_PER_DATASET}, as_=StoredRow)
    originals = []
    for r in sample:
        try:
            originals.append(r.model_input(size))
        except ValueError:  # a row stored broken says nothing about the model
            continue
    if not originals:
        raise NotFound("no image to measure the model's copies with")
    made = [c for x in originals for c in copies(x)]
    z0 = network.embed(net, np.stack(originals))
    z1 = network.embed(net, np.stack(made)).reshape(len(originals), -1, z0.shape[1])
    d = np.linalg.norm(z1 - z0[:, None, :], axis=2).ravel()
    return float(max(np.percentile(d, COPY_QUANTILE), 1e-6))


def near_pairs(ids: np.ndarray, xb: np.ndarray, threshold: float) -> list:
    """-> [(i, j, distance)] with i < j and distance < threshold."""
    import faiss

    index = faiss.IndexFlatL2(xb.shape[1])
    index.add(xb)
    lims, D, I = index.range_search(xb, threshold**2)
    out = []
    for q in range(len(xb)):
        for d, j in zip(D[lims[q]:lims[q + 1]], I[lims[q]:lims[q + 1]], strict=True):
            if q < j:
                out.append((int(ids[q]), int(ids[j]), float(np.sqrt(max(d, 0)))))
    return out


def run(conn, model_ref="current", threshold: float | None = None, datasets: list | None = None) -> dict:
    """Audit the datasets (default all); near duplicates in the model's embeddings. Writes
    one audit row and its findings (the caller owns the transaction)."""
    row = registry.get(conn, model_ref)
    scope = list(datasets) if datasets else None
    vecs = rows(conn, Q.model_vectors, {"model_id": row.id, "datasets": scope}, as_=Vec)
    if not vecs:
        raise NotFound(f"model {row.id} has embedded nothing{' in ' + ', '.join(scope) if scope else ''} yet: "
                       f"run the embedding worker first")
    rule = "given" if threshold is not None else f"the {COPY_QUANTILE}th percentile of the model's own copies"
    if threshold is None:
        threshold = copy_threshold(conn, row, scope)
    ids = np.array([v.image_id for v in vecs], np.int64)
    split = {v.image_id: v.split for v in vecs}
    xb = np.stack([v.embedding.to_numpy() for v in vecs]).astype(np.float32)
    exact = rows(conn, Q.exact_duplicate_pairs, {"datasets": scope}, as_=Pair)
    patients = rows(conn, Q.patient_split_pairs, {"datasets": scope}, as_=Pair)
    exact_set = {(p.image_a, p.image_b) for p in exact}
    near = [(a, b, d) for a, b, d in near_pairs(ids, xb, threshold) if (a, b) not in exact_set]
    summary = {
        "images": int(scalar(conn, Q.count_images, {"datasets": scope})), "embedded": len(vecs),
        "datasets": scope, "threshold": threshold, "threshold_rule": rule,
        "exact_pairs": len(exact), "exact_pairs_across_splits": sum(p.split_a != p.split_b for p in exact),
        "exact_pairs_labels_differ": sum(bool(p.labels_differ) for p in exact),
        "near_pairs": len(near), "near_pairs_across_splits": sum(split[a] != split[b] for a, b, _ in near),
        "patient_pairs_across_splits": len(patients),
    }
    audit_id = scalar(conn, Q.insert_audit, {"model_id": row.id, "threshold": threshold,
                                             "summary": json.dumps(summary)})
    findings = ([("exact", p.image_a, p.image_b, p.split_a, p.split_b, 0.0, p.labels_differ) for p in exact]
                + [("near", a, b, split[a], split[b], d, None) for a, b, d in near]
                + [("patient", p.image_a, p.image_b, p.split_a, p.split_b, None, None) for p in patients])
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
        f"  near duplicates (embedding distance < {r['threshold']:.4g}, {r['threshold_rule']}): {r['near_pairs']} "
        f"pairs, {r['near_pairs_across_splits']} across splits",
        f"  patients in two splits: {r['patient_pairs_across_splits']} image pairs",
        "  details: SELECT * FROM medsim.leakage WHERE across_splits; medsim.exact_duplicates (labels_differ); "
        "medsim.patients_in_two_splits",
    ])
