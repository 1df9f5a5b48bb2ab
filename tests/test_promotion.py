"""Issue 35: a new model without downtime. A retrain registers a candidate, workers embed
the current model's backlog first and then the candidate's, searches keep the current
model until the promotion, which happens only with a complete gallery and its indexes
ready, in one transaction; a running service follows it without a restart."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from medsim import queue, registry
from medsim.errors import DataRefused, NotFound
from medsim.model import config, network
from medsim.search import faiss_index, pgvector_hnsw, promotion
from tests.helpers import run_worker


def candidate(conn, seed=7, **flags) -> int:
    torch.manual_seed(seed)
    net = network.EmbeddingNet(config.preset("default")).eval()
    mid = registry.register(conn, net, mode="label", datasets=["breastmnist", "retinamnist"],
                            train_config={"test": "candidate"}, candidate=True, **flags)
    queue.enqueue(conn, mid)
    return mid


def current_id(conn) -> int:
    return registry.get(conn, "current").id


def test_a_candidate_is_promoted_only_when_complete_and_rolled_back(embedded, db_url, tmp_path):
    conn, old = embedded
    faiss_index.build(conn, old, "flat", out_dir=tmp_path)
    new = candidate(conn)
    assert registry.candidates(conn) == [new] and current_id(conn) == old
    with pytest.raises(DataRefused, match=r"gallery is not complete: \d[\d,]* of \d[\d,]* images have no embedding"):
        promotion.promote(conn, new)
    assert current_id(conn) == old  # nothing changed
    r = run_worker(db_url, "--once")  # the current model has nothing due: the candidate's gallery
    assert r.returncode == 0, r.stderr
    assert promotion.missing(conn, new)[0] == 0 and current_id(conn) == old  # embedded, not promoted
    said = []
    p = promotion.promote(conn, None, say=said.append)  # the newest candidate
    assert (p.model_id, p.previous_id, p.missing) == (new, old, 0)
    assert current_id(conn) == new and not registry.get(conn, new).candidate
    assert pgvector_hnsw.exists(conn, new) and p.faiss_builds  # its indexes were ready before the switch
    assert faiss_index.load_build(conn, faiss_index.latest_build(conn, new, "flat"), model_ref=new)
    back = promotion.rollback(conn)
    assert (back.model_id, back.previous_id, back.kind) == (old, new, "rollback") and current_id(conn) == old
    with pytest.raises(NotFound, match="no candidate"):
        promotion.promote(conn)
    kinds = [r[0] for r in conn.execute("SELECT kind FROM medsim.model_promotions ORDER BY id")]
    assert kinds == ["promote", "rollback"]


def test_force_says_what_is_missing(embedded):
    conn, old = embedded
    new = candidate(conn)
    p = promotion.promote(conn, new, force=True, say=lambda *_: None)
    total = conn.execute("SELECT count(*) FROM medsim.images").fetchone()[0]
    assert p.missing == total and p.total == total and current_id(conn) == new


def test_training_registers_a_candidate_when_a_model_is_current(embedded, db_url, tmp_path):
    from medsim.training import train

    conn, old = embedded
    lines = []
    mid = train.train(conn, train.TrainConfig(epochs=1, steps_per_epoch=2), out_dir=tmp_path, progress=False,
                      log=lines.append)
    assert registry.get(conn, mid).candidate and current_id(conn) == old
    assert any("candidate" in line and f"medsim models promote {mid}" in line for line in lines)
    assert queue.pending_count(conn, mid) > 0  # queued for the workers at once


def test_the_worker_promotes_when_ready(embedded, db_url):
    conn, old = embedded
    new = candidate(conn, promote_when_ready=True)
    r = run_worker(db_url, "--once")
    assert r.returncode == 0 and f"promoted model {new}" in r.stdout, (r.stdout, r.stderr)
    assert current_id(conn) == new


def test_models_cli_lists_candidates_and_promotes(embedded, db_url):
    conn, old = embedded
    new = candidate(conn)
    cli = [sys.executable, "-m", "medsim", "--database-url", db_url, "models"]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert "candidate (0/" in out.stdout and "current (" in out.stdout, out.stdout
    r = subprocess.run(cli + ["promote", str(new)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not complete" in r.stderr and "--force" in r.stderr
    run_worker(db_url, "--once")
    r = subprocess.run(cli + ["promote"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"model {new} is now current (it replaced model {old})" in r.stdout, r.stderr


# ---------------------------------------------------------------- a running service

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live(embedded, db_url):
    import uvicorn

    from medsim.service.app import create_app
    from medsim.service.state import ServeConfig

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ServeConfig(auth=False, database_url=db_url)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(10)


def post(url: str, path: str, body: bytes, ctype: str):
    req = urllib.request.Request(url + path, data=body, headers={"content-type": ctype})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, json.loads(r.read())


def multipart(png: bytes) -> tuple[bytes, str]:
    b = "medsimboundary"
    body = (f"--{b}\r\ncontent-disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n"
            f"content-type: image/png\r\n\r\n").encode() + png + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def test_a_running_service_follows_a_promotion_without_a_failed_search(live, embedded, db_url):
    """The bench's loop on small data: searches by id and by upload at concurrency 4 while
    a candidate is embedded and promoted: none fails, each thread sees the old model, then
    the new one, never back."""
    conn, old = embedded
    ids = [r[0] for r in conn.execute("SELECT id FROM medsim.images ORDER BY id LIMIT 40")]
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(buf, format="PNG")
    upload = multipart(buf.getvalue())
    new = candidate(conn)
    stop, seen, errors = threading.Event(), {n: [] for n in range(4)}, []

    def loop(n):
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if (n + i) % 2:
                    status, body = post(live, "/search", json.dumps({"image_id": ids[i % len(ids)], "k": 4}).encode(),
                                        "application/json")
                else:
                    status, body = post(live, "/search/upload", *upload)
                seen[n].append(body["model"]["id"])
            except Exception as err:  # any failed search fails the test
                errors.append(repr(err))

    threads = [threading.Thread(target=loop, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    r = run_worker(db_url, "--once", "--promote-when-ready", timeout=300)
    assert r.returncode == 0 and f"promoted model {new}" in r.stdout, (r.stdout, r.stderr)
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    for n, models in seen.items():
        assert models and models[0] == old and models[-1] == new, (n, models[:3], models[-3:])
        switch = models.index(new)
        assert set(models[:switch]) == {old} and set(models[switch:]) == {new}, n  # never back, never mixed
