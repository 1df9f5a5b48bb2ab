"""Load benchmark for `medsim serve`: requests/s and latency percentiles at several
concurrencies, for search by stored id and search by uploaded image, beside the CLI's
per-search time. Not a test: it prints figures, it asserts nothing about speed.

Runs against the database the demo filled (the embedded one under MEDSIM_HOME, or
DATABASE_URL); start nothing yourself:

    .venv/bin/python bench/bench_serve.py                 # 3,000 requests per cell
    .venv/bin/python bench/bench_serve.py --requests 500 --concurrency 1,4
    .venv/bin/python bench/bench_serve.py --auth both --kinds id   # issue 21: the price of access control

--auth on: a bench user granted each dataset by name (so row-level security checks every
row, not the every-dataset shortcut), a token on every request, an access-log row per
search. --auth off: the same build with --no-auth. both (the default): off, then on.

The client is a minimal keep-alive HTTP/1.1 client on asyncio (one connection per
concurrent user), so that on a 2-core machine it takes as little CPU from the server as
possible; the server's resident memory is sampled through the run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import numpy as np
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_connection(port: int, requests: list[bytes], lat: list, errors: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for req in requests:
            t0 = time.perf_counter()
            writer.write(req)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


def run_cell(port: int, requests: list[bytes], concurrency: int, pid: int) -> dict:
    lat, errors, rss = [], [], []
    proc = psutil.Process(pid)

    async def main():
        per = [requests[i::concurrency] for i in range(concurrency)]
        stop = asyncio.Event()

        async def sample():
            while not stop.is_set():
                rss.append(proc.memory_info().rss)
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(one_connection(port, p, lat, errors) for p in per))
        stop.set()
        await sampler

    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {"n": len(lat), "rps": len(lat) / wall, "p50": float(np.percentile(ms, 50)),
            "p95": float(np.percentile(ms, 95)), "p99": float(np.percentile(ms, 99)), "errors": len(errors),
            "rss_start_mb": rss[0] / 2**20 if rss else 0, "rss_end_mb": rss[-1] / 2**20 if rss else 0,
            "rss_max_mb": max(rss) / 2**20 if rss else 0}


def json_request(body: dict, auth: bytes = b"") -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /search HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n" + auth +
            b"Content-Length: %d\r\n\r\n" % len(data)) + data


def bench_token(url: str) -> str:
    """A token of the bench user, granted every dataset by name; made (once) if missing."""
    from medsim import access, db

    with db.connect(url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM medsim.users WHERE name = 'bench'").fetchone():
            access.add_user(conn, "bench")
        access.grant(conn, "bench", [r[0] for r in conn.execute("SELECT flag FROM medsim.datasets")])
        return access.create_token(conn, "bench", "search", access.parse_expiry("2h"))[0]


def burn() -> None:  # a competing CPU load: one busy process
    while True:
        pass


def start_server(url: str, auth: bool, extra=()) -> tuple[subprocess.Popen, int]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "medsim.cli", "serve", "--port", str(port), *extra]
                              + ([] if auth else ["--no-auth"]),
                              env={**os.environ, "DATABASE_URL": url}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return server, port
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.terminate()
                sys.exit("medsim serve did not start")
            time.sleep(0.3)


def upload_request(png: bytes, k: int, path: bytes = b"/search/upload", auth: bytes = b"") -> bytes:
    b = b"medsimbenchboundary"
    data = (b"--" + b + b'\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--" + b +
            b'\r\nContent-Disposition: form-data; name="k"\r\n\r\n' + str(k).encode() + b"\r\n--" + b + b"--\r\n")
    return (b"POST " + path + b" HTTP/1.1\r\nHost: bench\r\nContent-Type: multipart/form-data; boundary=" + b +
            b"\r\n" + auth + b"Content-Length: %d\r\n\r\n" % len(data)) + data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000, help="requests per (kind, concurrency) cell")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--kinds", default="id,upload")
    ap.add_argument("--load", type=int, default=0,
                    help="also run every cell with this many busy processes competing for the CPU")
    ap.add_argument("--threads", type=int, default=None, help="medsim serve --threads (default: its own)")
    ap.add_argument("--runtime", choices=("onnx", "torch"), default=None,
                    help="medsim serve --runtime (default: its own)")
    ap.add_argument("--auth", choices=("off", "on", "both"), default="both",
                    help="serve with --no-auth, with tokens + row-level security + the access log, or both in turn")
    args = ap.parse_args()

    from PIL import Image

    from medsim import db

    url = db.database_url()
    with db.connect(url) as conn:
        test = conn.execute("SELECT id, pixels, height, width FROM medsim.images WHERE split = 'test' "
                            "ORDER BY id").fetchall()
        n_gallery = conn.execute("SELECT count(*) FROM medsim.gallery g JOIN medsim.models m "
                                 "ON m.id = g.model_id AND m.is_current").fetchone()[0]
    if not test or not n_gallery:
        sys.exit("no test images or no embedded gallery: run `make demo` first")
    rng = np.random.default_rng(0)
    ids = [r[0] for r in test]
    pngs = []
    for r in [test[i] for i in rng.choice(len(test), min(200, len(test)), replace=False)]:
        buf = io.BytesIO()
        Image.fromarray(np.frombuffer(r[1], np.uint8).reshape(r[2], r[3], -1).squeeze()).save(buf, format="PNG")
        pngs.append(buf.getvalue())

    # the CLI baseline: one process per search, as a user runs it
    cli = []
    for i in ids[:5]:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "medsim.cli", "search", "--image-id", str(i), "-k", str(args.k)],
                       check=True, capture_output=True, env={**os.environ, "DATABASE_URL": url})
        cli.append(time.perf_counter() - t0)

    print(f"gallery {n_gallery} images, {len(ids)} test queries; k={args.k}; {os.cpu_count()} cores; "
          f"server and client on this machine")
    print(f"CLI baseline `medsim search --image-id` (a process per search, median of 5): "
          f"{statistics.median(cli) * 1000:.0f} ms per search")
    print(f"{'auth':4s} {'kind':7s} {'conc':>4s} {'requests':>8s} {'req/s':>8s} {'p50 ms':>7s} {'p95 ms':>7s} "
          f"{'p99 ms':>7s} {'errors':>6s}  server RSS MB (start -> end, max)")
    for auth in (("off", "on") if args.auth == "both" else (args.auth,)):
        header = b"Authorization: Bearer " + bench_token(url).encode() + b"\r\n" if auth == "on" else b""
        extra = ([] if args.threads is None else ["--threads", str(args.threads)]) + (
            [] if args.runtime is None else ["--runtime", args.runtime])
        server, port = start_server(url, auth == "on", extra)
        try:
            # uploads go to POST /search/upload (before issue 19: POST /search); the bench runs against both
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json", timeout=5) as resp:
                upload_path = b"/search/upload" if "/search/upload" in json.load(resp)["paths"] else b"/search"
            for kind in args.kinds.split(","):
                for c in [int(x) for x in args.concurrency.split(",")]:
                    if kind == "id":
                        reqs = [json_request({"image_id": int(ids[j % len(ids)]), "k": args.k}, header)
                                for j in rng.permutation(args.requests)]
                    else:
                        reqs = [upload_request(pngs[j % len(pngs)], args.k, upload_path, header)
                                for j in range(args.requests)]
                    # warm-up (connections, caches), not counted
                    run_cell(port, reqs[: min(100, len(reqs))], c, server.pid)
                    for load in sorted({0, args.load}):
                        burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(load)]
                        for b in burners:
                            b.start()
                        try:
                            r = run_cell(port, reqs, c, server.pid)
                        finally:
                            for b in burners:
                                b.terminate()
                        label = kind if not load else f"{kind}+{load}busy"
                        print(f"{auth:4s} {label:7s} {c:4d} {r['n']:8d} {r['rps']:8.0f} {r['p50']:7.1f} "
                              f"{r['p95']:7.1f} {r['p99']:7.1f} {r['errors']:6d}  {r['rss_start_mb']:.0f} -> "
                              f"{r['rss_end_mb']:.0f}, {r['rss_max_mb']:.0f}", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
