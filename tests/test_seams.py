"""The seams the next issues build on: one error family, a data-access layer, caller-owned
transactions, index kinds as data, the gallery defined once, a status view that does not
grow with models x images, and a CLI that imports only what a command uses."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
import pytest

from medsim import cli, db, errors, queries, queue, registry
from medsim.search import GALLERY_SPLITS, faiss_index, index_kinds, recall
from medsim.sources import ingest
from medsim.training import evaluate
from tests.helpers import embed_all, ingest_synth, register_model, search

PACKAGE = Path(__file__).resolve().parents[1] / "medsim"


# ---------------------------------------------------------------- 1. one error family
def test_every_user_error_is_a_medsim_error_with_a_4xx_or_503():
    family = [errors.BadArgument, errors.NotFound, errors.DataMissing, errors.DataRefused,
              errors.StaleIndex, errors.SchemaNotReady, errors.DatabaseUnavailable]
    for cls in family:
        assert issubclass(cls, errors.MedsimError) and cls.exit_code == 2
        assert 400 <= cls.http_status < 500 or cls.http_status == 503
    assert errors.NotFound.http_status == 404 and errors.StaleIndex.http_status == 409


def test_cli_turns_user_errors_into_one_sentence_and_bugs_into_tracebacks(db_url, monkeypatch, capsys):
    assert cli.main(["search", "--image-id", "1", "--model", "77"]) == 2
    assert capsys.readouterr().err == "medsim: error: no model with id 77\n"

    # a bug (here: what a CUDA out-of-memory error looks like) is not swallowed
    from medsim.training import train

    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train", oom)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        cli.main(["train", "--epochs", "1"])


def test_a_bug_exits_1_with_its_traceback(db_url, tmp_path):
    """As a process: a non-medsim exception prints its traceback and exits 1."""
    script = ("import sys\nfrom medsim import cli\nfrom medsim.search import pipeline\n"
              "def broken(*a, **k):\n    raise ZeroDivisionError('a bug')\n"
              "pipeline.run = broken\nsys.exit(cli.main(sys.argv[1:]))\n")
    p = subprocess.run([sys.executable, "-c", script, "search", "--image-id", "1"], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path, env={**os.environ, "DATABASE_URL": db_url})
    assert p.returncode == 1
    assert "Traceback" in p.stderr and "ZeroDivisionError: a bug" in p.stderr


# ---------------------------------------------------------------- 2. data access, named rows
NO_SQL = sorted(str(p.relative_to(PACKAGE)) for p in [*(PACKAGE / "cli").glob("*.py"), PACKAGE / "demo.py",
                                                          *(PACKAGE / "worker").glob("*.py")])


@pytest.mark.parametrize("module", NO_SQL)
def test_cli_demo_and_worker_run_no_sql(module):
    """The CLI and the demo are shells; the worker's SQL is the queue module's (procrastinate's
    manager/worker split)."""
    tree = ast.parse((PACKAGE / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("execute", "cursor", "copy", "Q"), f"{module} runs SQL ({node.attr})"
        if isinstance(node, ast.ImportFrom):
            assert node.module != "medsim.queries", f"{module} imports the named queries"


def test_rows_are_named_and_a_changed_column_fails_loudly(conn):
    @dataclass
    class Two:
        a: int
        b: str

    assert queries.rows(conn, "SELECT 1 AS a, 'x' AS b", as_=Two) == [Two(1, "x")]
    assert queries.rows(conn, "SELECT 'x' AS b, 1 AS a", as_=Two) == [Two(1, "x")]  # order is irrelevant
    with pytest.raises(TypeError):  # a renamed or extra column is an error, not a misread
        queries.rows(conn, "SELECT 1 AS a, 'x' AS c", as_=Two)


def test_status_rows_are_named(embedded):
    conn, mid = embedded
    rows = queue.status(conn, mid)
    assert {r.dataset for r in rows} == {"breastmnist", "retinamnist"}
    assert all(r.total == r.embedded and r.pending == 0 for r in rows)
    [m] = registry.list_models(conn)
    assert m.id == mid and m.is_current and m.embedding_dim == 64


# ---------------------------------------------------------------- 3. the caller owns the transaction
def test_library_functions_leave_the_transaction_to_the_caller(db_url, synth_dir, tmp_path):
    """Every write of a whole pipeline, on one non-autocommit connection, then a rollback:
    nothing may remain. A library function that committed would leave rows behind."""
    with db.connect(db_url) as conn:
        ingest_synth(conn, synth_dir)
        mid = register_model(conn)
        from medsim.worker import Worker, WorkerConfig

        conn.commit()  # the worker is another connection: it must see the data (then we wipe it)
        Worker(WorkerConfig(once=True, database_url=db_url, progress=False, build_index=False)).run()
        before = counts(conn)
        b = faiss_index.build(conn, mid, "flat", out_dir=tmp_path)
        recall.report(conn, [b], ks=(1,))
        evaluate.evaluate(conn, mid)
        registry.set_current(conn, register_model(conn, current=False, seed=5))
        assert counts(conn) != before  # written, in this transaction
        conn.rollback()
        assert counts(conn) == before


def counts(conn):
    return conn.execute("SELECT (SELECT count(*) FROM medsim.index_builds), "
                        "(SELECT count(*) FROM medsim.recall_reports), (SELECT count(*) FROM medsim.evaluations), "
                        "(SELECT count(*) FROM medsim.models), "
                        "(SELECT id FROM medsim.models WHERE is_current)").fetchone()


def test_index_metadata_is_written_before_its_row(embedded, tmp_path, monkeypatch):
    conn, mid = embedded
    b = faiss_index.build(conn, mid, "flat", out_dir=tmp_path)
    meta = json.loads(faiss_index.meta_path(b.path).read_text())
    row = conn.execute("SELECT id, path, n_rows FROM medsim.index_builds").fetchone()
    assert row == (meta["build_id"], str(b.path.resolve()), meta["n_rows"])
    # the row insert fails: the files exist, but no row points at anything
    monkeypatch.setattr(queries.Q, "insert_index_build", "SELECT 1 / 0")
    with pytest.raises(psycopg.errors.DivisionByZero):
        faiss_index.build(conn, mid, "hnsw", out_dir=tmp_path)
    assert len(list((tmp_path / "indexes").glob(f"model{mid}-hnsw-build*.faiss.json"))) == 1
    assert conn.execute("SELECT count(*) FROM medsim.index_builds").fetchone() == (1,)


# ---------------------------------------------------------------- 4. index kinds as data
def test_cli_kind_choices_come_from_the_table(capsys):
    with pytest.raises(SystemExit):
        cli.main(["index", "build", "--kind", "nope"])
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and all(repr(k) in err for k in index_kinds.KINDS)


def test_a_new_kind_is_one_entry(embedded, tmp_path, monkeypatch, capsys):
    conn, mid = embedded
    sq8 = index_kinds.Kind("ivfsq8", "IVF + 8-bit scalar quantiser", "IVF{nlist},SQ8",
                           lambda n, d: {"nlist": 8, "nprobe": 8}, search_params=("nprobe",))
    monkeypatch.setitem(index_kinds.KINDS, "ivfsq8", sq8)
    assert cli.main(["index", "build", "--kind", "ivfsq8", "--param", "nprobe=4", "--out-dir", str(tmp_path)]) == 0
    assert "built ivfsq8 index of 2380 vectors" in capsys.readouterr().out
    b = faiss_index.load_build(conn, faiss_index.latest_build(conn, mid, "ivfsq8"))
    import faiss

    assert b.meta["factory"] == "IVF8,SQ8" and faiss.extract_index_ivf(b.index).nprobe == 4
    r = recall.report(conn, [b], ks=(10,), store=False)
    assert r["rows"][-1]["recall"]["10"] > 0.9


def test_search_params_come_from_the_metadata_on_load(embedded, tmp_path):
    import faiss

    conn, mid = embedded
    b = faiss_index.build(conn, mid, "ivfflat", {"nlist": 16, "nprobe": 2}, out_dir=tmp_path)
    meta = json.loads(faiss_index.meta_path(b.path).read_text())
    meta["params"]["nprobe"] = 9
    faiss_index.meta_path(b.path).write_text(json.dumps(meta))
    assert faiss.extract_index_ivf(faiss_index.load(conn, b.path).index).nprobe == 9


def test_faiss_search_loads_and_checks_the_index_once_per_call(embedded, tmp_path, monkeypatch):
    conn, mid = embedded
    faiss_index.build(conn, mid, "flat", out_dir=tmp_path)
    calls = {"load": 0, "fingerprint": 0, "version": 0}
    real_load, real_fp, real_version = faiss_index.load, faiss_index.fingerprint, faiss_index.gallery_version

    def load(*a, **k):
        calls["load"] += 1
        return real_load(*a, **k)

    def fingerprint(*a, **k):
        calls["fingerprint"] += 1
        return real_fp(*a, **k)

    def version(*a, **k):
        calls["version"] += 1
        return real_version(*a, **k)

    monkeypatch.setattr(faiss_index, "load", load)
    monkeypatch.setattr(faiss_index, "fingerprint", fingerprint)
    monkeypatch.setattr(faiss_index, "gallery_version", version)
    ids = [r[0] for r in conn.execute("SELECT image_id FROM medsim.gallery ORDER BY image_id LIMIT 5")]
    results = search(conn, image_ids=ids, k=3, engine="faiss")
    # one load per call; its freshness is one lookup of the gallery version (revision
    # 0011), so the gallery is not hashed at all while nothing changed
    assert len(results) == 5 and calls == {"load": 1, "fingerprint": 0, "version": 1}


# ---------------------------------------------------------------- 5. the gallery, defined once
def test_gallery_view_and_python_constant_agree(embedded):
    conn, mid = embedded
    in_view = {r[0] for r in conn.execute("SELECT DISTINCT split FROM medsim.gallery")}
    everything = {r[0] for r in conn.execute("SELECT DISTINCT split FROM medsim.images")}
    assert in_view == set(GALLERY_SPLITS) == everything  # a person's search sees every split
    # the SQL function reads the view: nothing outside it comes back, and it still uses
    # the model's HNSW index (the view is flattened into the function's query)
    from medsim.search import pgvector_hnsw

    pgvector_hnsw.ensure(conn, mid, 64)
    v = conn.execute("SELECT embedding FROM medsim.embeddings LIMIT 1").fetchone()[0]
    got = {r[0] for r in conn.execute("SELECT split FROM medsim.search_by_vector(%s, 500)", (v,))}
    assert got <= set(GALLERY_SPLITS)
    # and search_gallery's own default is the same list
    args = conn.execute("SELECT pg_get_function_arguments('medsim.search_gallery(vector, integer, integer, jsonb, "
                        "text, bigint, integer, text[])'::regprocedure)").fetchone()[0]
    assert "p_splits text[] DEFAULT ARRAY[" + ", ".join(f"'{s}'::text" for s in GALLERY_SPLITS) + "]" in args

    def index_scans():
        conn.execute("SELECT pg_stat_force_next_flush()")
        return conn.execute("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = %s",
                            (pgvector_hnsw.index_name(mid),)).fetchone()[0]

    before = index_scans()
    with conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")
        assert len(conn.execute("SELECT * FROM medsim.search_by_vector(%s, 5)", (v,)).fetchall()) == 5
    assert index_scans() > before


# ---------------------------------------------------------------- 7. status without models x images
CROSS_PRODUCT_STATUS = """
SELECT m.id, d.flag, count(*)::bigint, count(e.image_id)::bigint,
       count(*) FILTER (WHERE e.image_id IS NULL AND q.failed_at IS NULL)::bigint,
       count(q.failed_at)::bigint,
       min(coalesce(q.enqueued_at, i.created_at)) FILTER (WHERE e.image_id IS NULL AND q.failed_at IS NULL)
