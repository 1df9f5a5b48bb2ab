"""Side-by-side recall table on real embeddings: FAISS flat/hnsw/ivfflat/ivfpq/seed and
pgvector HNSW (ef_search sweep) against pgvector exact search.

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

from medsim import db, index, ingest, recall, registry, train  # noqa: E402
from medsim.embed_worker import Worker, WorkerConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--database-url", default=None)
    p.add_argument("--out-dir", default="bench/out")
    p.add_argument("--seed-model", action="store_true",
                   help="also train the notebook's network (seed preset, 16-d, dataset mode) and "
                        "report the indexes over its embeddings, where the seed IVFPQ belongs")
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
        builds = [index.build(conn, mid, kind, out_dir=a.out_dir) for kind in index.KINDS]
        r = recall.report(conn, builds)
    print(recall.format_table(r))
    Path(a.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(a.out_dir) / "recall.json").write_text(json.dumps(r, indent=2))
    if a.seed_model:
        with db.connect(url, autocommit=True) as conn:
            tcfg = train.TrainConfig(preset="seed", mode="dataset", epochs=4, pairs_per_epoch=4000, patience=2)
            sid = train.train(conn, tcfg, out_dir=a.out_dir, progress=False, log=lambda *x: None)
            Worker(WorkerConfig(model=str(sid), once=True, database_url=url, progress=False)).run()
            builds = [index.build(conn, sid, kind, out_dir=a.out_dir) for kind in ("flat", "ivfflat", "seed")]
            r2 = recall.report(conn, builds, ef_searches=(40,))
        print("\nseed preset model (the notebook's 16-d network):")
        print(recall.format_table(r2))
        (Path(a.out_dir) / "recall_seed_model.json").write_text(json.dumps(r2, indent=2))
    if server is not None:
        server.cleanup()


if __name__ == "__main__":
    main()
