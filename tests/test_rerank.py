"""Re-ranking (medsim.search.rerank): the formulas on cases whose answer is known."""

import numpy as np

from medsim.search import rerank


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_alpha_query_expansion_weights_by_similarity():
    q = _unit(np.array([1.0, 0.0, 0.0]))
    near, away = _unit(np.array([1.0, 1.0, 0.0])), _unit(np.array([-1.0, 0.0, 1.0]))
    e = rerank.expand(q, np.stack([near, away]), alpha=1.0)
    assert np.isclose(np.linalg.norm(e), 1.0)
    # cosine(q, away) < 0: it adds nothing; near adds cos(45 deg) of itself
    want = _unit(q + np.cos(np.pi / 4) * near)
    assert np.allclose(e, want, atol=1e-6)
    # a larger alpha trusts the neighbour less (its cosine is below 1)
    e3 = rerank.expand(q, np.stack([near]), alpha=3.0)
    assert e3 @ q > e @ q
    # batched: (m, dim) queries with (m, n, dim) neighbours, row by row
    b = rerank.expand(np.stack([q, q]), np.stack([np.stack([near, away])] * 2), alpha=1.0)
    assert np.allclose(b, np.stack([want, want]), atol=1e-6)


def test_database_augmentation_pulls_each_vector_towards_its_own_neighbours():
    rng = np.random.default_rng(0)
    centres = _unit(rng.normal(size=(3, 8)))
    xb = _unit(np.repeat(centres, 20, axis=0) + rng.normal(0, 0.2, (60, 8)))
    aug = rerank.augment_database(xb, n=5, chunk=7)  # chunks smaller than the gallery
    assert aug.shape == xb.shape and np.allclose(np.linalg.norm(aug, axis=1), 1, atol=1e-5)
    own = np.repeat(np.arange(3), 20)
    before = np.mean([xb[i] @ centres[own[i]] for i in range(60)])
    after = np.mean([aug[i] @ centres[own[i]] for i in range(60)])
    assert after > before  # averaged over its cluster, closer to the cluster's centre


def test_k_reciprocal_prefers_mutual_neighbours():
    """Query q sits between a tight cluster A (whose members are each other's neighbours,
    and q's) and a lone point b a little nearer to q than A is: b does not have q among its
    nearest (it has A's members), so k-reciprocal re-ranking puts A's members first."""
    rng = np.random.default_rng(1)
    a = _unit(np.array([1.0, 0.25, 0.0]) + rng.normal(0, 0.01, (6, 3)))
    far = _unit(np.array([0.0, 0.0, 1.0]) + rng.normal(0, 0.05, (30, 3)))
    q = _unit(np.array([[1.0, 0.0, 0.0]]))
    b = _unit(np.array([[1.0, -0.2, 0.0]]))
    xb = np.concatenate([b, a, far]).astype(np.float32)
    plain = np.argsort(np.linalg.norm(xb - q, axis=1))
    assert plain[0] == 0  # b first by distance
    d = rerank.k_reciprocal(q, xb, k1=6, k2=1, lam=0.0)
    assert d.shape == (1, len(xb))
    assert set(np.argsort(d[0])[:3]) <= set(range(1, 7))  # members of A first
