import json
import threading
import time

import numpy as np
import pytest

from medsim.errors import StaleIndex
from medsim.search import faiss_index, recall
from tests.helpers import embed_all, register_model


def gallery(conn, mid):
    rows = conn.execute("SELECT image_id, embedding FROM medsim.gallery WHERE model_id = %s ORDER BY image_id",
                        (mid,)).fetchall()
    return np.array([r[0] for r in rows]), np.stack([r[1].to_numpy() for r in rows])


def test_tie_aware_recall_on_constructed_vectors():
    # four gallery points at distance 1 from the query, one at distance 2
    ids = np.array([10, 11, 12, 13, 14])
    xb = np.array([[1, 0], [0, 1], [-1, 0], [0, -1], [2, 0]], np.float32)
    xq = np.zeros((1, 2), np.float32)
    D_gt = np.array([[1.0, 1.0]])  # exact top-2 distances
    # any two of the four tied points are a perfect answer
    assert recall.tie_aware_recall(xq, np.array([[13, 12]]), D_gt, ids, xb, 2) == 1.0
    # the far point does not count; a repeated id counts once; -1 (no result) is a miss
    assert recall.tie_aware_recall(xq, np.array([[10, 14]]), D_gt, ids, xb, 2) == 0.5
    assert recall.tie_aware_recall(xq, np.array([[10, 10]]), D_gt, ids, xb, 2) == 0.5
    assert recall.tie_aware_recall(xq, np.array([[-1, 11]]), D_gt, ids, xb, 2) == 0.5


def test_drop_self_leaves_each_query_out_of_its_own_answer():
    I = np.array([[7, 3, 5], [4, 8, 9], [1, 2, 6]])  # k + 1 = 3 results for queries 3, 4 and 99
    D = np.array([[0.5, 0.0, 0.7], [0.0, 0.2, 0.3], [0.1, 0.2, 0.3]])
    kept, dist = recall.drop_self(I, D, np.array([3, 4, 99]), 2)
    assert kept.tolist() == [[7, 5], [8, 9], [1, 2]]  # 99 is not in its answer: the farthest goes
    assert dist.tolist() == [[0.5, 0.7], [0.2, 0.3], [0.1, 0.2]]


def test_flat_recall_is_exactly_one_and_pgvector_agrees(embedded, tmp_path):
    conn, mid = embedded
    b = faiss_index.build(conn, mid, "flat", out_dir=tmp_path)
    # every split, the default gallery: the test queries are in it, and each is left out of its own answer
    assert b.meta["n_rows"] == 546 + 78 + 156 + 1080 + 120 + 400 and b.meta["source_view"] == "medsim.gallery"
    assert (tmp_path / "indexes" / f"model{mid}-flat-build{b.meta['build_id']}.faiss.json").exists()
    r = recall.report(conn, [b], ks=(1, 10, 100), ef_searches=(40,))
    by = {(row["engine"], row["kind"]): row for row in r["rows"]}
    assert by[("faiss", "flat")]["recall"] == {"1": 1.0, "10": 1.0, "100": 1.0}
    assert by[("pgvector", "exact")]["recall"]["100"] == 1.0
    assert 0.9 <= by[("pgvector", "hnsw")]["recall"]["10"] <= 1.0
    assert by[("pgvector", "hnsw")]["plan_uses_hnsw"] is True
    assert r["n_queries"] == 156 + 400 and r["queries_in_gallery"] is True
    assert "each query's own image left out" in recall.format_table(r)
    stored = conn.execute("SELECT build_ids FROM medsim.recall_reports WHERE id = %s",
                          (r["report_id"],)).fetchone()[0]
    assert stored == [b.meta["build_id"]]
    assert "faiss" in recall.format_table(r)


