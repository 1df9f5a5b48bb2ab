"""Calibration where it is shown: P(same) and the vote's P(right) are fitted for validation
queries against the train gallery (medsim.training.calibration), while a person's search
looks among every split by default. For each subset's test queries this measures the test
ECE (10 bins) against the train gallery (what `medsim evaluate` reports) and against every
split, each query's own image left out, with the model's stored calibration.

    MEDSIM_HOME=<the demo's> python bench/bench_calibration_gallery.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rerank import current_model_splits  # noqa: E402

from medsim import db  # noqa: E402
from medsim.search import recall  # noqa: E402
from medsim.training import calibration, metrics, vote_model  # noqa: E402

KS = (1, 5, 10, 20, 50)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    row, _, S, Z = current_model_splits()
    with db.connect() as conn:
        cal = {r[0]: r[1] for r in conn.execute("SELECT dataset, report FROM medsim.calibrations WHERE model_id = %s",
                                                (row.id,))}
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
                I, D = recall.drop_self(I, D, len(zb) - len(zt) + np.arange(len(zt)), max(KS))
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
