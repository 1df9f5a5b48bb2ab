"""Issue 34 (4): an archive still being embedded is not an empty one.

A search filtered to a dataset the model has not embedded says how many of its images wait
for `medsim worker` instead of "no image matches"; a search that succeeds while part of the
filtered gallery is not embedded says how many images it could not see; `medsim status`
and /status say the same sentence; a user hears only of datasets they may see; and once
everything is embedded, nothing is said.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from medsim import access, cli, queue
from medsim.service.app import create_app
from medsim.service.state import ServeConfig
from medsim.sources import archive
from medsim.sources.folder import FolderSource
from tests.helpers import embed_all

N_CXR = 24


@pytest.fixture
def cxr(embedded, tmp_path):
    """breastmnist and retinamnist embedded for the current model, then a folder archive
    `cxr` of N_CXR images ingested after the worker ran: on file, embedded for nothing."""
    conn, mid = embedded
    rng = np.random.default_rng(5)
    for label in ("normal", "pneumonia"):
        (tmp_path / "cxr" / label).mkdir(parents=True)
        for i in range(N_CXR // 2):
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / "cxr" / label / f"{i}.png")
    assert archive.ingest_archive(conn, FolderSource(tmp_path / "cxr"), "cxr", progress=False).added == N_CXR
    return conn, mid


def sentence(missing: int, mid: int, total: int = N_CXR) -> str:
    return f"{missing} of {total} images of cxr are not embedded yet for model {mid} (run `medsim worker`)"


def breast_query(conn) -> int:
    return conn.execute("SELECT min(i.id) FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id "
                        "WHERE d.flag = 'breastmnist' AND i.split = 'test'").fetchone()[0]


def embed_some(conn, mid: int, n: int) -> None:
    """What a worker stopped part way leaves: every image queued, n of cxr's embedded."""
    queue.enqueue(conn, mid)
    ids = [r[0] for r in conn.execute("SELECT i.id FROM medsim.images i JOIN medsim.datasets d "
                                      "ON d.id = i.dataset_id WHERE d.flag = 'cxr' ORDER BY i.id LIMIT %s", (n,))]
    dim = conn.execute("SELECT embedding_dim FROM medsim.models WHERE id = %s", (mid,)).fetchone()[0]
    v = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    with conn.transaction():
        queue.lock_for_write(conn, mid)
        queue.write_embeddings(conn, mid, ids, v / np.linalg.norm(v, axis=1, keepdims=True))
        queue.dequeue(conn, mid, ids)


def search_json(capsys, *args) -> dict:
    assert cli.main(["search", *args, "--json"]) == 0
    [res] = json.loads(capsys.readouterr().out)
    return res


def test_cli_says_what_is_not_embedded_instead_of_no_match(cxr, capsys):
    conn, mid = cxr
    qid = breast_query(conn)
    assert cli.main(["search", "--image-id", str(qid), "--dataset", "cxr"]) == 0
    out = capsys.readouterr().out
    assert sentence(N_CXR, mid) in out
    assert "no image on file matches" not in out
    res = search_json(capsys, "--image-id", str(qid), "--dataset", "cxr")
    assert res["neighbours"] == [] and res["notes"] == [sentence(N_CXR, mid)]
    # a search of the whole gallery finds neighbours, and says what it could not see
    res = search_json(capsys, "--image-id", str(qid))
    assert len(res["neighbours"]) == 4
    assert res["notes"] == ["not searched: " + sentence(N_CXR, mid)]
    # medsim status says it in the same words
    assert cli.main(["status"]) == 0
    assert sentence(N_CXR, mid) in capsys.readouterr().out


def test_cli_half_embedded_then_complete(cxr, capsys, db_url):
    conn, mid = cxr
    qid = breast_query(conn)
    embed_some(conn, mid, 10)
    res = search_json(capsys, "--image-id", str(qid), "--dataset", "cxr", "-k", "4")
    assert len(res["neighbours"]) == 4 and {n["dataset"] for n in res["neighbours"]} == {"cxr"}
    assert res["notes"] == ["not searched: " + sentence(N_CXR - 10, mid)]
    # a filter on a dataset that is complete hears nothing of cxr
    res = search_json(capsys, "--image-id", str(qid), "--dataset", "breastmnist")
    assert res["notes"] == []
    # a label filter that matches none of what is embedded: not "no image matches" alone
    assert cli.main(["search", "--image-id", str(qid), "--dataset", "cxr", "--label", "nothing-like-it"]) == 0
    out = capsys.readouterr().out
    assert "no embedded image matches the filter dataset=cxr, label=nothing-like-it; " + sentence(N_CXR - 10, mid) \
        in out
    assert cli.main(["status"]) == 0
    assert sentence(N_CXR - 10, mid) in capsys.readouterr().out

    embed_all(db_url)
    res = search_json(capsys, "--image-id", str(qid), "--dataset", "cxr")
    assert len(res["neighbours"]) == 4 and res["notes"] == []
    assert cli.main(["status"]) == 0
    assert "not embedded yet" not in capsys.readouterr().out


