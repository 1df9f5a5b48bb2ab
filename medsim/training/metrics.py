"""Pair-verification and retrieval metrics, pure numpy so they can be checked by hand.

Conventions (they matter for the numbers, so they are written down):
- Rankings sort by distance, ties broken by gallery position (gallery ids ascending):
  deterministic, and no tie is resolved in the query's favour.
- AP@k = sum_{i<=k} P@i * rel_i / min(k, R), R = relevant items in the whole gallery.
  A query that finds 1 relevant item in 5 when 100 exist scores 0.2, not 1.0.
- kNN vote ties go to the label whose best-ranked neighbour is nearest.
"""

from __future__ import annotations

import numpy as np


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count 1/2),
    via the Mann-Whitney U statistic with average ranks."""
    scores = np.asarray(scores, float)
    positive = np.asarray(positive).astype(bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both positive and negative pairs")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over runs of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def best_threshold(dist: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """Distance threshold t maximising accuracy of the rule 'same iff dist <= t'.
    -> (t, accuracy). Candidates are midpoints between consecutive distinct distances."""
    dist = np.asarray(dist, float)
    same = np.asarray(same).astype(bool)
    u = np.unique(dist)
    cands = np.r_[u[0] - 1e-9, (u[:-1] + u[1:]) / 2, u[-1]]
    acc = [((dist <= t) == same).mean() for t in cands]
    i = int(np.argmax(acc))
    return float(cands[i]), float(acc[i])


def pair_accuracy(dist: np.ndarray, same: np.ndarray, threshold: float) -> float:
    return float(((np.asarray(dist) <= threshold) == np.asarray(same).astype(bool)).mean())


def knn_search(xq: np.ndarray, xb: np.ndarray, k: int, metric: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN -> (D, I): (nq, k) distances and gallery positions, ties by position."""
    xq = np.asarray(xq, np.float32)
    xb = np.asarray(xb, np.float32)
    if metric == "l2":
        d = (xq**2).sum(1)[:, None] - 2 * xq @ xb.T + (xb**2).sum(1)[None, :]
        d = np.sqrt(np.maximum(d, 0))
    elif metric == "cosine":
        qn = xq / np.maximum(np.linalg.norm(xq, axis=1, keepdims=True), 1e-12)
        bn = xb / np.maximum(np.linalg.norm(xb, axis=1, keepdims=True), 1e-12)
        d = 1 - qn @ bn.T
    else:
        raise ValueError(metric)
    k = min(k, xb.shape[0])
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx


def average_precision_at_k(rel: np.ndarray, k: int, n_relevant: int) -> float:
    """rel: 0/1 relevance of the ranked list (length >= k)."""
    rel = np.asarray(rel[:k], float)
    if n_relevant == 0:
        return 0.0
    precision_at_i = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float((precision_at_i * rel).sum() / min(k, n_relevant))


def knn_vote(neighbour_keys: np.ndarray):
    """Majority label among ranked neighbours; ties to the one ranked first."""
    values, first, counts = np.unique(neighbour_keys, return_index=True, return_counts=True)
    best = counts.max()
    return values[counts == best][np.argmin(first[counts == best])]


def retrieval_metrics(I: np.ndarray, q_ds: np.ndarray, q_key: np.ndarray, b_ds: np.ndarray,
                      b_key: np.ndarray, k_modality: int = 10, k_map: int = 5, k_vote: int = 11) -> dict:
    """Per-query metrics averaged over the queries given (call once per subset).

    I: (nq, >= max k) ranked gallery positions. *_ds: subset ids; *_key: (subset, label) ids.
    """
    nb_key_counts = dict(zip(*np.unique(b_key, return_counts=True), strict=True))
    modality, ap, acc1, knn = [], [], [], []
    for qi in range(I.shape[0]):
        ranked = I[qi]
        modality.append((b_ds[ranked[:k_modality]] == q_ds[qi]).mean())
        rel = (b_key[ranked] == q_key[qi]).astype(float)
        ap.append(average_precision_at_k(rel, k_map, nb_key_counts.get(q_key[qi], 0)))
        acc1.append(rel[0])
        knn.append(float(knn_vote(b_key[ranked[:k_vote]]) == q_key[qi]))
    return {
        f"modality_p@{k_modality}": float(np.mean(modality)),
        f"label_map@{k_map}": float(np.mean(ap)),
        "acc@1": float(np.mean(acc1)),
        f"knn{k_vote}_acc": float(np.mean(knn)),
        "n_queries": int(I.shape[0]),
    }


# ---------------------------------------------------------------- the literature's protocol
# Mahbod et al. 2024 (masih4/MedImageRetrieval, metric.py), the published MedMNIST
# retrieval anchors: test queries against the train split of the same subset; relevance
# is "same label". Their AP@k divides by the hits found in the top k (a query with one
# relevant image at rank 1 of 5 scores 1.0), where medsim's AP@k above divides by
# min(k, R) (it scores 0.2). ACC@k is 1 when any of the top k has the query's label;
# mMV@k is 1 when the query's label is among the (tied) majority labels of the top k.
def ap_at_k_hits(rel: np.ndarray, k: int) -> float:
    rel = np.asarray(rel[:k], float)
    hits = rel.sum()
    if hits == 0:
        return 0.0
    return float((np.cumsum(rel) / np.arange(1, len(rel) + 1) * rel).sum() / hits)


def majority_vote_hit(neighbour_labels, label) -> float:
    values, counts = np.unique(np.asarray(neighbour_labels), return_counts=True)
    return float(label in set(values[counts == counts.max()].tolist()))


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean over queries (resampled with replacement)."""
    values = np.asarray(values, float)
    if len(values) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def literature_metrics(I: np.ndarray, q_label: np.ndarray, b_label: np.ndarray, k: int = 5,
                       acc_ks=(1, 3, 5), intervals: bool = True) -> dict:
    """I: (nq, >= k) ranked positions in one subset's train split; labels within that subset.
    -> mean and (intervals) bootstrap 95% interval of each figure, in the literature's
    definitions. Training's per-epoch selection needs only the means."""
    per = {f"map@{k}": [], f"mmv@{k}": [], **{f"acc@{a}": [] for a in acc_ks}}
    for qi in range(I.shape[0]):
        labels = b_label[I[qi]]
        rel = (labels == q_label[qi]).astype(float)
        per[f"map@{k}"].append(ap_at_k_hits(rel, k))
        per[f"mmv@{k}"].append(majority_vote_hit(labels[:k], q_label[qi]))
        for a in acc_ks:
            per[f"acc@{a}"].append(float(rel[:a].any()))
    out = {name: float(np.mean(v)) for name, v in per.items()}
    if intervals:
        out["ci95"] = {name: bootstrap_ci(v) for name, v in per.items()}
    out["n_queries"] = int(I.shape[0])
    return out
