"""Training that sees what queries will be (issue 39): the default 28 px recipe trained
with augmentation "affine" (the old default) and "any_size" (medsim.training.augment), per
seed, on a fresh embedded database with the MedMNIST subsets ingested from
../shared/medmnist (as `medsim demo` ingests them; PneumoniaMNIST's re-saved file
accepted). Per run:

- any size: the first --n BreastMNIST training images re-saved as bench_any_size saves
  them (0.5x, 2x, 4x, 18x with Pillow's nearest, bilinear, bicubic; JPEG q = 90), each
  read back and embedded through the one path (images.read, model_input) and searched as
  a vector among all BreastMNIST images (what a search by file does before any
  recognition): % whose first neighbour is the image itself, and the mean overlap of the
  first 9 with the stored image's own first 9;
- BUSI: the originals paired to their BreastMNIST version (bench_any_size.busi_pairs),
  each embedded the same way: % whose first neighbour is its version;
- retrieval: test queries against train per subset (evaluate.literature: mAP@5, ACC@1);
- seconds per epoch (the machine's other load included).

    nice -n 5 .venv/bin/python bench/bench_augment_size.py --flags breastmnist --seeds 0
    nice -n 5 .venv/bin/python bench/bench_augment_size.py --seeds 0,1,2 --cost64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_any_size import BUSI, busi_pairs, copies, overlap9  # noqa: E402
from common import SHARED, fresh_database, machine  # noqa: E402

K = 10


def embed_file(net, path: Path) -> np.ndarray:
    from medsim import images
    from medsim.model import network

    x = images.model_input(images.read(str(path), name=path.name), net.cfg.image_size)
    return network.embed(net, x[None])[0]


def any_size(net, gallery, in_train: np.ndarray, n: int, tmp: Path) -> dict:
    """copy name -> (itself first, overlap of first 9) means over the first n train images."""
    from medsim.model import network
    from medsim.training import metrics

    zb = network.embed(net, gallery.images)
    _, ref = metrics.knn_search(zb, zb, k=K + 1)
    rows = np.flatnonzero(in_train)[:n]
    stats: dict[str, list] = {}
    for r in rows:
        image_id = int(gallery.ids[r])
        ref_ids = [int(gallery.ids[j]) for j in ref[r] if j != r][:9]
        for name, ext, data in copies(gallery.images[r][..., :1]):
            path = tmp / f"{image_id}.{ext}"
            path.write_bytes(data)
            _, own = metrics.knn_search(embed_file(net, path)[None], zb, k=K + 1)
            own_ids = [int(gallery.ids[j]) for j in own[0]]
            stats.setdefault(name, []).append((own_ids[0] == image_id, overlap9(own_ids, ref_ids, image_id)))
    return {name: tuple(np.mean(np.array(v, float), 0)) for name, v in stats.items()}


def busi_first(pairs: list, net, gallery) -> tuple[int, float]:
    from medsim.model import network
    from medsim.training import metrics

    if not pairs:
        return 0, float("nan")
    zb = network.embed(net, gallery.images)
    zq = np.stack([embed_file(net, p) for p, _, _ in pairs])
    _, I = metrics.knn_search(zq, zb, k=1)
    return len(pairs), float(np.mean([int(gallery.ids[I[i, 0]]) == m for i, (_, m, _) in enumerate(pairs)]))


def run_one(pairs, splits, gallery, in_train, kind: str, seed: int, n: int, epochs: int, steps: int, tmp: Path) -> dict:
    from medsim.model import network
    from medsim.training import evaluate, train

    tr, va, te = splits
    tcfg = train.TrainConfig(seed=seed, augment=kind, epochs=epochs, steps_per_epoch=steps,
                             flags=sorted(set(tr.flags.values())), device="cpu")
    t0 = time.perf_counter()
    net, history, best = train.fit(tr, va, tcfg, log=lambda *a: None)
    out = {"kind": kind, "seed": seed, "train_s": time.perf_counter() - t0, "best_epoch": best["epoch"],
           "s_per_epoch": float(np.mean([h["seconds"] for h in history]))}
    lit = evaluate.literature(network.embed(net, te.images), te, network.embed(net, tr.images), tr, "l2",
                              intervals=False)
    out["retrieval"] = {f: (100 * m["map@5"], 100 * m["acc@1"]) for f, m in lit.items()}
    out["any_size"] = any_size(net, gallery, in_train, n, tmp)
    out["busi"] = busi_first(pairs, net, gallery)
    return out


def cost64(splits, seeds) -> None:
    """Seconds per epoch at 64 px with the ResNet-18 preset (a short run: the cost, not quality)."""
    from medsim.training import train

    tr, va, _ = splits
    for kind in ("affine", "any_size"):
        tcfg = train.TrainConfig(preset="resnet", input_size=64, seed=0, augment=kind, epochs=2, steps_per_epoch=5,
                                 flags=sorted(set(tr.flags.values())), device="cpu")
        _, history, _ = train.fit(tr, va, tcfg, log=lambda *a: None)
        print(f"64 px resnet, {kind}: {np.mean([h['seconds'] for h in history]) / 5:.2f} s per step "
              f"(validation included)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flags", default="breastmnist,pneumoniamnist,retinamnist")
    ap.add_argument("--kinds", default="affine,any_size")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--n", type=int, default=50, help="BreastMNIST training images re-saved (the lowest ids)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cost64", action="store_true", help="also the cost per step at 64 px (resnet)")
    a = ap.parse_args()
    from medsim import db
    from medsim.sources import ingest
    from medsim.training import data

    url, server = fresh_database("augsize")
    os.environ.update(DATABASE_URL=url, MEDSIM_HOME=tempfile.mkdtemp(prefix="medsim-bench-home-"))
    os.environ.setdefault("MEDSIM_PATIENT_KEY", "bench key for augment size only")
    flags = a.flags.split(",")
    if "breastmnist" not in flags:
        flags.append("breastmnist")  # the any-size figures are on BreastMNIST
    print(f"machine: {machine()}; recipe: TrainConfig defaults ({a.epochs} x {a.steps}), label mode, "
          f"trained on {', '.join(sorted(flags))}", flush=True)
    with db.connect(url, autocommit=True) as conn, tempfile.TemporaryDirectory(prefix="aug-size-") as tmp:
        for flag in flags:
            ingest.ingest(conn, flag, data_dir=str(SHARED), accept_unofficial=True, allow_download=False,
                          show_progress=False)
        splits = tuple(data.load_split(conn, [s], sorted(flags)) for s in ("train", "val", "test"))
        gallery = data.load_split(conn, ["train", "val", "test"], ["breastmnist"])
        in_train = np.isin(gallery.ids, splits[0].ids)
        pairs = busi_pairs(conn, 0.95)[2] if BUSI.is_dir() else []  # (BUSI path, BreastMNIST id, r)
        if a.cost64:
            cost64(splits, a.seeds)
        results = []
        for seed in (int(s) for s in a.seeds.split(",")):
            for kind in a.kinds.split(","):
                r = run_one(pairs, splits, gallery, in_train, kind, seed, a.n, a.epochs, a.steps, Path(tmp))
                results.append(r)
                print(f"{kind} seed {seed}: {r['train_s']:.0f} s, {r['s_per_epoch']:.2f} s/epoch, best epoch "
                      f"{r['best_epoch']}; " + "; ".join(f"{f} {m:.1f}/{c:.1f}" for f, (m, c) in r["retrieval"].items())
                      + f"; BUSI first {r['busi'][1]:.0%} of {r['busi'][0]}", flush=True)
    report(results)


def report(results: list) -> None:
    kinds = list(dict.fromkeys(r["kind"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    by = {k: [r for r in results if r["kind"] == k] for k in kinds}
    print(f"\nmeans over seeds {seeds}")
    print("| copy | " + " | ".join(f"{k}: itself first | {k}: overlap of 9" for k in kinds) + " |")
    print("| --- |" + " --- | --- |" * len(kinds))
    for name in by[kinds[0]][0]["any_size"]:
        cells = []
        for k in kinds:
            v = np.mean([r["any_size"][name] for r in by[k]], 0)
            cells += [f"{100 * v[0]:.0f}%", f"{v[1]:.1f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    cells = []
    for k in kinds:
        cells += [f"{100 * np.mean([r['busi'][1] for r in by[k]]):.0f}% of {by[k][0]['busi'][0]}", ""]
    print("| BUSI original: its BreastMNIST version first | " + " | ".join(cells) + " |")
    print("\n| subset | " + " | ".join(f"{k}: mAP@5 / ACC@1" for k in kinds) + " |")
    print("| --- |" + " --- |" * len(kinds))
    for flag in by[kinds[0]][0]["retrieval"]:
        cells = []
        for k in kinds:
            v = np.array([r["retrieval"][flag] for r in by[k]])
            cells.append(f"{v[:, 0].mean():.1f} / {v[:, 1].mean():.1f}"
                         + (f" (sd {v[:, 0].std(ddof=1):.1f} / {v[:, 1].std(ddof=1):.1f})" if len(v) > 1 else ""))
        print(f"| {flag} | " + " | ".join(cells) + " |")
    print("| s / epoch (28 px) | " + " | ".join(f"{np.mean([r['s_per_epoch'] for r in by[k]]):.2f}" for k in kinds)
          + " |")


if __name__ == "__main__":
    main()
