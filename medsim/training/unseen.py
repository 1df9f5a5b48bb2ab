"""Calibration queries seen as a new patient would be: a validation (or test) query's
neighbours leave out the gallery images of its own patient and near copies of it (the
leakage audit's pixel rule, medsim.images.copies.near_copies), as a search leaves out the query's
own patient. Without this a split seeded with copies of training images finds its copy
at distance ~0, votes right, and the fit promises a new patient more than it gets
(the audit found 62 BreastMNIST pairs across splits, 2,364 on an MRI archive)."""

from __future__ import annotations

import numpy as np

from medsim.images import copies as pixel_rule
from medsim.training import metrics

EXTRA = 10  # neighbours fetched past k besides the largest patient's images, to fill in for those left out


def near_copy_rows(grey_q: np.ndarray, zq: np.ndarray, grey_b: np.ndarray, zb: np.ndarray) -> list[tuple[int, int]]:
    """(query row, gallery row) pairs that are near copies by the audit's pixel rule."""
    if not len(zq) or not len(zb):
        return []
    nq = len(zq)
    grey = np.concatenate([grey_q, grey_b])
    found = pixel_rule.near_copies(grey, np.ascontiguousarray(np.concatenate([zq, zb]), np.float32),
                              keep=lambda a, b: (a < nq) != (b < nq))
    return [(min(a, b), max(a, b) - nq) for a, b, _, _ in found]


def knn(zq, zb, k: int, q_patients=None, b_patients=None, copies=()) -> tuple[np.ndarray, np.ndarray, dict]:
    """The k nearest gallery rows of each query, nearest first, leaving out those of the
    query's patient (equal non-empty keys) and its near copies (query row, gallery row)
    -> (D, I, {"patient": n, "near_copy": n} left out). A query with fewer than k others
    keeps the nearest of the rest (rare: a patient holding nearly the whole gallery)."""
    per_patient = 0
    if b_patients is not None:
        keys = [p for p in b_patients if p]
        per_patient = max(np.unique(keys, return_counts=True)[1], default=0) if keys else 0
    depth = min(len(zb), k + (EXTRA + per_patient if (per_patient or len(copies)) else 0))
    D, I = metrics.knn_search(zq, zb, k=depth)
    bad = np.zeros(I.shape, bool)
    counts = {"patient": 0, "near_copy": 0}
    if q_patients is not None and b_patients is not None:
        qp = np.array([p or None for p in q_patients], object)
        bp = np.array([p or None for p in b_patients], object)
        same = (bp[I] == qp[:, None]) & (qp[:, None] != None)  # noqa: E711 (elementwise on objects)
        counts["patient"] = int(same.sum())
        bad |= same
    if len(copies):
        pairs = set(map(tuple, copies))
        copy = np.array([[(r, int(j)) in pairs for j in row] for r, row in enumerate(I)], bool).reshape(I.shape)
        counts["near_copy"] = int((copy & ~bad).sum())
        bad |= copy
    order = np.argsort(bad, axis=1, kind="stable")  # the kept ones first, each group nearest first
    D, I = np.take_along_axis(D, order, 1)[:, :k], np.take_along_axis(I, order, 1)[:, :k]
    return D, I, counts
