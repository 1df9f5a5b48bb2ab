"""Issue 20, part two: broken stored images, deletions racing workers, backups that restore
by themselves, locks a reader cannot stall, a reader that sees no server path, FAISS
builds that cannot hide or impersonate each other, an audit that scales, and the small
refusals. Real Postgres, real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from medsim import audit, cli, db, queue
from medsim.search import faiss_index
from medsim.service.app import create_app
from medsim.service.state import ServeConfig
from medsim.sources import archive, deletion
from medsim.sources.folder import FolderSource
from medsim.training import evaluate
from medsim.worker.summary import Summary
from tests.helpers import embed_all, ingest_synth, register_model, start_worker

N = 780 + 1600


@pytest.fixture
def ready(conn, synth_dir):
    ingest_synth(conn, synth_dir)
    return conn, register_model(conn)


def reader(url) -> psycopg.Connection:
    c = db.connect(url, autocommit=True)
    c.execute("SET ROLE medsim_reader")
    return c


# ---------------------------------------------------------------- 4. stored broken
def test_a_0x0_and_a_truncated_stored_image_are_refused_everywhere(ready, db_url, capsys):
    conn, mid = ready
    embed_all(db_url)
    ds = conn.execute("SELECT min(id) FROM medsim.datasets").fetchone()[0]
    ids = [conn.execute("INSERT INTO medsim.images (dataset_id, split, split_index, labels, height, width, channels, "
                        "pixels, sha256) VALUES (%s, 'train', %s, '{0}', %s, %s, 1, %s, '\\x00') RETURNING id",
                        (ds, 90_000 + k, h, w, px)).fetchone()[0]
           for k, (h, w, px) in enumerate([(0, 0, b""), (28, 28, b"\x00" * 100)])]
    with TestClient(create_app(ServeConfig(auth=False, database_url=db_url)), raise_server_exceptions=False) as client:
        for i in ids:
            assert cli.main(["search", "--image-id", str(i)]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"medsim: error: image {i} is stored broken") and err.count("\n") == 1
            for r in (client.post("/search", json={"image_id": i}), client.get(f"/images/{i}/thumbnail.png")):
                assert r.status_code == 422 and r.json()["error"] == "DataRefused", r.text
                assert f"image {i} is stored broken" in r.json()["detail"]


# ---------------------------------------------------------------- 5. deletion and workers
def test_deleting_a_dataset_while_four_workers_embed_it(ready, db_url):
    conn, mid = ready
    procs = [start_worker(db_url, "--once", "--batch-size", "32", "--throttle", "0.05", "--no-index")
             for _ in range(4)]
    deadline = time.monotonic() + 60
    while conn.execute("SELECT count(*) FROM medsim.embeddings").fetchone()[0] < 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = deletion.delete(conn, dataset="retinamnist", reason="a test")
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [e[-1500:] for _, e in outs]
    assert gone.images == 1600
    assert conn.execute("SELECT count(*) FROM medsim.images").fetchone() == (780,)
    orphans = conn.execute("SELECT (SELECT count(*) FROM medsim.embeddings e WHERE NOT EXISTS "
                           "(SELECT 1 FROM medsim.images i WHERE i.id = e.image_id)), "
                           "(SELECT count(*) FROM medsim.embedding_queue q WHERE NOT EXISTS "
                           "(SELECT 1 FROM medsim.images i WHERE i.id = q.image_id))").fetchone()
    assert orphans == (0, 0)
    embed_all(db_url)  # and what is left is all embeddable
    assert conn.execute("SELECT count(*) FROM medsim.embeddings WHERE model_id = %s", (mid,)).fetchone() == (780,)


# ---------------------------------------------------------------- 6. backups restore by themselves
def test_a_backup_restores_by_itself_into_a_fresh_home(ready, db_url, tmp_path):
    conn, mid = ready
    embed_all(db_url)
    dump = tmp_path / "medsim.dump"
    db.backup(db_url, dump)
    home = tmp_path / "fresh-home"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["MEDSIM_HOME"] = str(home)
    gid = conn.execute("SELECT min(image_id) FROM medsim.gallery").fetchone()[0]

    def medsim(*args, environ=env):
        return subprocess.run([sys.executable, "-m", "medsim.cli", *args], env=environ, capture_output=True,
                              text=True, timeout=300)

    try:
        r = medsim("db", "restore", str(dump))
        assert r.returncode == 0, r.stderr
        url = medsim("db", "url").stdout.strip()
        restored = medsim("search", "--image-id", str(gid), "-k", "5", "--json")
        original = medsim("search", "--image-id", str(gid), "-k", "5", "--json", environ={**env, "DATABASE_URL": db_url})
        assert restored.returncode == 0, restored.stderr
        assert json.loads(restored.stdout)[0]["neighbours"] == json.loads(original.stdout)[0]["neighbours"]
        with reader(url) as r_:  # the reader role works, no migrate run
            assert len(r_.execute("SELECT * FROM medsim.similar_images(%s, 3)", (gid,)).fetchall()) == 3
        again = medsim("db", "restore", str(dump))
        assert again.returncode == 2 and "already holds a medsim schema" in again.stderr
    finally:
        medsim("db", "stop")


# ---------------------------------------------------------------- 7. locks a reader cannot stall
def test_a_reader_holding_the_migration_lock_is_named_not_waited_for(db_url, capsys):
    r = reader(db_url)
    try:
        r.execute("SELECT pg_advisory_lock(hashtext('medsim.migrate'))")
        t0 = time.monotonic()
        assert cli.main(["--database-url", db_url, "migrate", "--lock-wait", "1"]) == 2
        assert time.monotonic() - t0 < 30
        err = capsys.readouterr().err
        assert f"session {r.info.backend_pid} (user postgres" in err and "holds" in err
    finally:
        r.close()
    assert cli.main(["--database-url", db_url, "migrate", "--lock-wait", "1"]) == 0


# ---------------------------------------------------------------- 8. the reader sees no server path
def test_the_reader_sees_no_server_path_in_any_column(ready, db_url, tmp_path):
    conn, mid = ready
    root = tmp_path / "archive"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((12, 12), 40 * i + (10 if label == "a" else 20), np.uint8)).save(
                root / label / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # Pillow's error names the file
    archive.ingest_archive(conn, FolderSource(root), "lab", progress=False)
    embed_all(db_url)
    out = tmp_path / "out"
    evaluate.evaluate(conn, mid, out_dir=out)
    faiss_index.build(conn, mid, "flat", out_dir=out)
    with conn.transaction():
        audit.run(conn, mid)
    secrets = [str(tmp_path), os.path.realpath(tmp_path)]
    r = reader(db_url)
    try:
        columns = r.execute(
            "SELECT c.table_name, c.column_name FROM information_schema.columns c WHERE c.table_schema = 'medsim' "
            "AND has_column_privilege(current_user, format('medsim.%I', c.table_name), c.column_name, 'SELECT')"
        ).fetchall()
        assert len(columns) > 50
        for table, column in columns:
            found = r.execute(psycopg.sql.SQL("SELECT count(*) FROM medsim.{} WHERE {}::text LIKE ANY(%s)").format(
                psycopg.sql.Identifier(table), psycopg.sql.Identifier(column)), ([f"%{s}%" for s in secrets],)
            ).fetchone()[0]
            assert found == 0, f"medsim.{table}.{column} shows a server path to the reader"
    finally:
        r.close()
    # the owner still has what it needs
    assert conn.execute("SELECT count(*) FROM medsim.ingest_problems").fetchone()[0] == 1


# ---------------------------------------------------------------- 9. FAISS builds
def test_a_stale_build_never_hides_a_fresh_one_and_no_answer_names_a_path(ready, db_url, tmp_path, capsys):
    conn, mid = ready
    embed_all(db_url)
    flat = faiss_index.build(conn, mid, "flat", out_dir=tmp_path)
    conn.execute("DELETE FROM medsim.embeddings WHERE model_id = %s AND image_id = "
                 "(SELECT min(image_id) FROM medsim.gallery)", (mid,))  # the gallery moves: flat is stale
    hnsw = faiss_index.build(conn, mid, "hnsw", out_dir=tmp_path)
    assert faiss_index.latest_build(conn, mid) == hnsw.meta["build_id"]
    gid = conn.execute("SELECT max(image_id) FROM medsim.gallery").fetchone()[0]
    assert cli.main(["search", "--image-id", str(gid), "--engine", "faiss"]) == 0
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temporary file left
    conn.execute("DELETE FROM medsim.embeddings WHERE model_id = %s AND image_id = %s", (mid, gid))  # both stale
    with TestClient(create_app(ServeConfig(auth=False, database_url=db_url)), raise_server_exceptions=False) as client:
        r = client.post("/search", json={"image_id": gid - 1, "engine": "faiss"})
        assert r.status_code == 409 and r.json()["error"] == "StaleIndex"
        assert str(tmp_path) not in r.text and ".faiss" not in r.text
    assert flat.path.exists()


# ---------------------------------------------------------------- 12. the audit at archive scale
def smooth(rng, size=28):
    yy, xx = np.mgrid[0:size, 0:size] / size
    x = sum(rng.uniform(0.3, 1) * np.exp(-((yy - rng.uniform(0.1, 0.9)) ** 2 + (xx - rng.uniform(0.1, 0.9)) ** 2)
                                         / (2 * rng.uniform(0.05, 0.2) ** 2)) for _ in range(5))
    return np.clip(x / x.max() * 230 + 10, 0, 255).astype(np.uint8)


def test_the_audit_finds_flipped_and_shifted_copies_among_archives(conn, synth_dir, tmp_path, db_url, capsys):
    """The near-duplicate rule is the pixels' (aligned correlation), so it does not depend on
    how the archives present spread in the embedding; the copies are flipped, shifted by
    2 pixels and brightened."""
    ingest_synth(conn, synth_dir)  # two more archives beside the one audited
    rng = np.random.default_rng(4)
    root = tmp_path / "smooth"
    rows, originals = [], []
    root.mkdir()
    for i in range(160):
        x = smooth(rng)
        Image.fromarray(x).save(root / f"{i}.png")
        rows.append(f"{i}.png,x,train")
        originals.append(x)
    for x, how in [(originals[0][:, ::-1], "flip"), (np.roll(originals[1], 2, axis=1), "shift"),
                   (np.clip(originals[2].astype(int) + 8, 0, 255).astype(np.uint8), "bright")]:
        Image.fromarray(np.ascontiguousarray(x)).save(root / f"copy-{how}.png")
        rows.append(f"copy-{how}.png,x,test")
    (root / "m.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    archive.ingest_archive(conn, FolderSource(root, manifest=root / "m.csv"), "smooth", progress=False)
    mid = register_model(conn)
    embed_all(db_url)
    with conn.transaction():
        r = audit.run(conn, mid, datasets=["smooth"])
    assert r["images"] == 163 and r["embedded"] == 163 and f"correlating at {audit.MIN_CORRELATION}" in r["near_rule"], r
    near = conn.execute("SELECT image_a, image_b FROM medsim.leakage WHERE kind = 'near' AND across_splits"
                        ).fetchall()
    assert r["near_pairs_across_splits"] == len(near) == 3  # the copies, and no two different pictures
    copies = {row[0] for row in conn.execute("SELECT id FROM medsim.images WHERE split = 'test' AND dataset_id = "
                                              "(SELECT id FROM medsim.datasets WHERE flag = 'smooth')")}
    assert copies <= {b for _, b in near} | {a for a, _ in near}, (copies, near)
    # scoped: the other archives were not read
    assert conn.execute("SELECT count(*) FROM medsim.leakage l JOIN medsim.images i ON i.id = l.image_a "
                        "WHERE i.dataset_id <> (SELECT id FROM medsim.datasets WHERE flag = 'smooth')").fetchone() == (0,)
    # --exclude-leaked counts only the leaks of the model's own datasets
    assert evaluate.leaked_test_images(conn, mid, ["breastmnist", "retinamnist"]) == set()
    assert evaluate.leaked_test_images(conn, mid, ["smooth"]) == copies


def test_deleting_a_patient_reports_the_same_pixels_elsewhere(conn, tmp_path, capsys):
    img = tmp_path / "img"
    img.mkdir()
    rng = np.random.default_rng(8)
    pics = [rng.integers(0, 256, (12, 12), dtype=np.uint8) for _ in range(3)]
    for i, x in enumerate(pics):
        Image.fromarray(x).save(img / f"{i}.png")
    (tmp_path / "m.csv").write_text("path,label,patient_id\n" + "".join(f"img/{i}.png,x,PAT\n" for i in range(3)))
    archive.ingest_archive(conn, FolderSource(tmp_path, manifest=tmp_path / "m.csv"), "ward", progress=False)
    export = tmp_path / "export"
    (export / "x").mkdir(parents=True)
    Image.fromarray(pics[0]).save(export / "x" / "anonymous.png")  # the same picture, no patient id
    archive.ingest_archive(conn, FolderSource(export), "export", progress=False)
    assert cli.main(["delete", "--patient", "PAT"]) == 0
    out = capsys.readouterr().out
    assert "deleted 3 image(s)" in out and "1 image(s) elsewhere hold the same pixels (in export" in out
    assert conn.execute("SELECT count(*) FROM medsim.images").fetchone() == (1,)
    # a plain re-run does not bring the withdrawn patient back (the files are settled and
    # unchanged: ledger.py), nor does --recheck, which reads them again: the deletion is
    # their tombstone
    again = archive.ingest_archive(conn, FolderSource(tmp_path, manifest=tmp_path / "m.csv"), "ward", progress=False)
    assert (again.added, again.unchanged_files) == (0, 3)
    again = archive.ingest_archive(conn, FolderSource(tmp_path, manifest=tmp_path / "m.csv"), "ward", progress=False,
                                   recheck=True)
    assert again.added == 0 and [why for *_, why in again.problems] == ["patient withdrawn (deletion 1)"] * 3
    # the same pictures under another patient id, and the copy without one, go together
    (tmp_path / "m2.csv").write_text("path,label,patient_id\n" + "".join(f"img/{i}.png,x,PAT2\n" for i in range(3)))
    archive.ingest_archive(conn, FolderSource(tmp_path, manifest=tmp_path / "m2.csv"), "ward2", progress=False)
    assert cli.main(["delete", "--patient", "PAT2", "--with-copies"]) == 0
    assert "deleted 4 image(s)" in capsys.readouterr().out
    assert conn.execute("SELECT count(*) FROM medsim.images").fetchone() == (0,)


# ---------------------------------------------------------------- 13. the small ones
def test_the_small_refusals_are_one_sentence_in_the_documented_shape(ready, db_url, tmp_path, capsys):
    conn, mid = ready
    embed_all(db_url)
    gid = conn.execute("SELECT min(image_id) FROM medsim.gallery").fetchone()[0]
    assert cli.main(["search", "--image-id", str(gid), "--per-patient", "99999999999"]) == 2
    assert "per_patient must be between 1 and 1000" in capsys.readouterr().err
    with TestClient(create_app(ServeConfig(auth=False, database_url=db_url)), raise_server_exceptions=False) as client:
        shapes = [client.post("/search", json={"image_id": gid, "per_patient": 99999999999}),
                  client.post("/search", content=b'{"image_id": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                              headers={"content-type": "application/json"}),
                  client.get("/search"), client.delete("/images/1"), client.get("/no/such/route"),
                  client.post("/search/upload", files=[("image", ("a.png", b"x", "image/png")),
                                                       ("image", ("b.png", b"y", "image/png"))])]
        for r in shapes:
            assert 400 <= r.status_code < 500 and set(r.json()) == {"error", "detail"}, (r.status_code, r.text)
        assert [r.status_code for r in shapes[2:5]] == [405, 405, 404]
    # a deleted dataset takes its calibration with it
    evaluate.evaluate(conn, mid, out_dir=tmp_path)
    assert conn.execute("SELECT count(*) FROM medsim.calibrations WHERE dataset = 'retinamnist'").fetchone() == (1,)
    deletion.delete(conn, dataset="retinamnist")
    assert conn.execute("SELECT count(*) FROM medsim.calibrations WHERE dataset = 'retinamnist'").fetchone() == (0,)


def test_the_worker_counts_images_to_retry_not_attempts():
    from medsim.worker.batch import Result

    s = Summary()
    s.account(Result(claimed=2, failures=[(1, "bad", False), (2, "bad", False)]))
    s.account(Result(claimed=2, failures=[(1, "bad", False), (2, "bad", True)]))
    assert (s.retrying, s.failed) == (1, 1) and "failed 1 (1 to retry)" in s.line()


def test_enqueue_survives_an_image_deleted_while_it_is_queued(ready, db_url, monkeypatch):
    """The statement's snapshot still saw the image; its deletion committed before the
    foreign-key check: the enqueue runs again without it."""
    conn, mid = ready
    other = db.connect(db_url, autocommit=True)
    victim = conn.execute("SELECT max(id) FROM medsim.images").fetchone()[0]
    conn.execute("DELETE FROM medsim.embedding_queue")
    from medsim import queries

    real, calls = queries.Q.enqueue_model, []

    def racing(conn_, query, *a, **k):
        if query == real and not calls:
            calls.append(1)
            other.execute("DELETE FROM medsim.images WHERE id = %s", (victim,))
            raise psycopg.errors.ForeignKeyViolation("simulated: the image went while it was queued")
        return orig(conn_, query, *a, **k)

    orig = psycopg.Connection.execute
    monkeypatch.setattr(psycopg.Connection, "execute", racing)
    try:
        assert queue.enqueue(conn, mid) == N - 1
    finally:
        monkeypatch.undo()
        other.close()
    assert calls == [1]


def test_aligned_correlation_sees_copies_not_neighbours():
    rng = np.random.default_rng(0)
    a = np.stack([smooth(rng) for _ in range(50)]).astype(np.float32)
    b = np.stack([smooth(rng) for _ in range(50)]).astype(np.float32)
    flipped, shifted = a[:, :, ::-1], np.pad(a, ((0, 0), (0, 0), (2, 0)), mode="edge")[:, :, :28]
    assert (audit.aligned_correlation(a, flipped) > 0.999).all()
    assert (audit.aligned_correlation(a, shifted) > 0.99).all()
    assert (audit.aligned_correlation(a, a * 1.2 + 9) > 0.999).all()  # brightness and contrast
    assert (audit.aligned_correlation(a, b) < audit.MIN_CORRELATION).mean() > 0.9  # different pictures
