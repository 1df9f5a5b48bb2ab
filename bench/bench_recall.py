"""Side-by-side recall table on real embeddings: FAISS flat/hnsw/ivfflat/ivfpq/seed and
pgvector HNSW (ef_search sweep) against pgvector exact similar.

By default: a fresh database, the three present subsets, the default model trained in
label mode, the embedding worker, then `medsim recall --all-kinds`. With
--database-url it measures an existing database's current model instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRESENT, SHARED, fresh_database, machine  # noqa: E402

from medsim import db, registry  # noqa: E402
from medsim.queries import Q  # noqa: E402
from medsim.search import (
    faiss_index,  # noqa: E402
    pgvector_hnsw,  # noqa: E402
    recall,  # noqa: E402
)
from medsim.sources import ingest  # noqa: E402
from medsim.training import train  # noqa: E402
from medsim.worker import Worker, WorkerConfig  # noqa: E402

SWEEP = ((16, 64), (16, 128), (16, 200), (32, 200))  # (m, ef_construction); pgvector's default first


def hnsw_build_sweep(conn, model_id: int, dim: int, builds: int = 4, ef_search: int = 40) -> None:
    """HNSW graphs differ from build to build: build each (m, ef_construction) several
    times and print recall at one ef_search, so a default is chosen on its worst build,
    not on one lucky one. Leaves the index built with medsim's defaults."""
    import time

    import numpy as np

    splits = list(faiss_index.DEFAULT_SPLITS)
    xq = np.stack([r[1].to_numpy() for r in conn.execute(
        Q.query_vectors, {"model_id": model_id, "splits": ["test"]})]).astype(np.float32)
    batches = list(faiss_index.read_batches(conn, model_id, splits))
    gids, xb = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    D_gt, _, _, _ = recall.pgvector_search(conn, model_id, dim, xq, 100, splits, exact=True)
    print(f"pgvector HNSW build sweep: {builds} builds each, ef_search={ef_search}, {len(xq)} queries")
    for m, efc in SWEEP:
        secs, r10, r100, qps = [], [], [], []
        for _ in range(builds):
            t0 = time.perf_counter()
            pgvector_hnsw.ensure(conn, model_id, dim, m=m, ef_construction=efc, replace=True)
            secs.append(time.perf_counter() - t0)
            _, I, lat, used = recall.pgvector_search(conn, model_id, dim, xq, 100, splits, exact=False,
                                                     ef_search=ef_search)
            assert used, "the plan did not use the HNSW index"
            r10.append(recall.tie_aware_recall(xq, I, D_gt, gids, xb, 10))
            r100.append(recall.tie_aware_recall(xq, I, D_gt, gids, xb, 100))
            qps.append(len(xq) / lat.sum())
        mark = " (medsim default)" if (m, efc) == (pgvector_hnsw.DEFAULT_M, pgvector_hnsw.DEFAULT_EF_CONSTRUCTION) else ""
        print(f"SWEEP m={m} ef_construction={efc}{mark}: build {np.mean(secs):.2f}s, "
              f"R@10 min {min(r10):.4f} mean {np.mean(r10):.4f}, R@100 min {min(r100):.4f} "
              f"mean {np.mean(r100):.4f}, {np.mean(qps):,.0f} q/s")
    pgvector_hnsw.ensure(conn, model_id, dim, replace=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--database-url", default=None)
    p.add_argument("--out-dir", default="bench/out")
    p.add_argument("--seed-model", action="store_true",
                   help="also train the notebook's network (seed preset, 16-d, dataset mode) and "
                        "report the indexes over its embeddings, where the seed IVFPQ belongs")
    p.add_argument("--hnsw-sweep", action="store_true",
                   help="first compare pgvector HNSW build parameters over repeated builds")
    a = p.parse_args()
    server = None
    url = a.database_url
    if url is None:
        url, server = fresh_database()
    print(f"machine: {machine()}")
    with db.connect(url, autocommit=True) as conn:
        if server is not None:
            for flag in PRESENT:
                ingest.ingest(conn, flag, data_dir=SHARED, accept_unofficial=True, allow_download=False,
                              show_progress=False)
            train.train(conn, train.TrainConfig(), out_dir=a.out_dir, progress=False, log=lambda *x: None)
        mid = registry.get(conn).id
        Worker(WorkerConfig(model=str(mid), once=True, database_url=url, progress=False)).run()
        if a.hnsw_sweep:
            hnsw_build_sweep(conn, mid, registry.get(conn, mid).embedding_dim)
        builds = [faiss_index.build(conn, mid, kind, out_dir=a.out_dir) for kind in faiss_index.KINDS]
        r = recall.report(conn, builds)
    print(recall.format_table(r))
    Path(a.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(a.out_dir) / "recall.json").write_text(json.dumps(r, indent=2))
    if a.seed_model:
        with db.connect(url, autocommit=True) as conn:
            tcfg = train.TrainConfig(preset="seed", mode="dataset", epochs=4, pairs_per_epoch=4000, patience=2)
            sid = train.train(conn, tcfg, out_dir=a.out_dir, progress=False, log=lambda *x: None)
            Worker(WorkerConfig(model=str(sid), once=True, database_url=url, progress=False)).run()
            builds = [faiss_index.build(conn, sid, kind, out_dir=a.out_dir) for kind in ("flat", "ivfflat", "seed")]
            r2 = recall.report(conn, builds, ef_searches=(40,))
        print("\nseed preset model (the notebook's 16-d network):")
        print(recall.format_table(r2))
        (Path(a.out_dir) / "recall_seed_model.json").write_text(json.dumps(r2, indent=2))
    if server is not None:
        server.cleanup()


if __name__ == "__main__":
    main()
