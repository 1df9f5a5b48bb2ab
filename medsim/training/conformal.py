"""A diagnosis set with a coverage guarantee: split conformal prediction over the labels
of a query's k nearest neighbours (Angelopoulos & Bates, "A Gentle Introduction to
Conformal Prediction", sections 1 and 4.5).

- Nonconformity of a label for a query: 1 - the distance-weighted share of its k nearest
  that carry it (weights 1 / (distance + delta), delta the calibration queries' median
  nearest distance; a label none of them carries scores 1). Weighted, not counted: a
  plain share takes k + 1 values, and a quantile on such steps over-covers (80% asked,
  91% held at k = 5 on simulated votes); distances break the steps.
- Calibration: validation queries against the train gallery (the search's own situation),
  each query's own patient and near copies left out of its neighbours (evaluate.py), per
  dataset and per k = 1..K_MAX. At level 1 - alpha the threshold is the
  ceil((n + 1)(1 - alpha))-th smallest score of the n calibration queries; where that rank
  passes n, 1 (every label is in the set).
- Label-conditional (Mondrian) where classes are unbalanced (the largest class of the
  calibration queries more than MONDRIAN_RATIO times the smallest): one threshold per true
  label from that label's queries only, so the guarantee holds for a rare diagnosis too,
  not only on average over a majority class; balanced datasets pool their queries
  (smaller sets, the same marginal guarantee). Not where a class has fewer than
  MONDRIAN_MIN queries: its threshold at 95% would be "always" (rank past n), and
  RetinaMNIST's 120 validation queries (10-odd in a grade) made every set at 90% all
  five grades at k = 5 on the demo's model; pooled, the guarantee is marginal.
- The set: every label whose score is within its threshold. Exchangeability gives
  P(the true label is in the set) >= 1 - alpha; medsim measures it on test (evaluate) and
  on images labelled after the fit (`medsim calibration check`).

Written here rather than with MAPIE: MAPIE wraps an sklearn classifier's predict_proba,
while these scores come from a kNN whose neighbours must leave out the query's own
patient and near copies, computed once and shared with the vote's fits; the rule itself
is the few lines of `threshold`.
"""

from __future__ import annotations

import math

import numpy as np

LEVELS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99)  # fitted; a request takes the nearest at or above
MIN_COVERAGE, MAX_COVERAGE, DEFAULT_COVERAGE = 0.5, 0.99, 0.9
K_MAX = 50
MONDRIAN_RATIO = 1.5
MONDRIAN_MIN = 19  # queries per class for a threshold at 95%: ceil((n + 1) 0.95) <= n
CHECK_KS = (1, 5, 10, 20, 50)  # evaluate's report
CHECK_LEVELS = (0.8, 0.9, 0.95)
EPS = 1e-9
# between label names when a person reads several: a name may hold a comma itself
# (BreastMNIST's "normal, benign"), so "{malignant, normal, benign}" read as three labels
SEP = " | "  # shares are ratios of small ints: equal scores must compare equal


def threshold(scores: np.ndarray, level: float) -> float:
    """The conformal quantile: the ceil((n + 1) level)-th smallest of n scores, or 1.0
    (every label admitted) where that rank passes n (too few queries for this level)."""
    n = len(scores)
    r = math.ceil((n + 1) * level - EPS)
    if n == 0 or r > n:
        return 1.0
    return float(np.sort(scores)[r - 1])


def shares(L: np.ndarray, keys: list, k: int, D: np.ndarray | None = None, delta: float = 1.0) -> np.ndarray:
    """Neighbour label keys (n, >= k) and distances, nearest first -> (n, len(keys)) the
    distance-weighted share of the k nearest carrying each key (D None: plain shares)."""
    W = np.ones(L[:, :k].shape) if D is None else 1 / (np.asarray(D, np.float64)[:, :k] + delta)
    W = W / W.sum(axis=1, keepdims=True)
    return np.stack([((L[:, :k] == key) * W).sum(axis=1) for key in keys], axis=1)


