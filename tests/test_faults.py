"""Fault injection: broken rows, hostile archives, corrupt and swapped index files, a reader
holding locks, killed workers, a database that goes away, bad queries. Every case asserts
what must stay true (exactly-once embeddings, no partial rows) and what the user is told
(exit code and one sentence). Real PostgreSQL, bounded time."""

from __future__ import annotations

import io
import json
import random
import signal
import threading
import time
import zipfile

import numpy as np
import psycopg
import pytest
from PIL import Image

from medsim import cli, db, queue
from medsim.errors import DataRefused, NotFound, StaleIndex
from medsim.model import network
from medsim.search import faiss_index
from medsim.sources import ingest, medmnist
from medsim.worker import Worker, WorkerConfig
from tests import synth
from tests.helpers import embed_all, ingest_synth, register_model, run_worker, search, start_worker

N = 780 + 1600


def n_embedded(conn, mid):
    return conn.execute("SELECT count(*) FROM medsim.embeddings WHERE model_id = %s", (mid,)).fetchone()[0]


def insert_broken(conn, rows) -> list[int]:
    """Rows the way a bad writer (or a disk) might leave them: (height, width, channels, bytes)."""
    ds = conn.execute("SELECT min(id) FROM medsim.datasets").fetchone()[0]
    return [conn.execute(
        "INSERT INTO medsim.images (dataset_id, split, split_index, labels, height, width, channels, pixels, "
        "sha256) VALUES (%s, 'train', %s, '{0}', %s, %s, %s, %s, '\\x00') RETURNING id",
        (ds, 50_000 + k, h, w, c, px)).fetchone()[0] for k, (h, w, c, px) in enumerate(rows)]


BROKEN = [(0, 0, 1, b""),                       # zero-sized: torch raised RuntimeError on it
          (28, 28, 1, b"\x00" * 100),           # truncated pixels
          (28, 28, 2, b"\x00" * 28 * 28 * 2),   # two channels
          (100_000, 100_000, 1, b"\x01" * 9),   # absurd declared size
          (28, 0, 3, b"")]                      # zero width


@pytest.fixture
def ready(conn, synth_dir):
    ingest_synth(conn, synth_dir)
    return conn, register_model(conn)


