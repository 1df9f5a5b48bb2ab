import signal
import threading
import time

import numpy as np
import psycopg
import pytest

from medsim import db, queue, registry
from medsim.images import from_bytes, model_input
from medsim.model import network
from medsim.queries import Q
from medsim.search import pgvector_hnsw
from medsim.worker import Worker, WorkerConfig
from medsim.worker.batch import run_batch
from tests.helpers import ingest_synth, register_model, run_worker, start_worker

N = 780 + 1600  # synthetic breast + retina


def n_embedded(conn, mid):
    return conn.execute("SELECT count(*) FROM medsim.embeddings WHERE model_id = %s", (mid,)).fetchone()[0]


def wait_until(pred, timeout=60.0, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return False


@pytest.fixture
def ready(conn, synth_dir):
    ingest_synth(conn, synth_dir)
    mid = register_model(conn)
    return conn, mid


def test_embeddings_match_the_model_and_status_view(ready, db_url):
    conn, mid = ready
    status = conn.execute("SELECT sum(pending), sum(embedded) FROM medsim.embedding_status "
                          "WHERE model_id = %s", (mid,)).fetchone()
    assert status == (N, 0)
    summary = Worker(WorkerConfig(once=True, database_url=db_url, progress=False)).run()
    assert summary.embedded == N and summary.failed == 0
    rows = conn.execute("SELECT i.id, i.pixels, i.height, i.width, i.channels, e.embedding "
                        "FROM medsim.embeddings e JOIN medsim.images i ON i.id = e.image_id "
                        "WHERE e.model_id = %s ORDER BY i.id LIMIT 20", (mid,)).fetchall()
    net = registry.get(conn, mid).load(conn)
    expect = network.embed(net, np.stack([model_input(from_bytes(bytes(r[1]), r[2], r[3], r[4]), 28) for r in rows]))
    got = np.stack([r[5].to_numpy() for r in rows])
    assert np.allclose(got, expect, atol=1e-5)
    per_ds = conn.execute("SELECT dataset, total, embedded, pending, failed FROM medsim.embedding_status "
                          "WHERE model_id = %s ORDER BY dataset", (mid,)).fetchall()
    assert per_ds == [("breastmnist", 780, 780, 0, 0), ("retinamnist", 1600, 1600, 0, 0)]
    assert pgvector_hnsw.exists(conn, mid)  # built once drained


def test_four_workers_embed_every_image_exactly_once(ready, db_url):
    conn, mid = ready
    procs = [start_worker(db_url, "--once", "--batch-size", "32", "--no-index") for _ in range(4)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [o[1][-2000:] for o in outs]
    per_worker = [int(o[0].split("embedded ")[1].split(",")[0]) for o in outs]
    assert sum(per_worker) == N
    assert sum(1 for n in per_worker if n > 0) >= 2  # they really shared the work
    dup = conn.execute("SELECT image_id FROM medsim.embeddings WHERE model_id = %s "
                       "GROUP BY image_id HAVING count(*) > 1", (mid,)).fetchall()
    missing = conn.execute("SELECT count(*) FROM medsim.images i WHERE NOT EXISTS (SELECT 1 FROM "
                           "medsim.embeddings e WHERE e.model_id = %s AND e.image_id = i.id)", (mid,)).fetchone()[0]
    assert dup == [] and missing == 0 and n_embedded(conn, mid) == N
    assert conn.execute("SELECT count(*) FROM medsim.embedding_queue").fetchone()[0] == 0


def test_enqueue_racing_a_batch_does_not_requeue_its_images(ready, db_url):
    """Regression (CI, 4 workers): a worker's enqueue ran while another worker's batch had
    deleted its queue rows but not committed; once it committed, the enqueue re-inserted
    them and the next COPY failed on the primary key. Now the enqueue waits for the batch."""
    conn, mid = ready
    batch = 32
    w = Worker(WorkerConfig(once=True, batch_size=batch, throttle_s=1.0, database_url=db_url,
                            progress=False, build_index=False))
    w.connect()
    w.load_model()
    in_batch = threading.Thread(target=run_batch, args=(w.conns[0], w.job))  # one batch
    in_batch.start()
    pid = w.conns[0].info.backend_pid
    # the batch has written and dequeued, and sleeps before its commit
    assert wait_until(lambda: conn.execute(
        "SELECT state = 'idle in transaction' AND query LIKE 'DELETE FROM medsim.embedding_queue%%' "
        "FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0], timeout=30)
    other = db.connect(db_url, autocommit=True)
    added = []
    racer = threading.Thread(target=lambda: added.append(queue.enqueue(other, mid)))
    racer.start()
    in_batch.join(timeout=60)
    racer.join(timeout=60)
    other.close()
    w.close()
    assert added == [0]
    requeued = conn.execute("SELECT count(*) FROM medsim.embedding_queue q JOIN medsim.embeddings e "
                            "USING (model_id, image_id)").fetchone()[0]
    assert requeued == 0 and n_embedded(conn, mid) == batch
    pending = conn.execute(Q.pending_count, {"model_id": mid}).fetchone()[0]
    assert pending == N - batch


def test_queue_rows_already_embedded_are_dropped_not_fatal(ready, db_url):
    conn, mid = ready
    assert run_worker(db_url, "--once", "--no-index").returncode == 0
    # a stale row, as a user (or an older medsim) might add by hand
    conn.execute("INSERT INTO medsim.embedding_queue (model_id, image_id) "
                 "SELECT %s, id FROM medsim.images ORDER BY id LIMIT 3", (mid,))
    summary = Worker(WorkerConfig(once=True, database_url=db_url, progress=False, build_index=False)).run()
    assert summary.embedded == 0 and summary.failed == 0
    assert n_embedded(conn, mid) == N
    assert conn.execute("SELECT count(*) FROM medsim.embedding_queue").fetchone()[0] == 0


def test_sigkill_mid_batch_leaves_no_partial_rows(ready, db_url):
    conn, mid = ready
    p = start_worker(db_url, "--once", "--batch-size", "100", "--throttle", "0.3", "--no-index")
    assert wait_until(lambda: n_embedded(conn, mid) >= 200)
    time.sleep(0.15)  # land inside a batch (claimed, written, not committed)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=10)
    done = n_embedded(conn, mid)
    assert 0 < done < N and done % 100 == 0  # whole batches only
    queued = conn.execute("SELECT count(*) FROM medsim.embedding_queue WHERE model_id = %s", (mid,)).fetchone()[0]
    assert done + queued == N  # the killed batch is back to claimable
    r = run_worker(db_url, "--once")
    assert r.returncode == 0, r.stderr
    assert n_embedded(conn, mid) == N


def test_sigterm_finishes_the_batch_and_exits_zero(ready, db_url):
    conn, mid = ready
    p = start_worker(db_url, "--batch-size", "100", "--throttle", "0.3", "--no-index")
    assert wait_until(lambda: n_embedded(conn, mid) >= 100)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    done = n_embedded(conn, mid)
    assert done % 100 == 0 and done < N
    assert f"embedded {done}," in out


def test_poisoned_image_fails_alone(ready, db_url):
    conn, mid = ready
    good = conn.execute("SELECT dataset_id FROM medsim.images LIMIT 1").fetchone()[0]
    bad_ids = [conn.execute(
        "INSERT INTO medsim.images (dataset_id, split, split_index, labels, height, width, channels, "
        "pixels, sha256) VALUES (%s, 'test', %s, '{0}', 28, 28, %s, %s, '\\x00') RETURNING id",
        (good, 10_000 + k, ch, px)).fetchone()[0]
        for k, (ch, px) in enumerate([(1, b"\x00" * 100), (2, b"\x00" * 28 * 28 * 2)])]
    conn.commit()
    for attempt in range(1, 4):
        r = run_worker(db_url, "--once", "--max-attempts", "3")
        assert r.returncode == 0, r.stderr
        attempts = conn.execute("SELECT array_agg(attempts) FROM medsim.embedding_queue").fetchone()[0]
        assert attempts == [attempt, attempt]
        # retries are due immediately in this test
        conn.execute("UPDATE medsim.embedding_queue SET retry_after = now()")
        conn.commit()
    assert n_embedded(conn, mid) == N
    rows = conn.execute("SELECT image_id, attempts, last_error, failed_at IS NOT NULL FROM "
                        "medsim.embedding_queue ORDER BY image_id").fetchall()
    assert [r[0] for r in rows] == bad_ids
    assert all(r[1] == 3 and r[3] for r in rows)
    assert "bytes, expected 28x28x1" in rows[0][2] and "unsupported channel count 2" in rows[1][2]
    failed = conn.execute("SELECT sum(failed), sum(pending) FROM medsim.embedding_status WHERE model_id = %s",
                          (mid,)).fetchone()
    assert failed == (2, 0)


def test_second_model_does_not_touch_the_first(ready, db_url):
    conn, mid = ready
    assert run_worker(db_url, "--once").returncode == 0
    before = conn.execute("SELECT image_id, embedding::text FROM medsim.embeddings WHERE model_id = %s "
                          "ORDER BY image_id", (mid,)).fetchall()
    mid2 = register_model(conn, seed=1, embedding_dim=32)  # switching makes everything pending
    status = conn.execute("SELECT sum(pending) FROM medsim.embedding_status WHERE model_id = %s",
                          (mid2,)).fetchone()[0]
    assert status == N
    assert run_worker(db_url, "--once").returncode == 0
    assert n_embedded(conn, mid2) == N
    assert conn.execute("SELECT DISTINCT vector_dims(embedding) FROM medsim.embeddings WHERE model_id = %s",
                        (mid2,)).fetchall() == [(32,)]
    after = conn.execute("SELECT image_id, embedding::text FROM medsim.embeddings WHERE model_id = %s "
                         "ORDER BY image_id", (mid,)).fetchall()
    assert after == before
    registry.set_current(conn, mid)  # switching back: nothing to do
    assert conn.execute("SELECT sum(pending) FROM medsim.embedding_status WHERE model_id = %s",
                        (mid,)).fetchone()[0] == 0


def test_dimension_is_enforced(ready):
    conn, mid = ready
    image_id = conn.execute("SELECT min(id) FROM medsim.images").fetchone()[0]
    with pytest.raises(psycopg.errors.CheckViolation, match="has 3 dimensions, the model has 64"):
        conn.execute("INSERT INTO medsim.embeddings (model_id, image_id, embedding) VALUES (%s, %s, '[1,2,3]')",
                     (mid, image_id))
    conn.rollback()


def test_hnsw_index_is_used(ready, db_url):
    conn, mid = ready
    assert run_worker(db_url, "--once").returncode == 0
    q = np.ones(64, np.float32) / 8
    plan = "\n".join(r[0] for r in conn.execute(
        "EXPLAIN SELECT image_id FROM medsim.embeddings WHERE model_id = %s "
        "ORDER BY embedding::vector(64) <-> %s::vector(64) LIMIT 5", (mid, q)).fetchall())
    assert pgvector_hnsw.index_name(mid) in plan


def test_pgindex_rebuild_changes_build_parameters(ready, db_url):
    from medsim import cli

    conn, mid = ready
    assert run_worker(db_url, "--once").returncode == 0

    def options():
        return conn.execute("SELECT reloptions FROM pg_class WHERE oid = to_regclass(%s)",
                            (f"medsim.{pgvector_hnsw.index_name(mid)}",)).fetchone()[0]

    assert options() == ["m=16", f"ef_construction={pgvector_hnsw.DEFAULT_EF_CONSTRUCTION}"]
    assert cli.main(["--database-url", db_url, "pgindex", "--ef-construction", "40"]) == 0
    assert options() == ["m=16", f"ef_construction={pgvector_hnsw.DEFAULT_EF_CONSTRUCTION}"]  # kept without --rebuild
    assert cli.main(["--database-url", db_url, "pgindex", "--m", "8", "--ef-construction", "40",
                     "--rebuild"]) == 0
    assert options() == ["m=8", "ef_construction=40"]
    ids = conn.execute("SELECT image_id FROM medsim.embeddings WHERE model_id = %s "
                       "ORDER BY embedding::vector(64) <-> %s::vector(64) LIMIT 3",
                       (mid, np.ones(64, np.float32) / 8)).fetchall()
    assert len(ids) == 3


def test_waiting_worker_picks_up_new_images(conn, synth_dir, db_url):
    ingest_synth(conn, synth_dir, flags=("breastmnist",))
    mid = register_model(conn)
    p = start_worker(db_url, "--poll-interval", "30", "--no-index")
    try:
        assert wait_until(lambda: n_embedded(conn, mid) == 780)
        ingest_synth(conn, synth_dir, flags=("retinamnist",))  # the insert trigger NOTIFYs; the worker queues them
        assert wait_until(lambda: n_embedded(conn, mid) == N, timeout=20)  # well before the poll
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)
    assert p.returncode == 0


def test_database_stopped_mid_run(private_server, synth_dir):
    url, stop = private_server
    with db.connect(url) as conn:
        ingest_synth(conn, synth_dir)
        mid = register_model(conn)
    p = start_worker(url, "--once", "--batch-size", "100", "--throttle", "0.3", "--db-retries", "1",
                     "--no-index")
    with db.connect(url) as conn:
        assert wait_until(lambda: n_embedded(conn, mid) >= 100)
    stop()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert "database unavailable after 2 attempts" in err
    stop.restart()
    with db.connect(url) as conn:
        partial = n_embedded(conn, mid)
        assert partial % 100 == 0
        r = run_worker(url, "--once")
        assert r.returncode == 0, r.stderr
        assert n_embedded(conn, mid) == N


def test_worker_without_a_model(conn, synth_dir, db_url):
    ingest_synth(conn, synth_dir, flags=("breastmnist",))
    r = run_worker(db_url, "--once")
    assert r.returncode == 2 and "no current model" in r.stderr
    p = start_worker(db_url, "--poll-interval", "0.2")  # long-running: waits for a model
    time.sleep(3)
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "model none: embedded 0" in out


def test_worker_refuses_bad_arguments_and_touches_nothing(ready, db_url, capsys):
    from medsim import embed_worker

    conn, mid = ready
    for args, message in [(("--batch-size", "0"), "batch_size must be at least 1"),
                          (("--poll-interval", "-1"), "poll_interval must be positive")]:
        with pytest.raises(SystemExit) as exit_:  # argparse's error: usage line, exit 2
            embed_worker.main(["--database-url", db_url, "--once", *args])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert embed_worker.main(["--database-url", db_url, "--once", "--model", "abc"]) == 2
    assert "model 'abc': expected a model id" in capsys.readouterr().err
    assert n_embedded(conn, mid) == 0
    assert conn.execute(Q.pending_count, {"model_id": mid}).fetchone()[0] == N


def index_oid(conn, mid):
    return conn.execute("SELECT to_regclass(%s)::oid", (f"medsim.{pgvector_hnsw.index_name(mid)}",)).fetchone()[0]


def test_a_large_backlog_is_loaded_without_the_hnsw_index_a_trickle_with_it(ready, db_url, synth_dir, caplog):
    import logging

    from tests import synth

    conn, mid = ready
    Worker(WorkerConfig(once=True, database_url=db_url, progress=False)).run()
    first = index_oid(conn, mid)
    assert first is not None  # built after the first drain
    # a trickle (3 images, under the threshold): inserted through the existing index
    conn.execute("INSERT INTO medsim.images (dataset_id, split, split_index, labels, height, width, channels, "
                 "pixels, sha256) SELECT dataset_id, 'train', 100000 + id, labels, height, width, channels, "
                 "pixels, sha256(pixels || id::text::bytea) FROM medsim.images ORDER BY id LIMIT 3")
    with caplog.at_level(logging.INFO, logger="medsim.worker"):
        Worker(WorkerConfig(once=True, database_url=db_url, progress=False, bulk_threshold=1000)).run()
    assert index_oid(conn, mid) == first and "dropped HNSW" not in caplog.text
    # a backlog larger than a quarter of the model: the index goes, comes back after the drain
    big = synth_dir.parent / "more"
    big.mkdir(exist_ok=True)
    synth.write_npz(big, "pneumoniamnist", seed=3)
    ingest_synth(conn, big, flags=("pneumoniamnist",))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medsim.worker"):
        s = Worker(WorkerConfig(once=True, database_url=db_url, progress=False, bulk_threshold=1000)).run()
    assert "dropped HNSW index" in caplog.text and s.embedded == 5856
    again = index_oid(conn, mid)
    assert again is not None and again != first
    assert n_embedded(conn, mid) == N + 3 + 5856
    # and a search plan uses the rebuilt index
    gid = conn.execute("SELECT min(image_id) FROM medsim.gallery").fetchone()[0]
    assert len(conn.execute("SELECT * FROM medsim.similar_images(%s, 5)", (gid,)).fetchall()) == 5


def test_worker_threads_share_the_cores_among_workers_on_this_host(ready, db_url, monkeypatch):
    import torch

    from medsim.worker import loop, policy

    conn, mid = ready
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(policy, "available_cores", lambda: 8)
    try:
        w = Worker(WorkerConfig(once=True, database_url=db_url, progress=False))
        w.connect()
        assert w.threads.fit(w.conns[0], force=True) == 8  # alone on the host: every core
        others = [db.connect(db_url, application_name=loop.APP_NAME) for _ in range(3)]
        assert w.threads.fit(w.conns[0]) == 8  # re-counted at most every 30 s
        assert w.threads.fit(w.conns[0], force=True) == 2 and torch.get_num_threads() == 2  # four workers: 8 / 4
        for c in others:
            c.close()
        w.close()
        # an explicit setting wins
        w = Worker(WorkerConfig(once=True, database_url=db_url, progress=False, threads=3))
        w.connect()
        assert w.threads.fit(w.conns[0], force=True) == 3
        w.close()
        with pytest.raises(Exception, match="threads must be at least 1"):
            WorkerConfig(threads=0)
    finally:
        torch.set_num_threads(before)


def test_a_prefetching_worker_embeds_each_image_once_and_a_kill_loses_nothing(ready, db_url):
    """--prefetch (the GPU default): two batches in flight on two connections."""
    conn, mid = ready
    w = start_worker(db_url, "--once", "--batch-size", "64", "--no-index", "--prefetch", "--throttle", "0.3")
    assert wait_until(lambda: n_embedded(conn, mid) >= 128, timeout=60)
    w.kill()  # SIGKILL with two transactions open
    w.communicate(timeout=30)
    done = n_embedded(conn, mid)
    assert done % 64 == 0  # whole batches only
    r = run_worker(db_url, "--once", "--batch-size", "64", "--no-index", "--prefetch")
    assert r.returncode == 0, r.stderr
    assert n_embedded(conn, mid) == N
    assert conn.execute("SELECT count(*) FROM medsim.embedding_queue WHERE model_id = %s",
                        (mid,)).fetchone()[0] == 0
    dup = conn.execute("SELECT count(*) - count(DISTINCT image_id) FROM medsim.embeddings WHERE model_id = %s",
                       (mid,)).fetchone()[0]
    assert dup == 0
    # and with four of them at once
    conn.execute("DELETE FROM medsim.embeddings WHERE model_id = %s", (mid,))
    queue.enqueue(conn, mid)
    procs = [start_worker(db_url, "--once", "--batch-size", "32", "--no-index", "--prefetch") for _ in range(4)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [o[1][-2000:] for o in outs]
    assert sum(int(o[0].split("embedded ")[1].split(",")[0]) for o in outs) == N == n_embedded(conn, mid)


def test_medsim_worker_is_the_embedding_worker(ready, db_url, capsys):
    """`medsim worker` and `python -m medsim.embed_worker` are one command."""
    from medsim import cli

    conn, mid = ready
    assert cli.main(["worker", "--once", "--quiet", "--no-index", "--batch-size", "500"]) == 0
    assert f"medsim worker: model {mid}: embedded {N}, failed 0" in capsys.readouterr().out
    assert n_embedded(conn, mid) == N
    assert cli.main(["worker", "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == "medsim: error: batch_size must be at least 1, got 0\n"
