"""Re-ranking after the first search: pure numpy over unit-length embeddings.

Two ideas from image retrieval, measured on the MedMNIST subsets (docs/results.md):

- alpha query expansion (alpha-QE; Radenovic, Tolias & Chum 2018): the query vector is
  replaced by the normalised sum of itself and its top-n neighbours, each weighted by its
  cosine similarity to the query raised to alpha, and searched again. One extra search.
- database-side augmentation (DBA, same paper): every gallery vector is replaced the same
  way by its own top-n gallery neighbours before anything is searched. Costs nothing per
  query, but changes the stored vectors, so it belongs to an index build, not a search.
- k-reciprocal re-ranking (Zhong et al. 2017) is here for the measurement only: it needs
  every candidate's own neighbourhood at query time.

The cosine similarity of two unit vectors is 1 - d^2 / 2 for their Euclidean distance d.
"""

from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def expand(q: np.ndarray, neighbours: np.ndarray, alpha: float = 3.0) -> np.ndarray:
    """alpha-QE: q (dim,) or (m, dim), its top-n neighbours' vectors (n, dim) or (m, n, dim)
    -> the expanded query, unit length. A neighbour pointing away (cosine <= 0) adds nothing."""
    q = np.asarray(q, np.float32)
    sims = np.clip(np.einsum("...d,...nd->...n", q, neighbours), 0.0, None) ** alpha
    return _unit(q + np.einsum("...n,...nd->...d", sims, neighbours)).astype(np.float32)


def augment_database(xb: np.ndarray, n: int, alpha: float = 3.0, chunk: int = 2048) -> np.ndarray:
    """DBA: each gallery vector -> alpha-QE of itself with its n nearest other gallery vectors."""
    out = np.empty_like(xb)
    for i in range(0, len(xb), chunk):
        s = xb[i:i + chunk] @ xb.T
        s[np.arange(len(s)), np.arange(i, i + len(s))] = -np.inf  # itself is the query term
        top = np.argpartition(-s, n, axis=1)[:, :n] if n < xb.shape[0] - 1 else np.argsort(-s, 1)[:, :n]
        out[i:i + chunk] = expand(xb[i:i + chunk], xb[top], alpha)
    return out


def k_reciprocal(xq: np.ndarray, xb: np.ndarray, k1: int = 20, k2: int = 6, lam: float = 0.3) -> np.ndarray:
    """Zhong et al. 2017: -> (m, N) re-ranked distances of every query to every gallery vector
    (Jaccard distance of k-reciprocal neighbour sets, mixed with the original distance)."""
    x = np.concatenate([xq, xb]).astype(np.float32)
    m, total = len(xq), len(xq) + len(xb)
    d = np.maximum(2 - 2 * (x @ x.T), 0)  # squared distances
    d /= d.max(axis=0, keepdims=True)
    rank = np.argsort(d, axis=1)[:, :k1 + 1]
    v = np.zeros((total, total), np.float32)
    for i in range(total):
        fwd = rank[i]
        recip = fwd[(rank[fwd] == i).any(1)]
        exp = recip
        for j in recip:  # add a candidate's half-size reciprocal set when it overlaps enough
            cj = rank[j, :k1 // 2 + 1]
            cj = cj[(rank[cj, :k1 // 2 + 1] == j).any(1)]
            if len(np.intersect1d(cj, recip)) > 2 / 3 * len(cj):
                exp = np.union1d(exp, cj)
        w = np.exp(-d[i, exp])
        v[i, exp] = w / w.sum()
    if k2 > 1:  # local query expansion over the k2 nearest
        v = v[rank[:, :k2]].mean(1)
    vb = v[m:]
    jac = np.empty((m, len(xb)), np.float32)
    for i in range(m):
        mins = np.minimum(v[i][None, :], vb).sum(1)
        jac[i] = 1 - mins / (2 - mins)
    return jac * (1 - lam) + d[:m, m:] * lam
