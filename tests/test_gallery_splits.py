"""Which splits form the gallery is a request option: every split by default (everything a
person may see, and what FAISS builds hold), train + val, or train alone for the
evaluation protocol; the same answer from every engine and door, and one sentence for what cannot be."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from medsim import cli
from medsim.errors import BadArgument, NotFound
from medsim.search import faiss_index
from medsim.search.request import Filters
from medsim.service.app import create_app
from medsim.service.state import ServeConfig
from tests.helpers import search

ALL = ("train", "val", "test")


def a_test_image(conn) -> int:
    return conn.execute("SELECT id FROM medsim.images WHERE split = 'test' ORDER BY id LIMIT 1").fetchone()[0]


def test_the_splits_a_search_looks_among(embedded):
    conn, mid = embedded
    q = a_test_image(conn)
    [(query, default)] = search(conn, [q], k=40)
    assert "test" in {h.split for h in default} and q not in {h.image_id for h in default}  # never itself
    assert query.in_gallery == [q]  # a test image is in the default gallery
    [(_, every)] = search(conn, [q], k=40, filters=Filters(splits="train,val,test"))
    assert [h.image_id for h in every] == [h.image_id for h in default]
    [(query, trainval)] = search(conn, [q], k=40, filters=Filters(splits="train,val"))
    assert {h.split for h in trainval} == {"train", "val"} and query.in_gallery == []
    [(_, train)] = search(conn, [q], k=40, filters=Filters(splits=("train",)))
    assert {h.split for h in train} == {"train"}
    # pgvector (HNSW) and exact agree on every split set: the same function, one rule
    for splits in ("train,val,test", "train,val", "train"):
        [(_, a)] = search(conn, [q], k=10, filters=Filters(splits=splits), engine="exact")
        [(_, b)] = search(conn, [q], k=10, filters=Filters(splits=splits))
        assert [h.image_id for h in a] == [h.image_id for h in b]
    # plain SQL: the function's splits argument, every split when it is left out
    vec = "(SELECT embedding FROM medsim.embeddings WHERE image_id = %s)"
    got = conn.execute(f"SELECT split FROM medsim.search_gallery({vec}, 40, %s, '{{}}', NULL, %s, NULL, "
                       "ARRAY['test'])", (q, mid, q)).fetchall()
    assert got and {s for (s,) in got} == {"test"}
    got = conn.execute(f"SELECT image_id FROM medsim.search_gallery({vec}, 40, %s, '{{}}', NULL, %s)",
                       (q, mid, q)).fetchall()
    assert [i for (i,) in got] == [h.image_id for h in default]


def test_faiss_answers_only_for_the_splits_it_was_built_over(embedded, tmp_path):
    conn, mid = embedded
    q = a_test_image(conn)
    faiss_index.build(conn, mid, "flat", out_dir=tmp_path)  # every split, the default
    with pytest.raises(NotFound, match=r"no FAISS index over train, val built for model \d+ \(its builds hold "
                                       r"train, val, test\): run "
                                       r"`medsim index build --splits train,val`"):
        search(conn, [q], k=5, engine="faiss", filters=Filters(splits="train,val"))
    for splits in (ALL, ("train", "val")):
        faiss_index.build(conn, mid, "flat", out_dir=tmp_path, splits=splits)
        [(_, f)] = search(conn, [q], k=8, engine="faiss", filters=Filters(splits=splits))
        [(_, e)] = search(conn, [q], k=8, engine="exact", filters=Filters(splits=splits))
        assert [h.image_id for h in f] == [h.image_id for h in e] and q not in [h.image_id for h in f]


def test_bad_splits_are_one_sentence(embedded, capsys):
    conn, _ = embedded
    for bad in ("", "holdout", ("train", "nope")):
        with pytest.raises(BadArgument, match="splits must be some of train, val, test"):
            Filters(splits=bad)
    with pytest.raises(BadArgument, match="this search's gallery holds only train; split val is never returned"):
        Filters({"split": "val"}, splits="train")
    assert cli.main(["search", "--image-id", str(a_test_image(conn)), "--splits", "test,", "--split", "test"]) == 0
    assert " test " in capsys.readouterr().out
    assert cli.main(["search", "--image-id", "1", "--splits", "everything"]) == 2
    assert "splits must be some of train, val, test" in capsys.readouterr().err


def test_over_http(embedded, db_url):
    conn, _ = embedded
    q = a_test_image(conn)
    with TestClient(create_app(ServeConfig(auth=False, database_url=db_url))) as client:
        r = client.post("/search", json={"image_id": q, "k": 40, "splits": "train,val,test"})
        assert r.status_code == 200 and "test" in {n["split"] for n in r.json()["neighbours"]}
        every = r.json()["neighbours"]
        r = client.post("/search", json={"image_id": q, "k": 40})
        assert r.json()["neighbours"] == every
        r = client.post("/search", json={"image_id": q, "k": 40, "splits": "train,val"})
        assert {n["split"] for n in r.json()["neighbours"]} == {"train", "val"}
        r = client.post("/search", json={"image_id": q, "k": 4, "splits": "holdout"})
        assert r.status_code == 400 and "splits must be some of" in r.json()["detail"]
