"""Calibration where it is shown: P(same) and the vote's P(right) are fitted for validation
queries against the train gallery (medsim.training.calibration), while a person's search
looks among every split by default. For each subset's test queries this measures the test
ECE (10 bins) against the train gallery (what `medsim evaluate` reports) and against every
split, each query's own image left out, with the model's stored calibration.

    MEDSIM_HOME=<the demo's> python bench/bench_calibration_gallery.py
"""

from __future__ import annotations

import argparse

import numpy as np

from medsim import db, registry
from medsim.training import calibration, data, metrics, network, vote_model

KS = (1, 5, 10, 20, 50)


def without_self(D: np.ndarray, I: np.ndarray, own: np.ndarray, k: int):
    keep = own[:, None] != I
    keep[keep.sum(1) > k, -1] = False  # not found among the k + 1: drop the farthest
    return D[keep].reshape(len(D), k), I[keep].reshape(len(I), k)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with db.connect() as conn:
        row = registry.get(conn, "current")
        net = row.load(conn)
        S = {s: data.load_split(conn, [s], row.datasets, input_size=net.cfg.image_size) for s in ("train", "val", "test")}
        cal = {r[0]: r[1] for r in conn.execute("SELECT dataset, report FROM medsim.calibrations WHERE model_id = %s",
                                                (row.id,))}
    Z = {s: network.embed(net, S[s].images) for s in S}
    print(f"model {row.id}; test ECE of P(same) and of the vote (claimed / right), k = {', '.join(map(str, KS))}")
    for d in np.unique(S["test"].dataset_ids):
        flag = S["test"].flags[int(d)]
        if flag not in cal:
            continue
        c, m = cal[flag], {s: S[s].dataset_ids == d for s in S}
        zt, kt = Z["test"][m["test"]], S["test"].label_keys[m["test"]]
        every = [s for s in ("train", "val", "test")]
        galleries = {"train (the fit's)": (Z["train"][m["train"]], S["train"].label_keys[m["train"]], False),
                     "every split": (np.concatenate([Z[s][m[s]] for s in every]),
                                     np.concatenate([S[s].label_keys[m[s]] for s in every]), True)}
        for name, (zb, kb, self_in) in galleries.items():
            D, I = metrics.knn_search(zt, zb, max(KS) + self_in)
            if self_in:  # the test queries are the gallery's last rows, in order
                D, I = without_self(D, I, len(zb) - len(zt) + np.arange(len(zt)), max(KS))
            L = kb[I]
            cells = []
            for k in KS:
                win, share, dist = vote_model.votes(D, L, k)
                pv = vote_model.predict(vote_model.weights_at(c["vote_by_k"], k)[1], np.column_stack([share, dist]))
                right = (win == kt).astype(float)
                ps = calibration.sigmoid(c["a"], c["b"], D[:, :k].ravel())
                same = (L[:, :k] == kt[:, None]).ravel().astype(float)
                cells.append(f"k{k} {calibration.ece(ps, same)[0]:.3f} {calibration.ece(pv, right)[0]:.3f} "
                             f"({pv.mean():.2f}/{right.mean():.2f})")
            print(f"{flag:15s} {name:18s} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
