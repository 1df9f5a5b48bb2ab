"""The seed notebook's own protocol: `medsim train --mode dataset`, then test pair accuracy
(pairs of test images, same subset or not, at the validation threshold), on the real
MedMNIST files. One line per variant, so a regression can be traced to what moved it.

    .venv/bin/python bench/bench_seed_protocol.py                     # the default recipe, select on val mAP@5 and on val AUC
    .venv/bin/python bench/bench_seed_protocol.py --variants default,val_auc,pairs --seeds 0,1,2

Variants: `default` (today's `medsim train --mode dataset`), `val_map` (the epoch chosen on
val label mAP@5, the label mode's rule), `val_auc` (chosen on val pair AUC: the dataset
protocol's own score), `pairs` (the first recipe's independent balanced pairs),
`no_tta` (no flip test-time augmentation), `margin` (subsets at the diagnoses' margin).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRESENT, SHARED, fresh_database, machine  # noqa: E402

from medsim import db  # noqa: E402
from medsim.sources import ingest  # noqa: E402
from medsim.training import evaluate, train  # noqa: E402

VARIANTS = {
    "default": ({}, {}),
    "val_map": ({"select_on": "val_map"}, {}),
    "val_auc": ({"select_on": "val_auc"}, {}),
    "pairs": ({"sampler": "pairs", "select_on": "val_auc"}, {}),
    "no_tta": ({}, {"tta_flip": False}),
    "margin": ({"dataset_margin": None}, {}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="default,val_map,val_auc")
    p.add_argument("--seeds", default="0")
    p.add_argument("--data-dir", default=str(SHARED))
    a = p.parse_args()
    url, server = fresh_database()
    print(f"machine: {machine()}", flush=True)
    with db.connect(url, autocommit=True) as conn:
        for flag in PRESENT:
            ingest.ingest(conn, flag, data_dir=a.data_dir, accept_unofficial=True, allow_download=False,
                          show_progress=False)
        print("| variant | seed | epochs run | best epoch | train s | test pair acc (dataset pairs) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name in a.variants.split(","):
            tweaks, model_overrides = VARIANTS[name]
            for seed in (int(s) for s in a.seeds.split(",")):
                tcfg = train.TrainConfig(mode="dataset", seed=seed, **tweaks)
                t0 = time.perf_counter()
                tr = train.data.load_split(conn, ["train"], None, 28, 28)
                va = train.data.load_split(conn, ["val"], None, 28, 28)
                net, history, best = train.fit(tr, va, tcfg, progress=False, log=lambda *_: None,
                                               model_overrides=model_overrides or None)
                seconds = time.perf_counter() - t0
                mid = train.registry.register(conn, net, mode="dataset", datasets=list(PRESENT),
                                              train_config={"bench": name, "seed": seed})
                ev = evaluate.evaluate(conn, mid, out_dir=Path("bench/out"))
                acc = ev["pairs"]["dataset"]["test_acc"]
                print(f"| {name} | {seed} | {len(history)} | {best['epoch']} | {seconds:.0f} | {100 * acc:.2f}% |",
                      flush=True)
    server.cleanup()


if __name__ == "__main__":
    main()