def test_an_empty_gallery_with_images_on_file_says_so(conn, tmp_path):
    """Nothing embedded at all: the 404 names the images waiting, not an empty archive."""
    from medsim.errors import NotFound
    from tests.helpers import register_model, search

    rng = np.random.default_rng(1)
    (tmp_path / "a" / "x").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(tmp_path / "a" / "x" / f"{i}.png")
    archive.ingest_archive(conn, FolderSource(tmp_path / "a"), "cxr", progress=False)
    mid = register_model(conn)
    qid = conn.execute("SELECT min(id) FROM medsim.images").fetchone()[0]
    with pytest.raises(NotFound, match=r"^the gallery is empty for model \d+: 6 of 6 images of cxr are not "
                                       r"embedded yet for model \d+ \(run `medsim worker`\)$"):
        search(conn, [qid], dataset="cxr", model_ref=mid)


@pytest.fixture
def users(cxr):
    """A user granted cxr, one granted breastmnist only: (conn, mid, headers by user)."""
    conn, mid = cxr
    headers = {}
    for name, grants in (("ward", ["cxr", "breastmnist"]), ("breast", ["breastmnist"])):
        access.add_user(conn, name)
        access.grant(conn, name, grants)
        headers[name] = {"Authorization": "Bearer " + access.create_token(conn, name)[0]}
    return conn, mid, headers


def test_http_notes_status_and_grants(users, db_url):
    """Each step on a service of its own: the service keeps its count a few seconds."""
    conn, mid, h = users
    qid = breast_query(conn)
    with TestClient(create_app(ServeConfig(database_url=db_url))) as client:
        r = client.post("/search", json={"image_id": qid, "filters": {"dataset": "cxr"}}, headers=h["ward"])
        assert r.status_code == 200, r.text
        assert r.json()["neighbours"] == [] and r.json()["notes"] == [sentence(N_CXR, mid)]
        r = client.post("/search", json={"image_id": qid}, headers=h["ward"])
        assert r.json()["neighbours"] and r.json()["notes"] == ["not searched: " + sentence(N_CXR, mid)]
        # a user who may not see cxr hears nothing of it, in search or status
        r = client.post("/search", json={"image_id": qid}, headers=h["breast"])
        assert r.status_code == 200 and r.json()["notes"] == []
        assert "cxr" not in client.get("/status", headers=h["breast"]).text
        notes = {s["dataset"]: s.get("note") for s in client.get("/status", headers=h["ward"]).json()}
        assert notes == {"cxr": sentence(N_CXR, mid), "breastmnist": None}

    embed_some(conn, mid, 10)
    with TestClient(create_app(ServeConfig(database_url=db_url))) as client:
        r = client.post("/search", json={"image_id": qid, "filters": {"dataset": "cxr"}}, headers=h["ward"])
        assert len(r.json()["neighbours"]) == 4 and r.json()["notes"] == ["not searched: " + sentence(N_CXR - 10, mid)]

    embed_all(db_url)
    with TestClient(create_app(ServeConfig(database_url=db_url))) as client:
        r = client.post("/search", json={"image_id": qid, "filters": {"dataset": "cxr"}}, headers=h["ward"])
        assert len(r.json()["neighbours"]) == 4 and r.json()["notes"] == []
        assert all(s["note"] is None for s in client.get("/status", headers=h["ward"]).json())


def test_the_service_counts_once_per_interval(users, db_url, monkeypatch):
    """Every search asks what is not embedded: the service counts once per interval for
    all users, not once per search."""
    conn, mid, h = users
    calls = []
    counted = queue.not_embedded
    monkeypatch.setattr(queue, "not_embedded", lambda *a: calls.append(a) or counted(*a))
    qid = breast_query(conn)
    with TestClient(create_app(ServeConfig(database_url=db_url))) as client:
        for who in ("ward", "breast", "ward"):
            assert client.post("/search", json={"image_id": qid}, headers=h[who]).status_code == 200
    assert len(calls) == 1
