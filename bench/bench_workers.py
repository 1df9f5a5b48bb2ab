"""Several embedding workers on one machine: wall time to drain 8,236 real images (or --n
augmented ones).

    .venv/bin/python bench/bench_workers.py                  # 1, 2 and 4 workers, default threads
    .venv/bin/python bench/bench_workers.py --old-default    # also: every worker's torch on every core

Each row empties the model's embeddings, queues every image again and starts N
`python -m medsim.embed_worker --once --no-index` processes at once; the wall time runs from
the first start to the last exit (Python and torch start-up included, as a user sees it).
"--old-default" reproduces the behaviour before the worker shared the cores: each worker
told to use every core (--threads <cores>).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tests.helpers
from common import PRESENT, SHARED, fresh_database, machine  # noqa: E402

from medsim import db, queue  # noqa: E402
from medsim.sources import ingest  # noqa: E402
from tests.helpers import register_model  # noqa: E402


def drain(url: str, mid: int, n_workers: int, extra: list[str]) -> float:
    with db.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM medsim.embeddings WHERE model_id = %s", (mid,))
        queue.enqueue(conn, mid)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "medsim.embed_worker", "--database-url", url, "--once",
                               "--quiet", "--no-index", *extra], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n_workers)]
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"worker failed: {err[-2000:]}")
    wall = time.perf_counter() - t0
    with db.connect(url, autocommit=True) as conn:
        n = conn.execute("SELECT count(*) FROM medsim.embeddings WHERE model_id = %s", (mid,)).fetchone()[0]
    return wall, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--repeat", type=int, default=3, help="runs per row (median reported)")
    p.add_argument("--old-default", action="store_true")
    p.add_argument("--data-dir", default=str(SHARED))
    p.add_argument("--n", type=int, default=None,
                   help="an augmented archive of this many images (bench_scale.py's) instead of the 8,236 real ones")
    p.add_argument("--tta", action="store_true", help="the default model with flip test-time augmentation")
    a = p.parse_args()
    url, server = fresh_database()
    try:
        with db.connect(url, autocommit=True) as conn:
            if a.n:
                from bench_scale import make_archive

                for e, v in make_archive(Path(a.data_dir), a.n).values():
                    ingest.ingest_verified(conn, e, v, show_progress=False)
            else:
                for f in PRESENT:
                    ingest.ingest(conn, f, data_dir=a.data_dir, accept_unofficial=True, allow_download=False,
                                  show_progress=False)
            # the network without flip TTA by default: the README's earlier rows were measured
            # with it, and TTA doubles the forward pass (--tta: today's default model)
            mid = register_model(conn, tta_flip=a.tta)
            total = conn.execute("SELECT count(*) FROM medsim.images").fetchone()[0]
        cores = os.cpu_count()
        print(f"{machine()}; {total:,} images; wall from the first start to the last exit, median of {a.repeat}")
        rows = [(n, []) for n in map(int, a.workers.split(","))]
        if a.old_default:
            rows += [(n, ["--threads", str(cores)]) for n in map(int, a.workers.split(","))]
        rows += [(1, ["--threads", "1"]), (1, ["--prefetch"]), (1, ["--prefetch", "--threads", "1"])]
        for n, extra in rows:
            walls = []
            for _ in range(a.repeat):
                wall, done = drain(url, mid, n, extra)
                walls.append(wall)
            label = " ".join(extra) or "default threads"
            print(f"{n} worker(s), {label:28s}: {statistics.median(walls):6.2f} s wall "
                  f"({', '.join(f'{w:.2f}' for w in walls)}); {done} embedded", flush=True)
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
