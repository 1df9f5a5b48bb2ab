"""A new model without downtime (issue 35), measured: a search loop over HTTP (by stored id
and by upload, concurrency 4) against `medsim serve` while a second model is trained,
embedded and promoted, on a database of at least 100,000 images. Prints failed searches,
which model answered before and after the promotion, and the loop's latency percentiles
beside an idle run of the same loop. Not a test: it prints figures.

    .venv/bin/python bench/bench_promote.py                       # 100,000 images, about 15 min on 2 cores
    .venv/bin/python bench/bench_promote.py --n 20000 --epochs 1  # a quick look

The archive is bench_scale's: real MedMNIST pixels (breast, pneumonia, retina), each copy
flipped, shifted, rescaled and jittered, so every image is distinct and keeps its label.
Model 1 (the default network, 1 epoch) is current and embedded before the loop starts.
During the loop: `medsim train --epochs E` (a candidate), then `medsim worker --once
--promote-when-ready`, each the command a user runs, in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_scale import make_archive  # noqa: E402
from bench_serve import start_server  # noqa: E402
from common import SHARED, fresh_database, machine  # noqa: E402

NICE = 19


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def requests_for(ids: list[int], png: bytes) -> list[tuple[str, bytes, str]]:
    b = "benchboundary"
    upload = (f"--{b}\r\ncontent-disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n"
              f"content-type: image/png\r\n\r\n").encode() + png + f"\r\n--{b}--\r\n".encode()
    out = []
    for i, image_id in enumerate(ids):
        if i % 2:
            out.append(("/search/upload", upload, f"multipart/form-data; boundary={b}"))
        else:
            out.append(("/search", json.dumps({"image_id": image_id, "k": 10}).encode(), "application/json"))
    return out


async def client(port: int, reqs: list, stop: asyncio.Event, rows: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    try:
        while not stop.is_set():
            path, body, ctype = reqs[i % len(reqs)]
            i += 1
            head = (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: {ctype}\r\n"
                    f"content-length: {len(body)}\r\n\r\n").encode()
            t0 = time.perf_counter()
            try:
                writer.write(head + body)
                await writer.drain()
                h = await reader.readuntil(b"\r\n\r\n")
                status = int(h.split(b" ", 2)[1])
                length = next(int(x.split(b":")[1]) for x in h.split(b"\r\n") if x.lower().startswith(b"content-length:"))
                data = await reader.readexactly(length)
                model = json.loads(data)["model"]["id"] if status == 200 else None
            except Exception as err:  # a dropped connection is a failed search too
                status, model = repr(err), None
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            rows.append((time.time(), time.perf_counter() - t0, status, model))
    finally:
        writer.close()


async def loop(port: int, reqs: list, concurrency: int, seconds: float | None, until=None) -> list:
    """Run the loop for `seconds`, or until the coroutine `until` returns."""
    stop, rows = asyncio.Event(), []
    tasks = [asyncio.create_task(client(port, reqs[c::concurrency], stop, rows)) for c in range(concurrency)]
    if until is not None:
        await until
    else:
        await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    return rows


async def run_commands(cmds: list[list[str]], env: dict) -> list[tuple[float, float]]:
    spans = []
    for cmd in cmds:
        t0 = time.time()
        # at the lowest CPU priority, as a hospital runs a retrain beside a live service on
        # one machine (nice 19): searches come first; --no-nice measures it without
        p = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.PIPE,
                                                 preexec_fn=None if not NICE else lambda: os.nice(NICE))
        out, err = await p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.decode()[-2000:]}")
        log(f"{' '.join(cmd[2:])}: {time.time() - t0:.0f}s; {out.decode().strip().splitlines()[-1:]}")
        spans.append((t0, time.time()))
    return spans


def summary(rows: list) -> dict:
    lat = np.array([r[1] for r in rows]) * 1000
    return {"n": len(rows), "failed": sum(1 for r in rows if r[2] != 200),
            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="images in the archive (default 100,000)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the second model's training (default 3)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--idle-seconds", type=float, default=60.0, help="the idle run's length (default 60)")
    ap.add_argument("--data-dir", type=Path, default=SHARED)
    ap.add_argument("--no-nice", action="store_true", help="run the training and the worker at normal priority")
    a = ap.parse_args()
    global NICE
    NICE = 0 if a.no_nice else NICE
    from medsim import db
    from medsim.sources import ingest

    log(f"machine: {machine()}")
    url, server = fresh_database("promote")
    env = {**os.environ, "DATABASE_URL": url, "PYTHONUNBUFFERED": "1"}
    med = [sys.executable, "-m", "medsim"]
    archive = make_archive(a.data_dir, a.n)
    with db.connect(url, autocommit=True) as conn:
        for e, v in archive.values():
            ingest.ingest_verified(conn, e, v, show_progress=False)
        n = conn.execute("SELECT count(*) FROM medsim.images").fetchone()[0]
    log(f"{n:,} images ingested")
    t0 = time.time()
    out = Path(tempfile.mkdtemp(prefix="medsim-bench-promote-"))
    med_out = ["--out-dir", str(out)]
    subprocess.run(med + ["train", "--epochs", "1", "--quiet", *med_out], env=env, check=True, capture_output=True)
    subprocess.run(med + ["worker", "--once", "--quiet"], env=env, check=True, capture_output=True)
    log(f"model 1 trained and embedded in {time.time() - t0:.0f}s")
    with db.connect(url, autocommit=True) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM medsim.images ORDER BY random() LIMIT 2000")]
        h, w, raw = conn.execute("SELECT height, width, pixels FROM medsim.images WHERE id = %s", (ids[1],)).fetchone()
    buf = io.BytesIO()
    Image.fromarray(np.frombuffer(raw, np.uint8).reshape(h, w)).save(buf, format="PNG")
    reqs = requests_for(ids, buf.getvalue())

    serve, port = start_server(url, auth=False)
    try:
        idle = asyncio.run(loop(port, reqs, a.concurrency, a.idle_seconds))
        log(f"idle: {summary(idle)}")
        cmds = [med + ["train", "--epochs", str(a.epochs), "--quiet", *med_out],
                med + ["worker", "--once", "--quiet", "--promote-when-ready"]]

        async def during():
            box = {}

            async def commands():
                box["spans"] = await run_commands(cmds, env)

            rows = await loop(port, reqs, a.concurrency, None, until=commands())
            return rows, box["spans"]

        busy, spans = asyncio.run(during())
    finally:
        serve.terminate()
        serve.wait(30)
    with db.connect(url, autocommit=True) as conn:
        promoted_at = conn.execute("SELECT extract(epoch FROM at) FROM medsim.model_promotions "
                                   "ORDER BY id DESC LIMIT 1").fetchone()[0]
    before = {r[3] for r in busy if r[0] < float(promoted_at) and r[2] == 200}
    after = {r[3] for r in busy if r[0] > float(promoted_at) + 1 and r[2] == 200}
    s_idle, s_busy = summary(idle), summary(busy)
    print(f"\n{n:,} images, concurrency {a.concurrency}, k = 10, by id and by upload alternately; "
          f"train {spans[0][1] - spans[0][0]:.0f} s, embed + promote {spans[1][1] - spans[1][0]:.0f} s"
          f"{'' if not NICE else f', both at nice {NICE}'}")
    print("| loop | searches | failed | p50 ms | p99 ms | models answering |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| idle | {s_idle['n']:,} | {s_idle['failed']} | {s_idle['p50']:.1f} | {s_idle['p99']:.1f} | 1 |")
    print(f"| during train, embed, promote | {s_busy['n']:,} | {s_busy['failed']} | {s_busy['p50']:.1f} | "
          f"{s_busy['p99']:.1f} | before the promotion: {sorted(before)}; after: {sorted(after)} |")
    print(f"p99 during / idle: {s_busy['p99'] / s_idle['p99']:.2f}x")
    server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