def test_bad_index_recall_is_below_one_and_correct(embedded, tmp_path):
    conn, mid = embedded
    b = faiss_index.build(conn, mid, "ivfpq", {"nlist": 1, "M": 1, "nbits": 2, "nprobe": 1}, out_dir=tmp_path)
    r = recall.report(conn, [b], ks=(10,), ef_searches=())
    got = next(row for row in r["rows"] if row["engine"] == "faiss")["recall"]["10"]
    assert got < 0.5
    # the same number, computed independently: plain set intersection with brute force
    ids, xb = gallery(conn, mid)
    q = conn.execute("SELECT image_id, embedding FROM medsim.query_images WHERE model_id = %s ORDER BY image_id",
                     (mid,)).fetchall()
    qids, xq = np.array([v[0] for v in q]), np.stack([v[1].to_numpy() for v in q])
    d = ((xq[:, None, :] - xb[None]) ** 2).sum(-1)
    d[ids[None, :] == qids[:, None]] = np.inf  # the queries are in the gallery: never their own neighbour
    true = ids[np.argsort(d, axis=1)[:, :10]]
    _, I = faiss_index.search(b.index, xq, 11)
    found = [[i for i in row if i != qid][:10] for row, qid in zip(I, qids, strict=True)]
    expected = np.mean([len(set(t) & set(i)) / 10 for t, i in zip(true, found, strict=True)])
    assert got == pytest.approx(expected, abs=2e-3)  # only exact float ties could differ


def test_stale_index_is_refused_and_says_why(embedded, tmp_path, db_url):
    conn, mid = embedded
    b = faiss_index.build(conn, mid, "flat", out_dir=tmp_path)
    faiss_index.load(conn, b.path)  # fresh: fine
    conn.execute("DELETE FROM medsim.images WHERE id = (SELECT min(image_id) FROM medsim.gallery)")
    with pytest.raises(StaleIndex, match=r"database now has 2379 \(-1\)"):
        faiss_index.load(conn, b.path)
    b = faiss_index.build(conn, mid, "flat", out_dir=tmp_path)
    conn.execute("UPDATE medsim.embeddings SET embedding = embedding WHERE false")
    conn.execute("UPDATE medsim.embeddings e SET embedding = (SELECT embedding FROM medsim.embeddings "
                 "WHERE model_id = e.model_id ORDER BY image_id DESC LIMIT 1) "
                 "WHERE image_id = (SELECT min(image_id) FROM medsim.gallery)")
    with pytest.raises(StaleIndex, match="re-embedded or replaced"):
        faiss_index.load(conn, b.path)
    rebuilt = faiss_index.load(conn, b.path, rebuild_if_stale=True)
    assert rebuilt.meta["build_id"] > b.meta["build_id"]
    mid2 = register_model(conn, seed=3)
    with pytest.raises(StaleIndex, match=f"built for model {mid}, not model {mid2}"):
        faiss_index.load(conn, b.path, model_ref=mid2)


def test_builds_to_one_file_take_turns_and_the_newest_is_searched(embedded, tmp_path, db_url, monkeypatch):
    """Issue 34 (7): two builds told to write the same file, the second started while the
    first writes. They take their ids and write in turn, so the file holds the newer build
    (by id), the one a search opens; the older build's row says what to run."""
    from medsim import db

    conn, mid = embedded
    out = tmp_path / "same.faiss"
    writing, real = threading.Event(), faiss_index.file_sha256

    def slow_for_the_first(path):  # the first build is between its id and its rename
        if threading.current_thread().name == "first":
            writing.set()
            time.sleep(1.0)
        return real(path)

    monkeypatch.setattr(faiss_index, "file_sha256", slow_for_the_first)
    done = {}

    def first():
        with db.connect(db_url, autocommit=True) as c:
            done["first"] = faiss_index.build(c, mid, "flat", out=out)

    t = threading.Thread(target=first, name="first")
    t.start()
    assert writing.wait(60)
    second = faiss_index.build(conn, mid, "flat", out=out)
    t.join(60)
    ids = (done["first"].meta["build_id"], second.meta["build_id"])
    assert ids[0] < ids[1]
    assert faiss_index.latest_build(conn, mid) == ids[1]
    assert faiss_index.load_build(conn, ids[1]).meta["build_id"] == ids[1]  # the file is the newest build's
    with pytest.raises(StaleIndex, match=rf"now holds build {ids[1]} .* `medsim index build --model {mid} --kind flat`"):
        faiss_index.load_build(conn, ids[0])
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    # a flat build overwritten by an hnsw one: the fix rebuilds the flat one it was
    hnsw = faiss_index.build(conn, mid, "hnsw", out=out).meta["build_id"]
    with pytest.raises(StaleIndex, match=rf"now holds build {hnsw} .*\. Rebuild it: `medsim index build --model {mid} "
                                         r"--kind flat`\.$"):
        faiss_index.load_build(conn, ids[1])


