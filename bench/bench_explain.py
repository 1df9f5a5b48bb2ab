"""Faithfulness of the similarity maps (medsim.model.explain), measured as the deletion
AUC on the pair distance (RISE, Petsiuk et al. 2018), and their cost.

Per subset: up to --pairs test images (breast has 156) and each one's nearest train image
(the model's top-1, as a search shows it). For each method, each image of the pair is
turned grey in the map's order, the other image fixed, and the closeness left is averaged
over 16 steps: lower is more faithful. Baselines: a random order (mean of 3), the
brightest pixels first, the strongest edges first. Figures: mean deletion AUC with a
bootstrap 95% interval over pairs, the ratio to random, and the p50 milliseconds per pair
(both maps, torch threads as set).

    MEDSIM_HOME=... python bench/bench_explain.py            # the current model of that database
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from medsim import db, registry
from medsim.model import explain, network
from medsim.training import data, metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=200, help="test queries per subset (default 200)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--baseline", choices=explain.BASELINES, default=explain.DEFAULT_BASELINE,
                   help="what a removed pixel becomes, in the maps and in the deletion curve (default: blur)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with db.connect() as conn:
        row = registry.get(conn, "current")
        net = row.load(conn).eval()
        tr, te = (data.load_split(conn, [s], row.datasets, input_size=net.cfg.image_size) for s in ("train", "test"))
    ztr, zte = network.embed(net, tr.images), network.embed(net, te.images)
    rng = np.random.default_rng(0)
    print(f"model {row.id} ({row.preset}), {net.cfg.image_size} px, torch threads {a.threads}, removed pixels "
          f"become {a.baseline}; deletion AUC "
          f"(lower is more faithful) [bootstrap 95%], ratio to random, ms per pair (p50)")
    print("| subset | pairs | order | deletion AUC [95% CI] | / random | ms per pair (p50) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for d in np.unique(te.dataset_ids):
        name = te.flags[int(d)]
        qm, bm = np.flatnonzero(te.dataset_ids == d), np.flatnonzero(tr.dataset_ids == d)
        qi = qm[:a.pairs]
        _, nn_ = metrics.knn_search(zte[qi], ztr[bm], 1)
        aucs: dict[str, list] = {}
        cost: dict[str, list] = {}
        for q, n in zip(qi, bm[nn_[:, 0]], strict=True):
            ia, ib = te.images[q], tr.images[n]
            ia3 = ia if ia.ndim == 3 else np.repeat(ia[..., None], 3, 2)
            ib3 = ib if ib.ndim == 3 else np.repeat(ib[..., None], 3, 2)
            xa, xb = network.to_input(ia3[None]), network.to_input(ib3[None])
            for method in explain.METHODS:
                t = time.perf_counter()
                ma, mb = explain.pair_maps(net, ia3, ib3, method, a.baseline)
                cost.setdefault(method, []).append(1000 * (time.perf_counter() - t))
                v = [explain.deletion_auc(net, xa, xb, explain.orders(ma, ia3, "map", rng), baseline=a.baseline),
                     explain.deletion_auc(net, xb, xa, explain.orders(mb, ib3, "map", rng), baseline=a.baseline)]
                aucs.setdefault(method, []).append(np.nanmean(v))
            for kind in ("random", "intensity", "edges"):
                reps = 3 if kind == "random" else 1
                v = [explain.deletion_auc(net, x, y, explain.orders(ma, img, kind, rng), baseline=a.baseline)
                     for _ in range(reps) for x, y, img in ((xa, xb, ia3), (xb, xa, ib3))]
                aucs.setdefault(kind, []).append(np.nanmean(v))
        rand = np.nanmean(aucs["random"])
        for kind, v in aucs.items():
            v = np.asarray(v)
            v = v[np.isfinite(v)]
            lo, hi = metrics.bootstrap_ci(v)
            ms = f"{np.median(cost[kind]):.1f}" if kind in cost else ""
            print(f"| {name} | {len(v)} | {kind} | {v.mean():.3f} [{lo:.3f}, {hi:.3f}] | {v.mean() / rand:.2f} | {ms} |",
                  flush=True)


if __name__ == "__main__":
    main()
