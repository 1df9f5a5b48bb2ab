"""The vote's probability at every k, and what "unlike anything on file" means.

The first calibration fitted P(vote right | share of the 10 nearest) and every door applied
it at any k: RetinaMNIST at k = 1 claimed 0.93 while 44.5% were right. Here, per dataset
and per k on a grid, P(right) is a logistic in two features of the k nearest: the share
that voted for the winning label, and the mean distance of those voters (so a vote of
far-away neighbours is not as sure as one of near ones). A k between grid points takes
the nearest grid k on a log scale; past the grid, the largest. All fitted on validation
queries against the train gallery (the search's own situation), measured on test.

Out of distribution: a query whose nearest neighbour is farther than the 99th percentile
of the nearest-neighbour distances of validation queries and of training images (each
against the rest of train) is "unlike anything on file"; it gets no vote probability.
Validation alone was too few: BreastMNIST's 78 validation queries make their 99th
percentile their maximum, and test queries past it were 0.6% of one training and 5.1% of
the next (4.5-10.3% over resamples of the same 78). Training images' leave-one-out
distances follow validation's (medians 0.052 / 0.050 breast, 0.034 / 0.035 pneumonia,
0.144 / 0.144 retina on the demo's model), so pooling them (624 for breast) steadies the
percentile without moving it on the larger subsets.
"""

from __future__ import annotations

import numpy as np

from medsim.training import metrics

K_GRID = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 50)
OOD_QUANTILE = 0.99
OOD_TRAIN_SAMPLE = 5000  # training images whose leave-one-out distance joins validation's (seeded)
KNN_BLOCK = 1024
REPORT_KS = (1, 5, 10, 20, 50)


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 60) -> list[float]:
    """P(y = 1 | x) = sigmoid(w0 + w . x) by Newton's method; a small ridge keeps
    separable data (a single-class archive: every vote right) finite -> [w0, w...]."""
    X = np.column_stack([np.ones(len(X)), np.asarray(X, np.float64)])
    y = np.asarray(y, np.float64)
    w = np.zeros(X.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(X @ w, -700, 700)))
        g = X.T @ (p - y) + l2 * w
        H = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(X.shape[1])
        step = np.linalg.solve(H, g)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return [float(v) for v in w]


def log_likelihood(w, X, y) -> float:
    p = np.clip(predict(w, X), 1e-12, 1 - 1e-12)
    return float((y * np.log(p) + (1 - y) * np.log(1 - p)).sum())


def fit_monotone(share: np.ndarray, dist: np.ndarray, y: np.ndarray) -> list[float]:
    """The vote's logistic with the signs a reader expects: more of the k agreeing never
    lowers P(right), and voters farther away never raise it. Fitted freely, RetinaMNIST's
    120 validation queries gave the share a negative weight at k = 3 and 4, so a vote of 2
    of 4 claimed more (0.85) than one of 3 of 4 (0.84). Where the free fit breaks a sign,
    the best fit that keeps both (one feature fixed at 0, or neither) is taken: with two
    features the constrained optimum lies on one of those faces. -> [w0, w_share, w_dist]"""
    X = np.column_stack([share, dist]).astype(np.float64)
    y = np.asarray(y, np.float64)
    full = fit_logistic(X, y)
    if full[1] >= 0 and full[2] <= 0:
        return full
    candidates = []
    for keep in ((0,), (1,), ()):
        w = fit_logistic(X[:, list(keep)], y)
        weights = [w[0], 0.0, 0.0]
        for col, value in zip(keep, w[1:], strict=True):
            weights[1 + col] = value
        if weights[1] >= 0 and weights[2] <= 0:
            candidates.append((log_likelihood(weights, X, y), weights))
    return max(candidates)[1]  # the intercept alone always qualifies


def predict(w, X) -> np.ndarray:
    X = np.atleast_2d(np.asarray(X, np.float64))
    return 1 / (1 + np.exp(-np.clip(w[0] + X @ np.asarray(w[1:]), -700, 700)))


