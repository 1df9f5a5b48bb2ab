"""The leakage audit's pixel rule for near copies (medsim.audit), where every layer can use
it: the audit, the search pipeline's "this file is a stored image at another size", and
calibration, whose queries must not find their own copies (training/unseen.py)."""

from __future__ import annotations

import numpy as np

CANDIDATES = 10  # nearest neighbours per image checked by their pixels
MIN_CORRELATION = 0.995  # 0.98 let different fundus photos through (RetinaMNIST: same camera, same framing)
MAX_SHIFT = 2  # pixels, at the model's input size
CHUNK = 20_000  # pairs compared at once (memory: a few arrays of CHUNK x S x S floats)


def candidates(xb: np.ndarray, k: int = CANDIDATES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each vector's k nearest others -> (i, j, distance) with i < j, each pair once."""
    import faiss

    index = faiss.IndexFlatL2(xb.shape[1])
    index.add(xb)
    D, I = index.search(xb, min(k + 1, len(xb)))
    i = np.repeat(np.arange(len(xb)), I.shape[1])
    j, d = I.ravel(), np.sqrt(np.maximum(D.ravel(), 0))
    keep = (j >= 0) & (i != j)
    a, b = np.minimum(i, j)[keep], np.maximum(i, j)[keep]
    pairs, first = np.unique(np.stack([a, b], 1), axis=0, return_index=True)
    return pairs[:, 0], pairs[:, 1], d[keep][first]


def aligned_correlation(A: np.ndarray, B: np.ndarray, shift: int = MAX_SHIFT) -> np.ndarray:
    """(P, S, S) grey images, pairwise -> (P,) the highest normalised correlation of A with B
    or B mirrored, B shifted by up to `shift` pixels (computed over the overlap)."""
    best = np.full(len(A), -1.0, np.float32)
    s = A.shape[1]
    for Bt in (B, B[:, :, ::-1]):
        for dy in range(-shift, shift + 1):
            for dx in range(-shift, shift + 1):
                a = A[:, max(dy, 0): s + min(dy, 0), max(dx, 0): s + min(dx, 0)].reshape(len(A), -1)
                b = Bt[:, max(-dy, 0): s + min(-dy, 0), max(-dx, 0): s + min(-dx, 0)].reshape(len(A), -1)
                a = a - a.mean(1, keepdims=True)
                b = b - b.mean(1, keepdims=True)
                den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
                r = np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-12), -1.0)
                np.maximum(best, r, out=best)
    return best


def near_copies(grey: np.ndarray, xb: np.ndarray, keep=None) -> list:
    """The pixel rule on (N, S, S) grey images, candidates from their vectors xb ->
    [(row a, row b, embedding distance, correlation)]. keep(a, b) -> mask: only those
    candidate pairs are compared (calibration: a validation query with a training image)."""
    a, b, d = candidates(xb)
    if keep is not None:
        m = keep(a, b)
        a, b, d = a[m], b[m], d[m]
    out = []
    for s in range(0, len(a), CHUNK):
        ia, ib = a[s: s + CHUNK], b[s: s + CHUNK]
        r = aligned_correlation(grey[ia].astype(np.float32), grey[ib].astype(np.float32))
        hit = r >= MIN_CORRELATION
        out += list(zip(ia[hit].tolist(), ib[hit].tolist(), d[s: s + CHUNK][hit].tolist(), r[hit].tolist(),
                        strict=True))
    return out
