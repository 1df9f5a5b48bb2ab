"""Retrieval quality against the published MedMNIST anchors, over several training seeds.

Trains each recipe (a named set of TrainConfig / ModelConfig changes) once per seed on
the real files, then measures what the literature measures (medsim.training.evaluate):
each subset's test images query its train split, mAP@5 with AP@k over the hits in the
top k, ACC@1 (Mahbod et al. 2024, masih4/MedImageRetrieval metric.py); plus the
notebook's dataset-pair verification and the raw-pixel baseline through the same code.
Model selection uses validation only. Prints one RESULT line per training and a table of
mean +- std per recipe.

    python bench/bench_quality.py                       # the default recipe, seeds 0 1 2
    python bench/bench_quality.py --recipes ablation    # every step of the ablation
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRESENT, SHARED, fresh_database, machine  # noqa: E402

from medsim import db  # noqa: E402
from medsim.model import network  # noqa: E402
from medsim.sources import ingest  # noqa: E402
from medsim.training import calibration, data, evaluate, train, vote_model  # noqa: E402

# The ablation: each recipe adds one change to the one before it, ending at the default
# (what `medsim train` and the demo run: TrainConfig() and the "default" preset). Then
# changes that were measured on top of the default and not adopted.
_V1 = dict(sampler="pairs", augment="flip", select_on="val_auc", epochs=15, patience=5, dataset_margin=None,
           model=dict(tta_flip=False))
_PK = dict(_V1, sampler="pk", epochs=40, patience=None)
_AFFINE = dict(_PK, augment="affine")
_MARGIN = dict(_AFFINE, dataset_margin=1.4)
_SELECT = dict(_MARGIN, select_on="val_map")
RECIPES: dict[str, dict] = {
    "v1: independent pairs, flips (the old default)": _V1,
    "+ P x K batches, every pair, hard negatives": _PK,
    "+ affine and intensity augmentation": _AFFINE,
    "+ subsets 1.4 apart, diagnoses 1.0": _MARGIN,
    "+ select the epoch on val mAP@5": _SELECT,
    "+ flip test-time augmentation = default": {},
    "default + EMA of weights (0.99)": dict(ema=0.99),
    "default + ordinal margins for retina": dict(ordinal=True),
    "default + 2 member networks": dict(model=dict(members=2)),
    "default + wider (32, 64, 128)": dict(model=dict(widths=(32, 64, 128))),
    "default + 56 px input (upsampled)": dict(model=dict(image_size=56)),
    "default + 60 epochs": dict(epochs=60),
    "default + self-supervised pre-training (SimCLR, 20 epochs on train+val)": dict(pretrain_epochs=20),
}
ABLATION = list(RECIPES)[:6]
ANCHORS = {  # best published 28 px retrieval figures (mAP@5, ACC@1), Mahbod et al. 2024 Table S.1
    "breastmnist": (87.9, 87.2), "pneumoniamnist": (88.3, 85.7), "retinamnist": (57.1, 46.8)}
GOALS = {"breastmnist": (91, 89), "pneumoniamnist": (92, 90), "retinamnist": (62, 52)}


def embeddings(net, tr, va, te) -> dict:
    return {name: network.embed(net, s.images) for name, s in (("train", tr), ("val", va), ("test", te))}


def rerank_on_val(z, tr, va, te) -> dict:
    """Re-ranking chosen per subset on validation (bench_rerank's variants; the one with
    the best val mAP@5, the plain search on a tie), then measured on test -> per subset
    {chosen, test mAP@5 / ACC@1 plain and chosen}."""
    from bench_rerank import lit, variants

    out = {}
    for d in np.unique(te.dataset_ids):
        bm = tr.dataset_ids == d
        vm, tm = va.dataset_ids == d, te.dataset_ids == d
        val = {k: lit(I, va, tr, vm, bm) for k, (I, _) in variants(z["val"][vm], z["train"][bm]).items()}
        test = {k: lit(I, te, tr, tm, bm) for k, (I, _) in variants(z["test"][tm], z["train"][bm]).items()}
        chosen = max(val, key=lambda k: (val[k][0], k == "plain search"))
        out[te.flags[int(d)]] = {"chosen": chosen, "val": val[chosen], "plain": test["plain search"],
                                 "test": test[chosen]}
    return out


def measure(z, tr, va, te) -> dict:
    lit = evaluate.literature(z["test"], te, z["train"], tr, "l2")
    lit_val = evaluate.literature(z["val"], va, z["train"], tr, "l2")
    pairs = evaluate.pair_verification(z["val"], va, z["test"], te, "dataset")
    cal = calibration.fit(z, {"train": tr, "val": va, "test": te})  # as medsim evaluate fits it
    return {"test": {f: {"map@5": m["map@5"], "acc@1": m["acc@1"], "mmv@5": m["mmv@5"]} for f, m in lit.items()},
            "val": {f: m["map@5"] for f, m in lit_val.items()},
            "dataset_pairs": pairs["test_acc"],
            "calibration": {f: {"unlike_test": c["ood_share_test"], "unlike_threshold": c["ood_d1"],
                                "by_k": {k: {"p_same_ece": r["p_same_ece"], "vote_ece": r["vote_ece"]}
                                         for k, r in c["by_k_test"].items()}} for f, c in cal.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["default"],
                   help="recipe names, 'ablation' for the six steps to the default, 'all' for every recipe")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data-dir", default=str(SHARED))
    p.add_argument("--jsonl", default=None, help="append one JSON line per training here")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="extra TrainConfig overrides for every recipe (JSON values)")
    p.add_argument("--rerank", action="store_true",
                   help="also choose a re-ranking per subset on validation and measure it on test")
    p.add_argument("--report", default=None, metavar="JSONL",
                   help="print the table from the RESULT lines stored by --jsonl (no training)")
    a = p.parse_args()
    if a.report:
        rows = [json.loads(line) for line in Path(a.report).read_text().splitlines() if line.strip()]
        results: dict[str, list] = {}
        for r in rows:
            results.setdefault(r["recipe"], []).append(r)
        table(results, rows[0]["baseline"], sorted({r["seed"] for r in rows}))
        return
    names = {"ablation": ABLATION, "all": list(RECIPES)}.get(a.recipes[0], a.recipes) if len(a.recipes) == 1 \
        else a.recipes
    names = ["+ flip test-time augmentation = default" if n == "default" else n for n in names]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; known: {list(RECIPES)}")
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    url, server = fresh_database()
    print(f"machine: {machine()}")
    with db.connect(url, autocommit=True) as conn:
        for flag in PRESENT:
            ingest.ingest(conn, flag, data_dir=a.data_dir, accept_unofficial=True, allow_download=False,
                          show_progress=False)
        tr, va, te = (data.load_split(conn, [s]) for s in ("train", "val", "test"))
    server.cleanup()
    px = evaluate.literature(evaluate.raw_pixels(te), te, evaluate.raw_pixels(tr), tr, "cosine")
    print("raw-pixel cosine baseline (same code): "
          + "  ".join(f"{f} mAP@5 {m['map@5']:.2%} ACC@1 {m['acc@1']:.2%}" for f, m in px.items()))
    results: dict[str, list] = {}
    for name in names:
        recipe = {**RECIPES[name], **extra}
        model_overrides = dict(recipe.pop("model", {}))
        if model_overrides and "widths" in model_overrides:
            model_overrides["widths"] = tuple(model_overrides["widths"])
        for seed in a.seeds:
            tcfg = train.TrainConfig(**{**recipe, "seed": seed, "device": "cpu"})
            t0 = time.perf_counter()
            net, history, best = train.fit(tr, va, tcfg, log=lambda *_: None,
                                          model_overrides=model_overrides)
            secs = time.perf_counter() - t0
            z = embeddings(net, tr, va, te)  # once per training, for both measurements
            m = measure(z, tr, va, te)
            if a.rerank:
                m["rerank"] = rerank_on_val(z, tr, va, te)
                for f, r in m["rerank"].items():
                    print(f"RERANK seed={seed} {f}: chosen on val {r['chosen']!r}; test mAP@5 / ACC@1 "
                          f"{r['plain'][0]:.1f} / {r['plain'][1]:.1f} plain -> {r['test'][0]:.1f} / {r['test'][1]:.1f}",
                          flush=True)
            m.update(recipe=name, seed=seed, train_s=secs, epochs=len(history), best_epoch=best["epoch"],
                     baseline={f: {"map@5": b["map@5"], "acc@1": b["acc@1"]} for f, b in px.items()})
            results.setdefault(name, []).append(m)
            print(f"RESULT recipe={name!r} seed={seed} train_s={secs:.0f} epochs={len(history)} "
                  f"best={best['epoch']} dataset_pairs={m['dataset_pairs']:.4f} "
                  + " ".join(f"{f}={t['map@5']:.4f}/{t['acc@1']:.4f}(val {m['val'][f]:.4f})"
                             for f, t in m["test"].items()), flush=True)
            if a.jsonl:
                with open(a.jsonl, "a") as fh:
                    fh.write(json.dumps(m) + "\n")
    table(results, px, a.seeds)


def table(results: dict[str, list], px: dict, seeds) -> None:
    print("\nliterature's mAP@5 / ACC@1 on test, % (mean +- std over seeds " + ", ".join(map(str, seeds)) + ")")
    flags = [f for f in ("breastmnist", "pneumoniamnist", "retinamnist") if f in px]
    print(f"{'recipe':48s}" + "".join(f"{f:>30s}" for f in flags) + f"{'dataset pairs':>16s}{'train s':>9s}")
    for name, rs in results.items():
        cells = ""
        for f in flags:
            mp = np.array([r["test"][f]["map@5"] for r in rs]) * 100
            ac = np.array([r["test"][f]["acc@1"] for r in rs]) * 100
            cells += f"{mp.mean():>9.1f} +-{mp.std():3.1f} /{ac.mean():>6.1f} +-{ac.std():3.1f}  "
        dp = np.mean([r["dataset_pairs"] for r in rs]) * 100
        print(f"{name:48s}{cells}{dp:>14.2f}%{np.mean([r['train_s'] for r in rs]):>9.0f}  (n={len(rs)})")
    print(f"{'raw pixels (cosine)':48s}" + "".join(f"{px[f]['map@5'] * 100:>17.1f} /{px[f]['acc@1'] * 100:>6.1f}      "
                                                  for f in flags))
    print(f"{'best published (28 px)':48s}" + "".join(f"{ANCHORS[f][0]:>17.1f} /{ANCHORS[f][1]:>6.1f}      "
                                                     for f in flags))
    print(f"{'goal':48s}" + "".join(f"{GOALS[f][0]:>17.1f} /{GOALS[f][1]:>6.1f}      " for f in flags))
    calibration_table(results, flags)


def calibration_table(results: dict[str, list], flags) -> None:
    """Test ECE per k and the share of test queries flagged unlike anything on file, as
    medsim evaluate fits them, mean (min-max) over the trainings of each recipe."""
    for name, rs in results.items():
        rs = [r for r in rs if "calibration" in r]  # JSON lines from before the calibration was measured
        if not rs:
            continue
        print(f"\n{name}: test ECE, P(same) / vote, mean over {len(rs)} trainings [largest]; goal <= 0.03;"
              " unlike: test queries flagged, mean (min-max); goal <= 2%")
        print(f"{'subset':16s}" + "".join(f"{'k=' + str(k):>31s}" for k in vote_model.REPORT_KS) + f"{'unlike':>20s}")
        for f in flags:
            cells = ""
            for k in map(str, vote_model.REPORT_KS):
                ps = np.array([r["calibration"][f]["by_k"][k]["p_same_ece"] for r in rs])
                vs = np.array([r["calibration"][f]["by_k"][k]["vote_ece"] for r in rs])
                cells += f"{ps.mean():.3f} / {vs.mean():.3f} [{ps.max():.3f} / {vs.max():.3f}]".rjust(31)
            un = np.array([r["calibration"][f]["unlike_test"] for r in rs]) * 100
            print(f"{f:16s}{cells}{un.mean():>9.1f}% ({un.min():.1f}-{un.max():.1f}%)")


if __name__ == "__main__":
    main()