def votes(D: np.ndarray, L: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The vote of each query's k nearest (rows of D distances and L label keys, nearest
    first): -> (winning label, share, mean distance of its voters). A tie goes to the
    label seen first, as at search time (calibration.vote)."""
    winners, shares, dists = [], [], []
    for d, lab in zip(D[:, :k], L[:, :k], strict=True):
        counts: dict = {}
        for x in lab:
            counts[x] = counts.get(x, 0) + 1
        top = max(counts, key=counts.get)  # dicts keep first-seen order: the nearer label wins a tie
        winners.append(top)
        shares.append(counts[top] / k)
        dists.append(float(d[lab == top].mean()))
    return np.array(winners), np.array(shares), np.array(dists)


def grid_for(n_gallery: int) -> list[int]:
    return [k for k in K_GRID if k <= n_gallery]


def fit_by_k(D: np.ndarray, L: np.ndarray, q_keys: np.ndarray) -> dict[str, list[float]]:
    """Validation kNN (nearest first) -> {k: logistic weights} for each k of the grid."""
    out = {}
    for k in grid_for(D.shape[1]):
        win, share, dist = votes(D, L, k)
        out[str(k)] = fit_monotone(share, dist, win == q_keys)
    return out


def weights_at(by_k: dict, k: int) -> tuple[int, list[float]] | None:
    """The grid k whose weights serve a vote of k neighbours (log-nearest; past the grid,
    the largest) -> (grid k, weights), or None when nothing was fitted."""
    if not by_k:
        return None
    ks = sorted(int(x) for x in by_k)
    if k >= ks[-1]:
        return ks[-1], by_k[str(ks[-1])]
    g = min(ks, key=lambda x: abs(np.log(x) - np.log(max(k, 1))))
    return g, by_k[str(g)]


def bootstrap_ece(p: np.ndarray, y: np.ndarray, ece, n: int = 200, seed: int = 0) -> list[float]:
    """95% interval of the ECE over queries resampled with replacement."""
    rng = np.random.default_rng(seed)
    stats = [ece(p[i], y[i])[0] for i in (rng.integers(0, len(p), len(p)) for _ in range(n))]
    return [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]


def report_by_k(Dt, Lt, t_keys, by_k: dict, p_same, ece, iso_by_k: dict | None = None) -> dict:
    """Test ECE at the report's ks, for the vote and for P(same) of the k nearest, with
    bootstrap intervals -> {k: {...}}. iso_by_k: the vote's P(right) is that fit (what a
    search now claims, fit_isotonic) rather than the logistic's."""
    out = {}
    for k in [k for k in REPORT_KS if k <= Dt.shape[1]]:
        win, share, dist = votes(Dt, Lt, k)
        _, w = weights_at(by_k, k)
        pv, right = predict(w, np.column_stack([share, dist])), (win == t_keys).astype(float)
        iso = weights_at(iso_by_k or {}, k)
        if iso is not None and iso[1]["x"]:
            pv = predict_isotonic(iso[1], share)
        ps = p_same(Dt[:, :k].ravel())
        same = (Lt[:, :k] == t_keys[:, None]).ravel().astype(float)
        ev, diagram = ece(pv, right)
        es, _ = ece(ps, same)
        out[str(k)] = {"vote_ece": ev, "vote_ece_ci95": bootstrap_ece(pv, right, ece),
                       "p_same_ece": es, "p_same_ece_ci95": bootstrap_ece(ps, same, ece),
                       "vote_right": float(right.mean()), "vote_claimed": float(pv.mean()),
                       "vote_reliability": diagram}
    return out