def test_ids_map_to_images_after_deletes_and_reinserts(embedded, tmp_path, db_url):
    conn, mid = embedded
    deleted = [r[0] for r in conn.execute(
        "SELECT image_id FROM medsim.gallery WHERE model_id = %s ORDER BY image_id LIMIT 50", (mid,))]
    conn.execute("DELETE FROM medsim.images WHERE id = ANY(%s)", (deleted,))
    # re-insert copies of five other images under new split indexes: new ids, same pixels
    conn.execute("INSERT INTO medsim.images (dataset_id, split, split_index, labels, height, width, channels, "
                 "pixels, sha256) SELECT dataset_id, split, split_index + 100000, labels, height, width, "
                 "channels, pixels, sha256 FROM medsim.images WHERE split = 'val' ORDER BY id LIMIT 5")
    embed_all(db_url)
    # the untrained model puts every synthetic image within 1e-3 of the others, under FAISS's
    # float32 error: spread the stored vectors so "nearest is itself" is a sharp check
    rng = np.random.default_rng(0)
    with conn.cursor() as cur:
        cur.executemany("UPDATE medsim.embeddings SET embedding = %s WHERE model_id = %s AND image_id = %s",
                        [(rng.standard_normal(64).astype(np.float32), mid, i) for (i,) in conn.execute(
                            "SELECT image_id FROM medsim.embeddings WHERE model_id = %s", (mid,)).fetchall()])
    b = faiss_index.build(conn, mid, "flat", out_dir=tmp_path)
    ids, xb = gallery(conn, mid)
    _, I = faiss_index.search(b.index, xb, 1)
    copies = conn.execute("SELECT count(*) FROM (SELECT sha256 FROM medsim.images GROUP BY sha256 "
                          "HAVING count(*) > 1) c").fetchone()[0]
    assert copies == 5 and len(ids) == 2380 - 50 + 5
    assert not set(I[:, 0]) & set(deleted)
    assert (I[:, 0] == ids).all()  # every vector's nearest is itself: each FAISS id is its image's


def test_exact_search_settings_do_not_leak(embedded, db_url):
    from medsim import db

    conn, mid = embedded
    with db.connect(db_url) as c:  # not autocommit: the block below is only a savepoint
        c.execute("SELECT 1")
        xq = np.zeros((2, 64), np.float32)
        recall.pgvector_search(c, mid, 64, xq, 3, ["train", "val"], exact=True)
        assert c.execute("SHOW enable_indexscan").fetchone()[0] == "on"


