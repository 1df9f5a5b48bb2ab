"""BUSI at its own resolution (issue 36): the same recipe at 28, 64, 128 (224) px input.

On a fresh embedded database: `medsim ingest-folder ../shared/busi --name busi` (labels
from the folders, medsim's seeded default split), then per size and seed one training run
on BUSI alone (`medsim train --image-size N`'s path: the preset follows the size, 28 px
the default net, larger the ResNet-18), each in its own process so its peak RSS is its own.
Test queries against the train split, the literature's metrics (evaluate.literature), for
BUSI's three classes and with benign and normal merged (BreastMNIST's two classes: the
same embeddings, relabelled).

    nice -n 5 .venv/bin/python bench/bench_resolution.py --sizes 28,64,128 --seeds 0 --epochs 6 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fresh_database, machine  # noqa: E402

BUSI = Path(__file__).resolve().parents[1].parent / "shared" / "busi"


def one(url: str, size: int, seed: int, epochs: int, steps: int, pretrain: int = 0, preset: str | None = None) -> dict:
    """Train and evaluate at one size, in this process -> a row of the table."""
    from medsim import db
    from medsim.model import network
    from medsim.training import data, evaluate, sizing, train

    tcfg = train.TrainConfig(preset=None, input_size=size, seed=seed, epochs=epochs, steps_per_epoch=steps,
                             flags=["busi"], device="cpu", pretrain_epochs=pretrain)
    with db.connect(url, autocommit=True) as conn:
        name, size, _ = sizing.resolve(preset, size, sizing.stored_sides(conn, ["busi"], 28))
        tcfg = replace(tcfg, preset=name)
        tr, va, te = (data.load_split(conn, [s], ["busi"], input_size=size) for s in ("train", "val", "test"))
        names = dict(conn.execute("SELECT i.id, medsim.label_name(i.dataset_id, i.labels) FROM medsim.images i "
                                  "JOIN medsim.datasets d ON d.id = i.dataset_id WHERE d.flag = 'busi'").fetchall())
    t0 = time.perf_counter()
    net, history, best = train.fit(tr, va, tcfg, log=lambda *a: None)
    seconds = time.perf_counter() - t0
    zb, zq = network.embed(net, tr.images), network.embed(net, te.images)

    def two_class(s: data.Split) -> data.Split:  # benign + normal: one class, as BreastMNIST has it
        return replace(s, label_keys=np.array([int(names[int(i)] == "malignant") for i in s.ids]))

    three = evaluate.literature(zq, te, zb, tr, "l2", intervals=False)["busi"]
    two = evaluate.literature(zq, two_class(te), zb, two_class(tr), "l2", intervals=False)["busi"]
    return {"size": size, "preset": name, "seed": seed, "epochs": len(history), "best_epoch": best["epoch"],
            "s_per_epoch": float(np.mean([h["seconds"] for h in history])), "train_s": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "map5": three["map@5"], "acc1": three["acc@1"], "map5_2": two["map@5"], "acc1_2": two["acc@1"],
            "n": [len(tr), len(va), len(te)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="28,64,128")
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps", type=int, default=20, help="steps per epoch (P x K batches of 3 x 16 images)")
    p.add_argument("--preset", default=None, help="the network (default: the size's, as `medsim train` picks it)")
    p.add_argument("--pretrain-epochs", type=int, default=0, help="SimCLR epochs before the supervised stage")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # url,size,seed: a child's run
    a = p.parse_args()
    if a.one:
        url, size, seed = a.one.rsplit(",", 2)
        print(json.dumps(one(url, int(size), int(seed), a.epochs, a.steps, a.pretrain_epochs, a.preset)), flush=True)
        return
    from medsim import cli

    url, server = fresh_database("busi")
    os.environ.update(DATABASE_URL=url, MEDSIM_HOME=tempfile.mkdtemp(prefix="medsim-bench-home-"))
    os.environ.setdefault("MEDSIM_PATIENT_KEY", "bench key for busi only")
    print(f"machine: {machine()}; torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}", flush=True)
    t0 = time.perf_counter()
    assert cli.main(["ingest-folder", str(BUSI), "--name", "busi", "--quiet"]) == 0
    print(f"ingest-folder: {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"recipe: {a.pretrain_epochs} SimCLR epochs, then pk sampler, {a.epochs} epochs x {a.steps} steps (3 "
          f"classes x 16 images a step), affine "
          f"augmentation, epoch chosen on val mAP@5; fewer epochs than the default 40 x 40 on a shared 2-core "
          f"machine\n")
    print("| size | preset | seed | s / epoch | train s | peak RSS MB | mAP@5 | ACC@1 | 2-class mAP@5 | 2-class ACC@1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    m = None
    for size in (int(s) for s in a.sizes.split(",")):
        for seed in (int(s) for s in a.seeds.split(",")):
            r = subprocess.run([sys.executable, __file__, "--one", f"{url},{size},{seed}", "--epochs", str(a.epochs),
                                "--steps", str(a.steps), "--pretrain-epochs", str(a.pretrain_epochs)]
                               + (["--preset", a.preset] if a.preset else []),
                               capture_output=True, text=True)
            if r.returncode:
                print(f"| {size} | failed: {r.stderr.strip()[-2000:]} |", flush=True)
                continue
            m = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"| {m['size']} | {m['preset']} | {seed} | {m['s_per_epoch']:.1f} | {m['train_s']:.0f} | "
                  f"{m['peak_rss_mb']:.0f} | {100 * m['map5']:.1f} | {100 * m['acc1']:.1f} | "
                  f"{100 * m['map5_2']:.1f} | {100 * m['acc1_2']:.1f} |", flush=True)
    print(f"\nsplit (train, val, test): {m['n'] if m else '-'}")


if __name__ == "__main__":
    main()
