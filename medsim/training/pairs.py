"""Balanced, seeded pair sampling.

mode "dataset": positive = both images from the same MedMNIST subset (the notebook's
                protocol); negative = images from two different subsets.
mode "label":   positive = same subset and same diagnosis label; negatives are half
                same-subset/different-label (the hard ones) and half different-subset.

The anchor's subset is drawn uniformly, so a 546-image subset is not drowned by a
4,708-image one.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from medsim.errors import BadArgument

MODES = ("dataset", "label")


def sample_pairs(dataset_ids: np.ndarray, label_keys: np.ndarray, n_pairs: int, mode: str,
                 seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (a, b, same): index arrays into the inputs and 1/0 targets; exactly
    n_pairs // 2 positives, the rest negatives, shuffled. Same seed, same pairs."""
    if mode not in MODES:
        raise BadArgument(f"mode must be one of {MODES}, got {mode!r}")
    rng = np.random.default_rng(seed)
    by_ds: dict[int, np.ndarray] = {}
    by_key: dict[int, np.ndarray] = {}
    keys_of_ds = defaultdict(set)
    for d in np.unique(dataset_ids):
        by_ds[int(d)] = np.flatnonzero(dataset_ids == d)
    for k in np.unique(label_keys):
        idx = np.flatnonzero(label_keys == k)
        by_key[int(k)] = idx
        keys_of_ds[int(dataset_ids[idx[0]])].add(int(k))
    datasets = sorted(by_ds)
    if mode == "dataset" and len(datasets) < 2:
        raise BadArgument("dataset mode needs images from at least two subsets")
    if mode == "label" and len(datasets) < 2 and len(by_key) < 2:
        raise BadArgument("label mode needs at least two labels or two subsets")

    def other_dataset(d):
        others = [o for o in datasets if o != d]
        return others[rng.integers(len(others))]

    def pick(idx, avoid=None):
        if avoid is not None and len(idx) > 1:
            while True:
                j = idx[rng.integers(len(idx))]
                if j != avoid:
                    return j
        return idx[rng.integers(len(idx))]

    n_pos = n_pairs // 2
    a = np.empty(n_pairs, np.int64)
    b = np.empty(n_pairs, np.int64)
    same = np.zeros(n_pairs, np.int64)
    same[:n_pos] = 1
    for p in range(n_pairs):
        d = datasets[rng.integers(len(datasets))]
        i = pick(by_ds[d])
        a[p] = i
        if same[p]:
            pool = by_ds[d] if mode == "dataset" else by_key[int(label_keys[i])]
            b[p] = pick(pool, avoid=i)
            continue
        hard = mode == "label" and len(keys_of_ds[d]) > 1 and (len(datasets) < 2 or p % 2 == 0)
        if hard:  # same subset, different diagnosis
            k = int(label_keys[i])
            other_keys = sorted(keys_of_ds[d] - {k})
            b[p] = pick(by_key[other_keys[rng.integers(len(other_keys))]])
        else:
            b[p] = pick(by_ds[other_dataset(d)])
    order = rng.permutation(n_pairs)
    return a[order], b[order], same[order]