def train_nearest(zb: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each training image's distance to its nearest other training image (a seeded
    sample of at most OOD_TRAIN_SAMPLE of them, so a large archive costs a bounded kNN)."""
    if len(zb) < 2:
        return np.zeros(0)
    rows = np.arange(len(zb))
    if len(zb) > OOD_TRAIN_SAMPLE:
        rows = np.sort(np.random.default_rng(seed).choice(len(zb), OOD_TRAIN_SAMPLE, replace=False))
    out = []
    for i in range(0, len(rows), KNN_BLOCK):  # a block of queries at a time: KNN_BLOCK x N distances in memory
        r = rows[i:i + KNN_BLOCK]
        D, I = metrics.knn_search(zb[r], zb, k=2)
        # the image itself is one of its two nearest (first, barring float noise or a duplicate)
        out.append(np.where(I[:, 0] == r, D[:, 1], D[:, 0]))
    return np.concatenate(out)


def ood_threshold(d_val: np.ndarray, d_train: np.ndarray) -> float:
    """The nearest-neighbour distance that 99% of validation queries and training images
    (leave-one-out) stay within."""
    return float(np.quantile(np.concatenate([d_val, d_train]), OOD_QUANTILE))


def reliability_by_k_png(cal: dict, path) -> None:
    """One panel per dataset: the vote's reliability on test at each reported k (predicted
    P(right) against the observed share right, per bin), the diagonal for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {flag: c["by_k_test"] for flag, c in cal.items() if c.get("by_k_test")}
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(4.4 * len(shown), 4.2), dpi=100, squeeze=False)
    for ax, (flag, by_k) in zip(axes[0], shown.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
        for k, m in by_k.items():
            pts = np.array([(p, f) for p, f, _ in m["vote_reliability"]])
            ax.plot(pts[:, 0], pts[:, 1], marker="o", markersize=3, label=f"k={k} (ECE {m['vote_ece']:.3f})")
        ax.set_title(f"{flag}: the vote, test", fontsize=10)
        ax.set_xlabel("predicted P(right) (fitted on val)")
        ax.set_ylabel("observed share right (test)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- P(right) that cannot over-claim: binned by vote share, shrunk, monotone, per k (issue 37)
ISO_SHRINK = 10  # pseudo-queries at the logistic's value added to every share's bin
ISO_Z = 1.5  # standard errors below its shrunk accuracy that a share claims (small bins pay most)
OVERCLAIM_MIN_N = 20  # a share's bin is checked when it holds this many test queries


def untied_votes(D: np.ndarray, L: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """votes() plus whether the top labels tie (a tie claims no label at search time, so
    it is neither fitted nor checked) -> (winner, share, tied)."""
    win, share, _ = votes(D, L, k)
    tops = [np.unique(lab, return_counts=True)[1] for lab in L[:, :k]]
    tied = np.array([(c == c.max()).sum() > 1 for c in tops], dtype=bool)
    return win, share, tied


def fit_isotonic(share: np.ndarray, right: np.ndarray, k: int) -> dict:
    """P(right | share) at one k. Each possible share j/k gets its validation accuracy
    shrunk toward a one-feature monotone logistic in the share by ISO_SHRINK
    pseudo-queries (a share seen 5 times does not claim its 5/5, and a share validation
    never saw takes the logistic's value rather than its neighbour's), less ISO_Z standard
    errors of that estimate: a share right 13 of 17 times on validation was right 14 of
    24 on test (simulated; two binomials that far apart are not rare), and a claim of one
    bin's point estimate over-claims on the next sample about half the time. Then the claims
    are made non-decreasing from below: each share claims the least of its own and every
    higher share's, so more agreement never claims less and no share claims more than
    its own shrunk accuracy. Pooling instead (isotonic regression, sklearn's PAVA)
    averages a dip into the share below it: a rare 6 of 20 right 0.58 on held-out
    queries claimed 0.85 pooled with 7 of 20 (simulated), and shrinking toward the
    overall accuracy did the same. -> {"x": shares, "y": P(right), "n": validation queries}"""
    right = np.asarray(right, np.float64)
    if not len(right):
        return {"x": [], "y": [], "n": []}
    share = np.asarray(share, np.float64)
    a, b = fit_logistic(share[:, None], right)
    if b < 0:  # the share must not lower P(right): the intercept alone
        a, b = fit_logistic(np.zeros((len(right), 0)), right)[0], 0.0
    xs = np.arange(1, k + 1) / k
    which = np.abs(share[:, None] - xs[None]).argmin(axis=1)
    n = np.bincount(which, minlength=k).astype(np.float64)
    hits = np.bincount(which, weights=right, minlength=k)
    prior = 1 / (1 + np.exp(-(a + b * xs)))
    shrunk = (hits + ISO_SHRINK * prior) / (n + ISO_SHRINK)
    lower = np.clip(shrunk - ISO_Z * np.sqrt(shrunk * (1 - shrunk) / (n + ISO_SHRINK)), 0, 1)
    y = np.minimum.accumulate(lower[::-1])[::-1]
    return {"x": xs.tolist(), "y": [float(v) for v in y], "n": n.astype(int).tolist()}


def predict_isotonic(fitted: dict, share) -> np.ndarray:
    if not fitted["x"]:
        return np.full(np.shape(share), np.nan)
    return np.interp(np.asarray(share, np.float64), fitted["x"], fitted["y"])


def fit_isotonic_by_k(D: np.ndarray, L: np.ndarray, q_keys: np.ndarray) -> dict:
    """Validation kNN -> {k: isotonic fit} for each k of the grid, ties left out."""
    out = {}
    for k in grid_for(D.shape[1]):
        win, share, tied = untied_votes(D, L, k)
        out[str(k)] = fit_isotonic(share[~tied], (win == q_keys)[~tied], k)
    return out


def overclaim_by_k(Dt, Lt, t_keys, iso_by_k: dict, ece, ks=REPORT_KS) -> dict:
    """Per k: per vote share (test queries, ties left out) claimed vs right -> {k: {"worst":
    the largest claimed - right over shares with >= OVERCLAIM_MIN_N queries, "bins":
    [(share, claimed, right, n)], "ece"}}. ece: calibration.ece (passed in, as to report_by_k)."""
    out = {}
    for k in [k for k in ks if k <= Dt.shape[1]]:
        found = weights_at(iso_by_k, k)
        if found is None:
            continue
        win, share, tied = untied_votes(Dt, Lt, k)
        share, right = share[~tied], (win == t_keys)[~tied].astype(float)
        p = predict_isotonic(found[1], share)
        bins = []
        for s in np.unique(np.round(share, 6)):
            m = np.isclose(share, s)
            bins.append((float(s), float(p[m].mean()), float(right[m].mean()), int(m.sum())))
        big = [c - r for _, c, r, n in bins if n >= OVERCLAIM_MIN_N]
        out[str(k)] = {"worst": max(big) if big else None, "bins": bins,
                       "ece": ece(p, right)[0] if len(p) else None, "ties": int(tied.sum())}
    return out
