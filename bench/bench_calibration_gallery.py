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
from medsim.search import SPLITS, recall  # noqa: E402
from medsim.training import calibration, metrics, vote_model  # noqa: E402


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    row, _, S, Z = current_model_splits()
    with db.connect() as conn:
        cals = calibration.load(conn, row.id)
    ks = vote_model.REPORT_KS
    print(f"model {row.id}; test ECE of P(same) and of the vote (claimed / right), k = {', '.join(map(str, ks))}")
    for d in np.unique(S["test"].dataset_ids):
        flag = S["test"].flags[int(d)]
        if flag not in cals:
            continue
        c, m = cals[flag], {s: S[s].dataset_ids == d for s in S}
        zt, kt = Z["test"][m["test"]], S["test"].label_keys[m["test"]]
        galleries = {"train (the fit's)": (Z["train"][m["train"]], S["train"].label_keys[m["train"]], False),
                     "every split": (np.concatenate([Z[s][m[s]] for s in SPLITS]),
                                     np.concatenate([S[s].label_keys[m[s]] for s in SPLITS]), True)}
        for name, (zb, kb, self_in) in galleries.items():
            D, I = metrics.knn_search(zt, zb, max(ks) + self_in)
            if self_in:  # the test queries are the gallery's last rows, in order
                I, D = recall.drop_self(I, D, len(zb) - len(zt) + np.arange(len(zt)), max(ks))
            # the figures medsim evaluate reports, computed by the same function
            by_k = vote_model.report_by_k(D, kb[I], kt, c.vote_by_k,
                                          lambda x, c=c: calibration.sigmoid(c.a, c.b, x), calibration.ece)
            cells = [f"k{k} {r['p_same_ece']:.3f} {r['vote_ece']:.3f} ({r['vote_claimed']:.2f}/{r['vote_right']:.2f})"
                     for k, r in by_k.items()]
            print(f"{flag:15s} {name:18s} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