# ---------------------------------------------------------------- broken rows
def test_broken_rows_mid_queue_with_four_workers(ready, db_url):
    conn, mid = ready
    bad = insert_broken(conn, BROKEN)
    queue.enqueue(conn, mid)
    procs = [start_worker(db_url, "--once", "--batch-size", "64", "--max-attempts", "1", "--no-index")
             for _ in range(4)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [e for _, e in outs]
    assert n_embedded(conn, mid) == N  # every good image exactly once (the primary key says once)
    rows = conn.execute("SELECT image_id, attempts, last_error, failed_at IS NOT NULL FROM medsim.embedding_queue "
                        "WHERE model_id = %s ORDER BY image_id", (mid,)).fetchall()
    assert [r[0] for r in rows] == bad and all(r[1] == 1 and r[3] for r in rows)
    assert "empty image (0x0)" in rows[0][2] and "bytes, expected 28x28x1" in rows[1][2]
    assert "unsupported channel count 2" in rows[2][2] and "empty image (28x0)" in rows[4][2]
    # the summaries count failed images, once each, across the four workers
    failed = sum(int(out.split("failed ")[1].split(",")[0].split(" ")[0]) for out, _ in outs)
    assert failed == len(BROKEN)


def test_a_batch_that_fails_as_a_whole_is_bisected(ready, db_url, monkeypatch):
    """An image that decodes but makes the network itself fail (whatever the reason) takes
    down its whole forward pass; the worker splits the batch until that image stands alone."""
    conn, mid = ready
    [poison] = insert_broken(conn, [(28, 28, 1, b"\xff" * 28 * 28)])
    queue.enqueue(conn, mid)
    real = network.embed

    def fragile(net, images, **kw):
        if (np.asarray(images) == 255).all(axis=(1, 2, 3)).any():
            raise RuntimeError("simulated kernel failure on this input")
        return real(net, images, **kw)

    monkeypatch.setattr(network, "embed", fragile)  # torch's path: the worker is told to use it below
    s = Worker(WorkerConfig(once=True, database_url=db_url, progress=False, build_index=False,
                            max_attempts=1, batch_size=128, runtime="torch")).run()
    assert s.embedded == N and s.failed == 1
    error = conn.execute("SELECT last_error FROM medsim.embedding_queue WHERE image_id = %s", (poison,)).fetchone()[0]
    assert error == "cannot embed: RuntimeError: simulated kernel failure on this input"


def test_training_and_search_name_broken_rows_instead_of_stopping(ready, db_url, tmp_path, capsys):
    from medsim.training import train

    conn, mid = ready
    embed_all(db_url)
    bad = insert_broken(conn, BROKEN[:3])
    lines = []
    new = train.train(conn, train.TrainConfig(epochs=1, steps_per_epoch=6, val_pairs=100),
                      out_dir=tmp_path, progress=False, set_current=False, log=lines.append)
    assert "skipped 3 image(s) that cannot be used" in "\n".join(lines)
    cfg = conn.execute("SELECT train_config FROM medsim.models WHERE id = %s", (new,)).fetchone()[0]
    assert cfg["skipped_images"] == bad
    assert cli.main(["search", "--image-id", str(bad[1])]) == 2
    assert f"image {bad[1]} is stored broken" in capsys.readouterr().err


# ---------------------------------------------------------------- killed workers
def test_sigkill_and_sigterm_at_random_points_leave_exactly_once(ready, db_url):
    conn, mid = ready
    rng = random.Random(7)
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        before = n_embedded(conn, mid)
        p = start_worker(db_url, "--once", "--batch-size", "64", "--throttle", "0.05", "--no-index")
        deadline = time.monotonic() + 60
        while n_embedded(conn, mid) == before and time.monotonic() < deadline:  # batches are flowing
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere in claim, embed, COPY, the pause or commit
        p.send_signal(sig)
        p.communicate(timeout=60)
        assert p.returncode == (-9 if sig == signal.SIGKILL else 0)
        done = n_embedded(conn, mid)
        assert done % 64 == 0 or done == N  # whole batches only
    assert run_worker(db_url, "--once").returncode == 0
    assert n_embedded(conn, mid) == N
    assert conn.execute("SELECT count(*) FROM medsim.embedding_queue").fetchone() == (0,)


# ---------------------------------------------------------------- the database goes away
def test_database_stopped_under_ingest_leaves_nothing_half_written(private_server, synth_dir, monkeypatch):
    url, stop = private_server
    real = ingest.encode_copy_rows
    calls = []

    def stop_midway(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # after the first chunk went out
            stop()
        return real(*a, **k)

    monkeypatch.setattr(ingest, "encode_copy_rows", stop_midway)
    monkeypatch.setattr(ingest, "CHUNK_ROWS", 256)
    code = cli.main(["--database-url", url, "ingest", "retinamnist", "--data-dir", str(synth_dir),
                     "--accept-unofficial", "--quiet"])
    assert code == 2
    stop.restart()
    monkeypatch.setattr(ingest, "encode_copy_rows", real)
    with db.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM medsim.datasets").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM medsim.images").fetchone() == (0,)
    assert cli.main(["--database-url", url, "ingest", "retinamnist", "--data-dir", str(synth_dir),
                     "--accept-unofficial", "--quiet"]) == 0


def test_cli_says_the_database_went_away_in_one_sentence(capsys):
    assert cli.main(["--database-url", "postgresql://nobody@127.0.0.1:1/none", "status"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medsim: error: cannot connect to the database") and "Traceback" not in err


# ---------------------------------------------------------------- hostile archives
def npz_with(path, arrays: dict, extra: dict | None = None, compress=True):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for k, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, a)
            zf.writestr(k + ".npy", buf.getvalue())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)


def declared_only(shape, dtype="|u1") -> bytes:
    """A .npy member whose header declares `shape` but holds no data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.fixture
def opened(monkeypatch):
    """Names of the archive members whose data got read."""
    names = []
    real = zipfile.ZipFile.open

    def record(self, member, mode="r", *a, **k):
        if mode == "r":
            names.append(member.filename if isinstance(member, zipfile.ZipInfo) else member)
        return real(self, member, mode, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, "open", record)
    return names


def test_extra_huge_member_is_never_read(conn, tmp_path, opened):
    e = medmnist.entry("breastmnist")
    zeros = io.BytesIO()
    np.lib.format.write_array(zeros, np.zeros(64 << 20, np.uint8))  # 64 MiB that deflate to ~64 KiB
    npz_with(tmp_path / e.filename, synth.make_arrays("breastmnist"), extra={"padding.npy": zeros.getvalue()})
    r = ingest.ingest(conn, "breastmnist", data_dir=tmp_path, accept_unofficial=True, show_progress=False)
    assert r.added == 780 and "padding.npy" not in opened


@pytest.mark.parametrize("case, message", [
    ("huge_shape", "train_images shape (1000000000000, 28, 28), expected (546, 28, 28)"),
    ("lying_header", "train_images holds"),
    ("corrupt_member", "a member is corrupt"),
    ("truncated", "not a .npz archive"),
    ("text_file", "not a .npz archive"),
    ("pickled", "test_labels dtype object"),
])
def test_hostile_archives_get_one_sentence_and_write_nothing(conn, tmp_path, case, message, capsys, db_url):
    e = medmnist.entry("breastmnist")
    path = tmp_path / e.filename
    arrays = synth.make_arrays("breastmnist")
    if case == "huge_shape":
        members = {k: v for k, v in arrays.items() if k != "train_images"}
        npz_with(path, members, extra={"train_images.npy": declared_only((10**12, 28, 28))})
    elif case == "lying_header":  # the header says 546 images, the member holds 10
        members = {k: v for k, v in arrays.items() if k != "train_images"}
        short = io.BytesIO()
        np.lib.format.write_array(short, arrays["train_images"][:10])
        data = declared_only((546, 28, 28)) + short.getvalue()[len(declared_only((10, 28, 28))):]
        npz_with(path, members, extra={"train_images.npy": data})
    elif case == "corrupt_member":
        npz_with(path, arrays, compress=True)
        raw = bytearray(path.read_bytes())
        info = zipfile.ZipFile(path).getinfo("train_images.npy")
        start = info.header_offset + 30 + len(info.filename) + 200
        raw[start:start + 64] = bytes(64)  # zeros in the deflate stream, past the .npy header
        path.write_bytes(bytes(raw))
    elif case == "truncated":
        np.savez_compressed(path, **arrays)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "text_file":
        path.write_text("train_images,train_labels\n1,2\n")
    elif case == "pickled":
        arrays["test_labels"] = np.array([[{"a": 1}]] * 156, dtype=object)
        np.savez(path, **arrays)
    with pytest.raises(DataRefused, match=message.replace("(", r"\(").replace(")", r"\)")):
        ingest.ingest(conn, "breastmnist", data_dir=tmp_path, accept_unofficial=True, show_progress=False)
    assert conn.execute("SELECT count(*) FROM medsim.images").fetchone() == (0,)
    assert cli.main(["ingest", "breastmnist", "--data-dir", str(tmp_path), "--accept-unofficial", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("breastmnist: NOT ingested:") and "\n" not in err and "Traceback" not in err


def test_two_concurrent_ingests_of_one_subset(db_url, synth_dir, monkeypatch):
    real = ingest.encode_copy_rows

    def slow(*a, **k):
        time.sleep(0.2)  # long enough that the second INSERT waits on the first's unique key
        return real(*a, **k)

    monkeypatch.setattr(ingest, "encode_copy_rows", slow)
    results, errors = [], []

    def one():
        try:
            with db.connect(db_url, autocommit=True) as c:
                results.append(ingest.ingest(c, "breastmnist", data_dir=synth_dir, accept_unofficial=True,
                                             show_progress=False))
        except Exception as err:  # the test reports it below
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and sorted(r.added for r in results) == [0, 780]
    assert all(r.total == 780 for r in results)


# ---------------------------------------------------------------- index files
@pytest.fixture
def two_builds(ready, db_url, tmp_path):
    conn, mid = ready
    embed_all(db_url)
    a = faiss_index.build(conn, mid, "flat", out_dir=tmp_path)
    b = faiss_index.build(conn, mid, "hnsw", out_dir=tmp_path)
    return conn, mid, a, b


def test_builds_do_not_overwrite_each_other(two_builds, tmp_path):
    conn, mid, a, b = two_builds
    again = faiss_index.build(conn, mid, "flat", out_dir=tmp_path)
    assert len({a.path, b.path, again.path}) == 3
    assert faiss_index.load_build(conn, a.meta["build_id"]).meta["build_id"] == a.meta["build_id"]
    row = conn.execute("SELECT file_sha256, file_bytes FROM medsim.index_builds WHERE id = %s",
                       (again.meta["build_id"],)).fetchone()
    assert row == (again.meta["file_sha256"], again.path.stat().st_size)


@pytest.mark.parametrize("damage, error, message", [
    ("swap_index", StaleIndex, "is not the file build"),
    ("swap_both", StaleIndex, "now holds build"),
    ("truncate", StaleIndex, "replaced, truncated or overwritten"),
    ("bad_json", DataRefused, "is not valid JSON"),
    ("json_not_dict", DataRefused, "is not index metadata"),
    ("json_missing_key", DataRefused, "lacks or mangles splits"),
    ("no_json", NotFound, "has no metadata"),
    ("no_file", StaleIndex, "is missing. Rebuild it: `medsim index build --model"),
])
def test_damaged_index_files_are_refused_with_the_fix(two_builds, damage, error, message, capsys):
    conn, mid, a, b = two_builds
    meta_a = faiss_index.meta_path(a.path)
    if damage == "swap_index":
        a.path.write_bytes(b.path.read_bytes())
    elif damage == "swap_both":
        a.path.write_bytes(b.path.read_bytes())
        meta_a.write_text(faiss_index.meta_path(b.path).read_text())
    elif damage == "truncate":
        a.path.write_bytes(a.path.read_bytes()[:1000])
    elif damage == "bad_json":
        meta_a.write_text("{not json")
    elif damage == "json_not_dict":
        meta_a.write_text("[1, 2]")
    elif damage == "json_missing_key":
        meta = json.loads(meta_a.read_text())
        del meta["splits"]
        meta_a.write_text(json.dumps(meta))
    elif damage == "no_json":
        meta_a.unlink()
    elif damage == "no_file":
        a.path.unlink()
    with pytest.raises(error, match=message):
        faiss_index.load_build(conn, a.meta["build_id"])
    gid = conn.execute("SELECT min(image_id) FROM medsim.gallery").fetchone()[0]
    # the default FAISS index of the model is build a (an exact one is preferred)
    assert cli.main(["search", "--image-id", str(gid), "--engine", "faiss"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medsim: error:") and err.count("\n") == 1
    assert cli.main(["recall", "--build-id", str(a.meta["build_id"]), "-k", "1"]) == 2
    if damage == "swap_both":  # by its file: consistent with itself and its own row, but not this file
        capsys.readouterr()
        assert cli.main(["search", "--image-id", str(gid), "--engine", "faiss", "--index", str(a.path)]) == 2
        assert "medsim.index_builds records at another file" in capsys.readouterr().err


def test_index_of_another_database_is_refused(two_builds):
    conn, mid, a, b = two_builds
    conn.execute("DELETE FROM medsim.index_builds WHERE id = %s", (a.meta["build_id"],))
    with pytest.raises(StaleIndex, match="this database has no record of"):
        faiss_index.load(conn, a.path)


# ---------------------------------------------------------------- a reader holding locks
def reader(db_url) -> psycopg.Connection:
    c = db.connect(db_url, autocommit=True)
    c.execute("SET ROLE medsim_reader")
    return c


def test_a_reader_cannot_stall_the_workers(ready, db_url):
    conn, mid = ready
    r = reader(db_url)
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # the queue lock is a row lock
            r.execute("SELECT 1 FROM medsim.models WHERE id = %s FOR SHARE", (mid,))
        # what it can still take: every advisory lock, and table locks that block no writer
        r.execute("SELECT pg_advisory_lock(hashtext('medsim.embedding_queue'), %s)", (mid,))
        r.execute("SELECT pg_advisory_lock(hashtext('medsim.hnsw'), %s)", (mid,))
        r.execute("BEGIN")
        r.execute("LOCK TABLE medsim.embeddings, medsim.embedding_queue IN ACCESS SHARE MODE")
        out = run_worker(db_url, "--once", timeout=120)
        assert out.returncode == 0, out.stderr
        assert n_embedded(conn, mid) == N
    finally:
        r.close()


def test_worker_waiting_on_a_lock_stays_responsive(ready, db_url):
    """A writer (an enqueue, an index build) holding the model's row: the worker says what
    it waits for, keeps retrying, and still stops on SIGTERM."""
    conn, mid = ready
    holder = db.connect(db_url, autocommit=True)
    try:
        holder.execute("BEGIN")
        holder.execute("SELECT 1 FROM medsim.models WHERE id = %s FOR NO KEY UPDATE", (mid,))
        p = start_worker(db_url, "--once", "--lock-timeout", "0.5", "--no-index")
        time.sleep(4)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=15)
        assert p.returncode == 0, err
        assert "for a lock" in err and n_embedded(conn, mid) == 0
    finally:
        holder.close()
    assert run_worker(db_url, "--once", "--no-index").returncode == 0
    assert n_embedded(conn, mid) == N


def test_reader_sees_no_weights_pixels_or_paths(ready, db_url):
    conn, mid = ready
    embed_all(db_url)
    r = reader(db_url)
    try:
        gid = r.execute("SELECT min(image_id) FROM medsim.gallery").fetchone()[0]
        assert len(r.execute("SELECT * FROM medsim.similar_images(%s, 3)", (gid,)).fetchall()) == 3
        assert r.execute("SELECT count(*), min(split) FROM medsim.images").fetchone()[0] == N
        for q in ("SELECT checkpoint FROM medsim.models", "SELECT pixels FROM medsim.images",
                  "SELECT source_file FROM medsim.datasets", "SELECT path FROM medsim.index_builds",
                  "SELECT * FROM medsim.images"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                r.execute(q)
    finally:
        r.close()
    setting = conn.execute("SELECT unnest(setconfig) FROM pg_db_role_setting s JOIN pg_roles r "
                           "ON r.oid = s.setrole WHERE r.rolname = 'medsim_reader'").fetchall()
    assert ("statement_timeout=30s",) in setting


# ---------------------------------------------------------------- bad queries
def test_k_and_null_queries_are_refused_everywhere(ready, db_url, capsys):
    conn, mid = ready
    embed_all(db_url)
    gid = conn.execute("SELECT min(image_id) FROM medsim.gallery").fetchone()[0]
    for sql, params, message in (
            ("SELECT * FROM medsim.similar_images(%s, NULL)", (gid,), "k must be between 1 and 1000, got NULL"),
            ("SELECT * FROM medsim.similar_images(%s, 3000000000::bigint::int)", (gid,), "out of range"),
            ("SELECT * FROM medsim.similar_images(%s, 5000)", (gid,), "k must be between 1 and 1000, got 5000"),
            ("SELECT * FROM medsim.search_by_vector(NULL, 5)", (), "the query vector is NULL")):
        with pytest.raises(psycopg.Error, match=message):
            conn.execute(sql, params)
    for engine in ("pgvector", "faiss"):
        assert cli.main(["search", "--image-id", str(gid), "-k", "100000000", "--engine", engine]) == 2
        assert "k must be between 1 and 1000" in capsys.readouterr().err
    assert cli.main(["index", "build", "--splits", "train,nonsense"]) == 2
    assert "unknown split(s) nonsense" in capsys.readouterr().err
    assert conn.execute("SELECT count(*) FROM medsim.index_builds").fetchone() == (0,)


def test_sixteen_bit_and_oversized_query_images(ready, db_url, tmp_path, capsys, monkeypatch):
    conn, mid = ready
    embed_all(db_url)
    gid, px = conn.execute("SELECT id, pixels FROM medsim.images WHERE split = 'train' ORDER BY id LIMIT 1").fetchone()
    x8 = np.frombuffer(px, np.uint8).reshape(28, 28)
    # the same picture as a 16-bit PNG (x257: the same values against a 16-bit full scale)
    Image.fromarray(x8.astype(np.uint16) * 257).save(tmp_path / "q16.png")
    with Image.open(tmp_path / "q16.png") as im:
        assert im.mode == "I;16"
    Image.fromarray(x8).save(tmp_path / "q8.png")
    [(q16, hits16)] = search(conn, image_files=[tmp_path / "q16.png"], k=4)
    [(q8, hits8)] = search(conn, image_files=[tmp_path / "q8.png"], k=3)
    assert np.array_equal(q16.vector, q8.vector)  # the identical model input, so the identical vector
    # the 8-bit file holds the stored bytes; the 16-bit one is the same picture at another
    # bit depth, recognised by its perceptual hash and the pixel rule (issue 39): both are
    # the stored image, left out of their neighbours, which are the same
    assert q8.in_gallery == [gid] and q16.in_gallery == [gid] and q16.image_id == gid
    assert [h.image_id for h in hits16[:3]] == [h.image_id for h in hits8]
    big = tmp_path / "big.png"
    Image.new("L", (4000, 3000)).save(big)
    monkeypatch.setenv("MEDSIM_MAX_IMAGE_PIXELS", "10000000")
    assert cli.main(["search", "--image-file", str(big)]) == 2
    assert "12,000,000 pixels is over the limit of 10,000,000" in capsys.readouterr().err


# ---------------------------------------------------------------- backups
def test_backup_and_restore_give_identical_search_and_recall(ready, db_url, admin_url, tmp_path, capsys):
    """Postgres holds everything: a pg_dump/pg_restore round trip into a fresh database
    answers every search the same, recall included, and the FAISS files still load."""
    from medsim.search import recall
    from tests.conftest import create_database

    conn, mid = ready
    embed_all(db_url)
    b = faiss_index.build(conn, mid, "ivfflat", out_dir=tmp_path)
    ids = [r[0] for r in conn.execute("SELECT image_id FROM medsim.query_images ORDER BY image_id LIMIT 20")]

    def answers(c):
        # exact search and FAISS: the same data must give the same answers. pg_restore builds
        # the pgvector HNSW index anew, and an HNSW graph differs from build to build (random
        # levels): its recall is checked to be sound below, not identical (it once came back
        # 0.95 instead of 1.0 on this untrained model's clustered vectors).
        hits = [[(h.image_id, round(h.distance, 6)) for h in found]
                for _, found in search(c, image_ids=ids, k=5, engine="exact")]
        rep = recall.report(c, [faiss_index.load_build(c, b.meta["build_id"])], ks=(1, 10), store=False)
        hnsw = [r["recall"]["10"] for r in rep["rows"] if r["kind"] == "hnsw"]
        assert hnsw and min(hnsw) >= 0.8, hnsw
        return hits, [(r["engine"], r["kind"], r["recall"]) for r in rep["rows"] if r["kind"] != "hnsw"]

    before = answers(conn)
    dump = tmp_path / "medsim.dump"
    assert cli.main(["db", "backup", str(dump)]) == 0 and dump.stat().st_size > 0
    target = create_database(admin_url, "restored")
    assert cli.main(["--database-url", target, "db", "restore", str(dump)]) == 0
    capsys.readouterr()
    with db.connect(target, autocommit=True) as restored:
        from medsim import migrate

        migrate.check(restored)  # the schema version came along
        assert answers(restored) == before
        assert restored.execute("SELECT count(*) FROM medsim.embeddings").fetchone()[0] == N
    assert cli.main(["db", "restore", str(tmp_path / "missing.dump")]) == 2
    assert "no such backup file" in capsys.readouterr().err