def test_cli_build_recall_and_stale_refusal(embedded, tmp_path, capsys):
    from medsim import cli

    conn, mid = embedded
    path = tmp_path / "ix.faiss"
    assert cli.main(["index", "build", "--kind", "ivfflat", "--param", "nlist=8", "--out", str(path)]) == 0
    assert "built ivfflat index of 2380 vectors" in capsys.readouterr().out
    out_json = tmp_path / "r.json"
    assert cli.main(["recall", "--index", str(path), "-k", "1,10", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "faiss     ivfflat" in text and "pgvector  exact" in text
    assert json.loads(out_json.read_text())["ks"] == [1, 10]
    conn.execute("DELETE FROM medsim.images WHERE id = (SELECT max(image_id) FROM medsim.gallery)")
    assert cli.main(["recall", "--index", str(path)]) == 2
    assert "is stale" in capsys.readouterr().err
    assert cli.main(["recall", "--index", str(path), "--rebuild", "-k", "5", "--json", str(out_json)]) == 0
    assert cli.main(["recall", "-k", "0"]) == 2


@pytest.mark.parametrize("kind, params, message", [
    ("hnsw", {"foo": 1}, "unknown parameter(s) foo for a hnsw index; known: M, efConstruction, efSearch"),
    ("flat", {"nlist": 4}, "unknown parameter(s) nlist for a flat index; known: none"),
    ("ivfflat", {"nlist": 5000}, "nlist=5000 is more lists than the 2380 vectors"),
    ("ivfflat", {"nprobe": 0}, "must be positive integers: nprobe=0"),
    ("ivfpq", {"nprobe": 1.5}, "must be positive integers: nprobe=1.5"),
    ("seed", {"nbits": 20}, "nbits=20 must be between 1 and 16"),
])
def test_bad_index_parameters_are_refused_before_anything_is_written(embedded, tmp_path, kind, params,
                                                                     message):
    conn, mid = embedded
    before = conn.execute("SELECT count(*) FROM medsim.index_builds").fetchone()[0]
    with pytest.raises(ValueError) as err:
        faiss_index.build(conn, mid, kind, params=params, out=tmp_path / "x.faiss")
    assert message in str(err.value)
    assert not (tmp_path / "x.faiss").exists()
    assert conn.execute("SELECT count(*) FROM medsim.index_builds").fetchone()[0] == before


def test_hnsw_settings_are_real_and_fill_k(embedded):
    """The recall measurement sets pgvector's own GUCs (a misspelt dotted name is silently
    accepted as a custom variable: iterative scans were then off, and HNSW returned a third
    of k=100 rows once the split filter dropped the test images)."""
    conn, mid = embedded
    from medsim.search import pgvector_hnsw

    pgvector_hnsw.ensure(conn, mid, 64)
    xq = np.stack([r[0].to_numpy() for r in conn.execute(
        "SELECT embedding FROM medsim.query_images WHERE model_id = %s ORDER BY image_id LIMIT 20", (mid,))])
    D, I, _, used = recall.pgvector_search(conn, mid, 64, xq.astype(np.float32), 100, ["train", "val"],
                                           exact=False, ef_search=10)
    assert used and (I >= 0).all()
    gallery = {r[0] for r in conn.execute("SELECT image_id FROM medsim.gallery WHERE model_id = %s", (mid,))}
    assert set(I.ravel()) <= gallery
    assert conn.execute("SELECT name FROM pg_settings WHERE name LIKE 'hnsw.%%' ORDER BY 1").fetchall() == [
        ("hnsw.ef_search",), ("hnsw.iterative_scan",), ("hnsw.max_scan_tuples",), ("hnsw.scan_mem_multiplier",)]


def test_a_single_faiss_query_runs_on_one_thread_and_answers_as_a_batch():
    """One query on one OpenMP thread (a barrier waiting for a descheduled thread cost
    7.5 ms per query on a busy machine), the thread count given back, and the same answer
    as in a batch."""
    import faiss
    import numpy as np

    from medsim.search import faiss_index

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((2000, 16)).astype(np.float32)
    index = faiss.IndexIDMap2(faiss.IndexFlatL2(16))
    index.add_with_ids(xb, np.arange(2000, dtype=np.int64) + 100)
    xq = rng.standard_normal((5, 16)).astype(np.float32)
    before = faiss.omp_get_max_threads()
    batch = faiss_index.search(index, xq, 7)
    for i in range(5):
        D, I = faiss_index.search(index, xq[i : i + 1], 7)
        assert (I[0] == batch[1][i]).all() and np.allclose(D[0], batch[0][i])
    assert faiss.omp_get_max_threads() == before