def fit(L: np.ndarray, q_keys: np.ndarray, names: dict, D: np.ndarray | None = None) -> dict | None:
    """Calibration kNN label keys (n, kmax) and the queries' own keys -> the stored fit:
    {"method", "labels", "levels", "by_k": {k: {level: {label name: threshold}}}, "n"}.
    names: label key -> label name (what a search shows). None without queries."""
    keys = sorted(set(int(x) for x in q_keys) | set(int(x) for x in np.unique(L)))
    keys = [x for x in keys if x in names]
    if not len(q_keys) or not keys:
        return None
    counts = np.array([int((q_keys == x).sum()) for x in keys if (q_keys == x).any()])
    mondrian = bool(counts.max() > MONDRIAN_RATIO * counts.min() and counts.min() >= MONDRIAN_MIN)
    by_k = {}
    delta = max(float(np.median(D[:, 0])), 1e-6) if D is not None else 1.0
    col = {x: i for i, x in enumerate(keys)}
    known = np.array([int(x) in col for x in q_keys])
    for k in range(1, min(K_MAX, L.shape[1]) + 1):
        s = shares(L, keys, k, D, delta)
        # a query whose label no neighbour carries (and no name) scores 1: never covered cheaply
        score = np.ones(len(q_keys))
        score[known] = 1 - s[known, [col[int(x)] for x in q_keys[known]]]
        per_level = {}
        for level in LEVELS:
            if mondrian:
                per_level[str(level)] = {names[x]: threshold(score[q_keys == x], level) for x in keys}
            else:
                t = threshold(score, level)
                per_level[str(level)] = {names[x]: t for x in keys}
        by_k[str(k)] = per_level
    return {"method": "mondrian" if mondrian else "marginal", "labels": [names[x] for x in keys],
            "levels": list(LEVELS), "by_k": by_k, "n": int(len(q_keys)),
            "delta": delta if D is not None else None}


def level_for(coverage: float) -> float:
    """The fitted level that serves a requested coverage: the nearest at or above it."""
    return min(x for x in LEVELS if x >= coverage - EPS)


def k_for(doc: dict, k: int) -> int:
    ks = sorted(int(x) for x in doc["by_k"])
    return k if k in ks else ks[-1] if k > ks[-1] else min(x for x in ks if x >= k)


def label_set(doc: dict, voters: list, coverage: float = DEFAULT_COVERAGE) -> dict:
    """A search's neighbours of the dataset as [(label name, distance)], nearest first ->
    {"labels": [...], "coverage": the level it holds at, "of": every label on file,
    "calibrated_at_k"}. Never empty: where no label is within its threshold (a query
    unlike the calibration queries) the likeliest one stands alone, which only adds
    coverage."""
    level, at = level_for(coverage), k_for(doc, len(voters))
    t = doc["by_k"][str(at)][str(level)]
    delta = doc.get("delta")
    w = [1.0 if delta is None else 1 / (d + delta) for _, d in voters]
    share = {}
    for (name, _), x in zip(voters, w, strict=True):
        share[name] = share.get(name, 0.0) + x / sum(w)
    labels = [name for name in doc["labels"] if 1 - share.get(name, 0.0) <= t[name] + EPS]
    if not labels and share:
        labels = [max(share, key=share.get)]
    return {"labels": labels, "coverage": level, "of": list(doc["labels"]), "calibrated_at_k": at,
            "method": doc["method"]}


def sets_for(doc: dict, L: np.ndarray, names: dict, k: int, coverage: float, D=None) -> list[set]:
    """Test-time sets for many queries at once (evaluate's check): neighbour label keys
    and distances (n, >= k) -> [set of label names] per query, as label_set builds them."""
    keys = [x for x in names if names[x] in doc["labels"]]
    s = shares(L, keys, k, D if doc.get("delta") is not None else None, doc.get("delta") or 1.0)
    t = doc["by_k"][str(k_for(doc, k))][str(level_for(coverage))]
    inside = (1 - s) <= np.array([t[names[x]] for x in keys]) + EPS
    top = s.argmax(axis=1)
    return [{names[keys[j]] for j in np.flatnonzero(row)} or {names[keys[top[i]]]} for i, row in enumerate(inside)]


def check(doc: dict, L: np.ndarray, q_keys: np.ndarray, names: dict, ks, coverage: float = DEFAULT_COVERAGE,
          D=None) -> dict:
    """Empirical coverage and mean set size at each k -> {k: {"coverage", "mean_size", "n"}}."""
    out = {}
    for k in [k for k in ks if k <= L.shape[1]]:
        sets = sets_for(doc, L, names, k, coverage, D)
        hit = [names.get(q) in s for q, s in zip(q_keys, sets, strict=True)]  # numpy ints hash as ints
        out[str(k)] = {"coverage": float(np.mean(hit)), "mean_size": float(np.mean([len(s) for s in sets])),
                       "n": int(len(sets)), "level": level_for(coverage)}
    return out


def described(ds: dict | None) -> str:
    """How a person reads a set: "one of {benign, malignant} at 90%"."""
    if ds is None:
        return ""
    c = ds["coverage"]
    pct = f"{c:.0%}" if abs(c * 100 - round(c * 100)) < 1e-6 else f"{c:.1%}"
    labels = ds["labels"]
    if not labels:
        return f"no label fits at {pct} (a query unlike the calibration queries)"
    if len(labels) == 1:
        return f"{labels[0]} at {pct}"
    if len(labels) == len(ds.get("of") or ()):
        return f"cannot tell at {pct}: one of {{{SEP.join(labels)}}}"
    return f"one of {{{SEP.join(labels)}}} at {pct}"
