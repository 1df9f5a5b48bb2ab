"""Re-ranking after the first search (medsim.search.rerank), measured on a trained model.

For each subset, validation and test queries search the subset's train split (the
literature's protocol, mAP@5 / ACC@1 as in bench_quality.py) with the model's stored
network: the plain search, alpha query expansion over the top n (Radenovic et al. 2018),
database-side augmentation over each gallery image's top n, and k-reciprocal re-ranking
(Zhong et al. 2017). A variant worth adopting should win on validation, where it would be
chosen, and then on test. Cost: milliseconds per query over the plain search, in numpy.

    MEDSIM_HOME=... python bench/bench_rerank.py        # the current model of that database
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from medsim import db, migrate, registry
from medsim.model import network
from medsim.search import rerank
from medsim.training import data, metrics


def lit(I, q, b, qm, bm) -> tuple[float, float]:
    r = metrics.literature_metrics(I, q.label_keys[qm], b.label_keys[bm], intervals=False)
    return 100 * r["map@5"], 100 * r["acc@1"]


def variants(xq: np.ndarray, xb: np.ndarray) -> dict:
    """name -> (top-5 gallery positions, extra seconds per query)."""
    out = {"plain search": (metrics.knn_search(xq, xb, 5)[1], 0.0)}
    for n in (2, 5, 10):
        t = time.perf_counter()
        _, I = metrics.knn_search(xq, xb, n)
        out[f"alpha-QE, top {n}, alpha 3"] = (metrics.knn_search(rerank.expand(xq, xb[I], 3.0), xb, 5)[1],
                                              (time.perf_counter() - t) / len(xq))
    for n in (1, 3, 5):
        xb2 = rerank.augment_database(xb, n, 3.0)  # once per gallery, not per query
        out[f"DBA, top {n}"] = (metrics.knn_search(xq, xb2, 5)[1], 0.0)
    for k1, k2 in ((20, 6), (10, 3)):
        t = time.perf_counter()
        D = rerank.k_reciprocal(xq, xb, k1, k2, 0.3)
        out[f"k-reciprocal k1={k1} k2={k2} lambda 0.3"] = (np.argsort(D, 1)[:, :5], (time.perf_counter() - t) / len(xq))
    return out


def current_model_splits():
    """The database's current model with its three splits and their embeddings ->
    (model row, network, {split: data.Split}, {split: embeddings}); shared with
    bench_calibration_gallery.py."""
    with db.connect() as conn:
        migrate.check(conn)  # a database without medsim's schema: one sentence, not a traceback
        row = registry.get(conn, "current")
        net = row.load(conn)
        S = {s: data.load_split(conn, [s], row.datasets, input_size=net.cfg.image_size) for s in ("train", "val", "test")}
    return row, net, S, {s: network.embed(net, S[s].images) for s in S}


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    row, _, S, Z = current_model_splits()
    print(f"model {row.id} ({row.preset}); mAP@5 / ACC@1 in %, val and test queries against train")
    print("| subset | variant | val mAP@5 / ACC@1 | test mAP@5 / ACC@1 | ms per query over the plain search |")
    print("| --- | --- | --- | --- | --- |")
    for d in np.unique(S["test"].dataset_ids):
        name = S["test"].flags[int(d)]
        bm = S["train"].dataset_ids == d
        res, cost = {}, {}
        for split in ("val", "test"):
            qm = S[split].dataset_ids == d
            for k, (I, sec) in variants(Z[split][qm], Z["train"][bm]).items():
                res.setdefault(k, {})[split] = lit(I, S[split], S["train"], qm, bm)
                cost[k] = sec
        for k, r in res.items():
            print(f"| {name} | {k} | {r['val'][0]:.1f} / {r['val'][1]:.1f} | {r['test'][0]:.1f} / {r['test'][1]:.1f} "
                  f"| {1000 * cost[k]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