FROM medsim.models m CROSS JOIN medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id
LEFT JOIN medsim.embeddings e ON e.model_id = m.id AND e.image_id = i.id
LEFT JOIN medsim.embedding_queue q ON q.model_id = m.id AND q.image_id = i.id
GROUP BY m.id, d.flag ORDER BY 1, 2
"""


def status_now(conn):
    return [(r.model_id, r.dataset, r.total, r.embedded, r.pending, r.failed, r.oldest_pending)
            for r in queue.status(conn)]


def test_status_view_equals_the_cross_product_definition(conn, synth_dir, db_url):
    """The old definition (every model x every image) is the reference; the view must give
    the same rows in every state: nothing queued, partly embedded, failures, a second model
    never enqueued, images added after the embedding."""
    ingest_synth(conn, synth_dir, flags=("breastmnist",))
    m1 = register_model(conn)
    assert status_now(conn) == conn.execute(CROSS_PRODUCT_STATUS).fetchall()
    conn.execute("DELETE FROM medsim.embedding_queue WHERE image_id % 3 = 0")  # some never queued
    assert status_now(conn) == conn.execute(CROSS_PRODUCT_STATUS).fetchall()
    embed_all(db_url)
    register_model(conn, current=False, seed=4)  # a model no worker serves
    conn.execute("INSERT INTO medsim.embedding_queue (model_id, image_id, attempts, last_error, failed_at) "
                 "SELECT %s, id, 3, 'broken', now() FROM medsim.images WHERE id %% 50 = 0 "
                 "ON CONFLICT DO NOTHING", (m1,))
    conn.execute("DELETE FROM medsim.embeddings WHERE model_id = %s AND image_id %% 50 = 0", (m1,))
    ingest_synth(conn, synth_dir, flags=("retinamnist",))  # newer than the last enqueue
    got = status_now(conn)
    assert got == conn.execute(CROSS_PRODUCT_STATUS).fetchall()
    assert any(r[5] > 0 for r in got) and any(r[4] > 0 and r[6] is not None for r in got)


# ---------------------------------------------------------------- 8. a CLI that imports what it uses
PROBE = ("import sys\nfrom medsim import cli\ncode = cli.main(sys.argv[1:])\n"
         "print('IMPORTED', sorted(m for m in ('torch', 'faiss') if m in sys.modules))\nsys.exit(code)\n")


def imported_by(args, db_url, cwd) -> list[str]:
    p = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120,
                       cwd=cwd, env={**os.environ, "DATABASE_URL": db_url})
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1].split(" ", 1)[1].replace("'", '"'))


def test_commands_that_need_no_model_import_neither_torch_nor_faiss(embedded, db_url, tmp_path):
    conn, mid = embedded
    gid = conn.execute("SELECT min(image_id) FROM medsim.gallery").fetchone()[0]
    faiss_index.build(conn, mid, "flat", out_dir=tmp_path)
    for args in (["search", "--image-id", str(gid), "-k", "3"], ["status"], ["models"], ["index", "list"],
                 ["db", "status"]):
        assert imported_by(args, db_url, tmp_path) == [], args
    # and those that do need them still work
    assert imported_by(["search", "--image-id", str(gid), "--engine", "faiss"], db_url, tmp_path) == ["faiss"]


def test_search_by_file_imports_no_torch_once_an_onnx_export_is_kept(embedded, db_url, tmp_path):
    """Issue 34 (9): the worker keeps its checked ONNX export; a search by file embeds through
    it with ONNX Runtime alone (torch cost 2-7 s of every such search). Without an export the
    CLI still works through torch, and keeps one for the next search."""
    from PIL import Image

    from medsim import registry
    from medsim.model import runtime

    conn, mid = embedded
    kept = runtime.export_path(registry.get(conn, mid).checkpoint_sha256(conn))
    assert kept.exists()  # the worker (embed_all) wrote it
    img = tmp_path / "q.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30), np.uint8)).save(img)
    query = ["search", "--image-file", str(img), "-k", "5", "--json"]
    assert imported_by(query, db_url, tmp_path) == []
    by_onnx = answer(query, db_url, tmp_path)
    kept.unlink()
    assert "torch" in imported_by(query, db_url, tmp_path)  # nothing kept: torch, then keeps it
    assert kept.exists() and imported_by(query, db_url, tmp_path) == []
    by_torch = answer(query, db_url, tmp_path, MEDSIM_RUNTIME="torch")
    assert [h["image_id"] for h in by_onnx["neighbours"]] == [h["image_id"] for h in by_torch["neighbours"]]
    assert [h["distance"] for h in by_onnx["neighbours"]] == pytest.approx(
        [h["distance"] for h in by_torch["neighbours"]], abs=1e-4)


def answer(args, db_url, cwd, **env) -> dict:
    p = subprocess.run([sys.executable, "-m", "medsim.cli", *args], capture_output=True, text=True, timeout=120,
                       cwd=cwd, env={**os.environ, "DATABASE_URL": db_url, **env})
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)[0]


def test_ingest_summary_and_index_list_read_named_rows(embedded, tmp_path, capsys):
    conn, mid = embedded
    assert [(c.flag, c.split, c.n) for c in ingest.summary(conn, ["BreastMNIST"], 28)] == [
        ("breastmnist", "train", 546), ("breastmnist", "val", 78), ("breastmnist", "test", 156)]
    assert cli.main(["index", "list"]) == 0
    assert "no FAISS index builds yet" in capsys.readouterr().out
    faiss_index.build(conn, mid, "hnsw", out_dir=tmp_path)
    assert cli.main(["index", "list", "--model", "current"]) == 0
    assert f"model {mid}" in capsys.readouterr().out
