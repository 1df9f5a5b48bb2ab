"""Train and evaluate both presets in both pair modes on the real files (CPU by default).

Prints seconds per epoch, total training time, and the evaluation table (pair
verification + retrieval vs the raw-pixel baseline) for each run. The seed preset runs
at 128 px (the notebook's input size), which is ~30x slower per image on CPU, so by
default it gets fewer pairs and epochs; the flags below change that.
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
from medsim.training import (
    evaluate,  # noqa: E402
    train,  # noqa: E402
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--presets", nargs="+", default=["default", "seed"])
    p.add_argument("--modes", nargs="+", default=["dataset", "label"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed-epochs", type=int, default=4)
    p.add_argument("--seed-pairs", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=None, help="override epochs for every run")
    p.add_argument("--data-dir", default=str(SHARED))
    p.add_argument("--out-dir", default="bench/out")
    a = p.parse_args()
    url, server = fresh_database()
    print(f"machine: {machine()}, device {a.device}")
    summary = []
    with db.connect(url, autocommit=True) as conn:
        for flag in PRESENT:
            ingest.ingest(conn, flag, data_dir=a.data_dir, accept_unofficial=True, allow_download=False,
                          show_progress=False)
        for preset in a.presets:
            for mode in a.modes:
                tcfg = train.TrainConfig(mode=mode, preset=preset, device=a.device)
                if preset == "seed":
                    tcfg.epochs, tcfg.pairs_per_epoch, tcfg.patience = a.seed_epochs, a.seed_pairs, 2
                if a.epochs:
                    tcfg.epochs = a.epochs
                print(f"\n### preset {preset}, mode {mode}: {tcfg}")
                t0 = time.perf_counter()
                mid = train.train(conn, tcfg, out_dir=a.out_dir, progress=False)
                wall = time.perf_counter() - t0
                secs = [r[0] for r in conn.execute(
                    "SELECT seconds FROM medsim.training_epochs WHERE model_id = %s ORDER BY epoch", (mid,))]
                r = evaluate.evaluate(conn, mid, device=a.device)
                print(evaluate.format_table(r))
                line = (f"RESULT preset={preset} mode={mode} epochs={len(secs)} "
                        f"s/epoch={sum(secs) / len(secs):.1f} train_wall_s={wall:.0f} "
                        + "".join(f"pair_acc[{m}]={r['pairs'][m]['test_acc']:.4f} " for m in sorted(r["pairs"]))
                        + " ".join(f"map5[{f}]={m['label_map@5']:.4f}(px {r['baseline_raw_pixel_cosine'][f]['label_map@5']:.4f})"
                                   for f, m in r["retrieval"].items()))
                print(line)
                summary.append(line)
    print("\n" + "\n".join(summary))
    server.cleanup()


if __name__ == "__main__":
    main()
