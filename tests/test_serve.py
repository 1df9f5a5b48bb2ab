"""medsim serve's JSON API, in process (FastAPI's TestClient) against a real Postgres.

Every answer is checked against what the database says (the SQL search function, the
stored pixels), and every refusal by its status and by naming the problem.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from medsim.search import faiss_index
from medsim.service.app import create_app
from medsim.service.state import ServeConfig
from tests.helpers import embed_all


@pytest.fixture
def api(embedded, db_url):
    conn, mid = embedded
    app = create_app(ServeConfig(auth=False, database_url=db_url, max_upload_bytes=2 * 1024 * 1024,
                                 max_image_pixels=4_000_000))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, conn, mid


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def stored_pixels(conn, image_id) -> np.ndarray:
    data, h, w = conn.execute("SELECT pixels, height, width FROM medsim.images WHERE id = %s", (image_id,)).fetchone()
    return np.frombuffer(data, np.uint8).reshape(h, w)


def gallery_id(conn):
    return conn.execute("SELECT min(image_id) FROM medsim.gallery").fetchone()[0]


def sql_neighbours(conn, image_id, k, **filters):
    import json

    return [r[0] for r in conn.execute("SELECT image_id FROM medsim.similar_images(%s, %s, NULL, NULL, %s)",
                                       (image_id, k, json.dumps(filters))).fetchall()]


def test_search_by_id_is_the_sql_answer_with_thumbnails(api):
    client, conn, mid = api
    gid = gallery_id(conn)
    r = client.post("/search", json={"image_id": gid, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [n["image_id"] for n in body["neighbours"]]
    assert ids == sql_neighbours(conn, gid, 5) and gid not in ids
    assert body["model"]["id"] == mid and body["engine"] == "pgvector"
    assert body["query"] == {"kind": "image_id", "label": f"image {gid}", "image_id": gid,
                             "dataset": body["query"]["dataset"], "label_name": body["query"]["label_name"],
                             "label_names": [body["query"]["label_name"]], "in_gallery": [gid],
                             "handle": None, "preview_url": None, "size": None}
    dists = [n["distance"] for n in body["neighbours"]]
    assert dists == sorted(dists)
    n0 = body["neighbours"][0]
    assert n0["thumbnail_url"] == f"/images/{n0['image_id']}/thumbnail.png" and n0["rank"] == 1
    same = (n0["label_name"] == body["query"]["label_name"]) and n0["dataset"] == body["query"]["dataset"]
    assert n0["same_label"] is same
    # exact agrees with HNSW-or-exact here; the filters narrow what comes back
    r = client.post("/search", json={"image_id": gid, "k": 5, "engine": "exact"})
    assert [n["image_id"] for n in r.json()["neighbours"]] == ids
    r = client.post("/search", json={"image_id": gid, "k": 4, "filters": {"dataset": "retinamnist"}})
    assert {n["dataset"] for n in r.json()["neighbours"]} == {"retinamnist"}
    assert [n["image_id"] for n in r.json()["neighbours"]] == sql_neighbours(conn, gid, 4, dataset="retinamnist")
    # max_distance keeps only the close ones, and says how many it dropped
    cut = dists[2]
    r = client.post("/search", json={"image_id": gid, "k": 5, "max_distance": cut})
    assert [n["distance"] <= cut for n in r.json()["neighbours"]] == [True] * 3
    assert "2 of 5 neighbours were farther" in r.json()["notes"][0]
    # every neighbour beyond max_distance: no neighbours, and no vote of "3 of 3"
    r = client.post("/search", json={"image_id": gid, "k": 3, "max_distance": 0})
    assert r.status_code == 200 and r.json()["neighbours"] == [] and r.json()["vote"] is None
    # a filter that matches nothing: 200, no neighbours, one sentence; a mistyped key names the known ones
    r = client.post("/search", json={"image_id": gid, "k": 3, "filters": {"dataset": "dermamnist"}})
    assert r.status_code == 200 and r.json()["neighbours"] == [] and r.json()["vote"] is None
    assert r.json()["notes"] == ["no image on file matches the filter dataset=dermamnist"]
    r = client.post("/search", json={"image_id": gid, "k": 3, "filters": {"datset": "breastmnist"}})
    assert r.status_code == 400
    assert r.json()["detail"].startswith("unknown filter key 'datset'; the keys on file are dataset, split, label")


def test_search_by_upload_and_by_vector(api):
    client, conn, mid = api
    gid = gallery_id(conn)
    # the upload is a gallery image: recognised as itself by its pixels, not by its name,
    # and sniffed by content (a .txt name and a text/plain type do not matter)
    files = {"image": ("notes.txt", png(stored_pixels(conn, gid)), "text/plain")}
    r = client.post("/search/upload", files=files, data={"k": "3", "filters": '{"dataset": "breastmnist"}'})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["kind"] == "upload" and body["query"]["in_gallery"] == [gid]
    assert gid not in [n["image_id"] for n in body["neighbours"]] and len(body["neighbours"]) == 3
    assert {n["dataset"] for n in body["neighbours"]} == {"breastmnist"}
    # recognised, it takes the stored image's identity: its label is known
    assert body["query"]["image_id"] == gid and body["query"]["label_names"]
    assert all(n["same_label"] is not None for n in body["neighbours"])
    r = client.post("/search/upload", files={"image": ("q.png", png(np.full((28, 28), 77, np.uint8)), "image/png")})
    assert r.json()["query"]["image_id"] is None
    assert all(n["same_label"] is None for n in r.json()["neighbours"])  # an unknown upload has no label
    # a raw vector: the stored embedding of an image finds that image first, at distance 0
    v = conn.execute("SELECT embedding FROM medsim.embeddings WHERE model_id = %s AND image_id = %s",
                     (mid, gid)).fetchone()[0].to_numpy()
    r = client.post("/search", json={"vector": v.tolist(), "k": 2})
    assert r.status_code == 200, r.text
    assert r.json()["neighbours"][0]["image_id"] == gid and r.json()["neighbours"][0]["distance"] < 1e-5
    # a big colour JPEG of any size is resized to the model's input
    big = (np.random.default_rng(0).random((300, 200, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="JPEG")
    r = client.post("/search/upload", files={"image": ("x.jpg", buf.getvalue(), "image/jpeg")})
    assert r.status_code == 200 and len(r.json()["neighbours"]) == 4


def test_a_dicom_upload_is_searched(api):
    import pathlib

    import pydicom

    client, conn, mid = api
    f = pathlib.Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    r = client.post("/search/upload", files={"image": ("scan", f.read_bytes(), "application/octet-stream")},
                    data={"k": "2"})
    assert r.status_code == 200, r.text
    assert len(r.json()["neighbours"]) == 2


@pytest.mark.parametrize("payload, status, says", [
    ({"image_id": 1, "k": 0}, 400, "k: Input should be greater than or equal to 1"),
    ({"image_id": 1, "k": 1001}, 400, "k: Input should be less than or equal to 1000"),
    ({"image_id": 1, "colour": "red"}, 400, "colour: unknown field"),
    ({"image_id": 1, "engine": "annoy"}, 400, "engine: Input should be"),
    ({"image_id": 1, "vector": [0.0] * 64}, 400, "exactly one query"),
    ({"k": 3}, 400, "exactly one query"),
    ({"vector": [0.5, 0.5]}, 400, "the vector has 2 values; model"),
    ({"image_id": 987654321}, 404, "no image with id 987654321"),
    ({"image_id": 1, "filters": {"split": "test"}, "splits": "train,val"}, 400,
     "this search's gallery holds only train, val"),
    ({"image_id": 1, "per_patient": 0}, 400, "per_patient: Input should be greater than or equal to 1"),
])
def test_bad_json_requests_are_refused_and_named(api, payload, status, says):
    client, conn, _ = api
    if "image_id" in payload and payload["image_id"] == 1:
        payload = {**payload, "image_id": gallery_id(conn)}
    r = client.post("/search", json=payload)
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]
    assert r.json()["error"] in ("BadArgument", "NotFound")


def test_bad_uploads_are_refused_before_they_cost_anything(api, monkeypatch):
    client, conn, _ = api
    svc = client.app.state.service
    embedded = []
    monkeypatch.setattr(svc, "net", lambda *a: embedded.append(1))  # must never be reached
    # not an image, whatever its name says
    r = client.post("/search/upload", files={"image": ("scan.png", b"%PDF-1.7 not an image", "image/png")})
    assert r.status_code == 422 and "recognised by content" in r.json()["detail"]
    # PNG magic, broken body
    r = client.post("/search/upload", files={"image": ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png")})
    assert r.status_code == 422 and "not a readable image" in r.json()["detail"]
    # a decompression bomb: a small file declaring 3000 x 3000 pixels, over the 4 M limit
    bomb = png(np.zeros((3000, 3000), np.uint8))
    assert len(bomb) < 100_000
    r = client.post("/search/upload", files={"image": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 422 and "over the limit of 4,000,000" in r.json()["detail"]
    # over the upload size (2 MB here): refused by its Content-Length
    r = client.post("/search/upload", files={"image": ("big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * (3 * 1024 * 1024),
                                                "image/png")})
    assert r.status_code == 413 and r.json()["error"] == "TooLarge"
    # ... and while it streams in, when no Content-Length is sent (chunked)
    def chunks():
        for _ in range(40):
            yield b"\0" * 100_000

    r = client.post("/search/upload", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]
    # an empty file, a missing file field, a file where a value belongs, a wrong content type
    r = client.post("/search/upload", files={"image": ("e.png", b"", "image/png")})
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    r = client.post("/search/upload", data={"k": "3"}, files={"other": ("a.png", b"x", "image/png")})
    assert r.status_code == 400
    r = client.post("/search", content=b"image_id=3", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "send application/json" in r.json()["detail"]
    r = client.post("/search/upload", files={"image": ("a.png", png(np.zeros((28, 28), np.uint8)), "image/png")},
                    data={"k": "5000"})
    assert r.status_code == 400 and "k:" in r.json()["detail"]
    r = client.post("/search/upload", files={"image": ("a.png", png(np.zeros((28, 28), np.uint8)), "image/png")},
                    data={"filters": "{not json"})
    assert r.status_code == 400 and "filters: Invalid JSON" in r.json()["detail"]
    assert embedded == []


def test_images_thumbnails_and_etags(api):
    client, conn, _ = api
    gid = gallery_id(conn)
    r = client.get(f"/images/{gid}")
    assert r.status_code == 200
    meta = r.json()
    assert meta["id"] == gid and meta["split"] in ("train", "val") and meta["height"] == 28
    sha = conn.execute("SELECT encode(sha256, 'hex') FROM medsim.images WHERE id = %s", (gid,)).fetchone()[0]
    assert meta["sha256"] == sha and "pixels" not in meta
    r = client.get(f"/images/{gid}/thumbnail.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), stored_pixels(conn, gid))
    etag = r.headers["etag"]
    assert sha in etag
    r = client.get(f"/images/{gid}/thumbnail.png", headers={"if-none-match": etag})
    assert r.status_code == 304 and r.content == b""
    assert client.get("/images/987654321").status_code == 404
    assert client.get("/images/987654321/thumbnail.png").status_code == 404
    assert client.get(f"/images/{gid}/thumbnail.png?size=4").status_code == 400
    rid = client.get("/images/random?split=test").json()["image_id"]
    assert conn.execute("SELECT split FROM medsim.images WHERE id = %s", (rid,)).fetchone()[0] == "test"
    r = client.get("/images/random?split=test&dataset=retinamnist")
    assert conn.execute("SELECT d.flag FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id "
                        "WHERE i.id = %s", (r.json()["image_id"],)).fetchone()[0] == "retinamnist"
    assert client.get("/images/random?split=test&dataset=nosuch").status_code == 404
    # HEAD: the headers of a GET, no body
    r = client.head(f"/images/{gid}/thumbnail.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == b""


def test_random_image_is_uniform(api):
    """100 draws from breast's test split (156 images on the synthetic archive): a uniform
    draw shows about 75 distinct ids. The old query drew a new random number per row and
    returned the split's first few ids (5 distinct in 100)."""
    client, conn, _ = api
    n = conn.execute("SELECT count(*) FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id "
                     "WHERE d.flag = 'breastmnist' AND i.split = 'test'").fetchone()[0]
    got = [client.get("/images/random?split=test&dataset=breastmnist").json()["image_id"] for _ in range(100)]
    expected = n * (1 - (1 - 1 / n) ** 100)
    assert len(set(got)) > 0.8 * expected, (len(set(got)), expected)
    ids = sorted(got)
    assert ids[-1] - ids[0] > 0.8 * n  # the draws span the split, not its first ids


def test_state_endpoints_and_metrics(api):
    client, conn, mid = api
    models = client.get("/models").json()
    assert [m["id"] for m in models if m["is_current"]] == [mid]
    assert {d["name"] for d in client.get("/datasets").json()} == {"breastmnist", "retinamnist"}
    status = client.get("/status").json()
    assert {s["dataset"] for s in status} == {"breastmnist", "retinamnist"} and all(s["pending"] == 0 for s in status)
    h = client.get("/healthz")
    assert h.status_code == 200 and h.json()["ok"] and h.json()["model_id"] == mid
    client.post("/search", json={"image_id": gallery_id(conn)})
    client.post("/search/upload", files={"image": ("a.png", png(np.zeros((28, 28), np.uint8)), "image/png")})
    client.post("/search", json={"image_id": 987654321})
    text = client.get("/metrics").text
    assert 'medsim_http_requests_total{method="POST",route="/search",status="200"} 1' in text
    assert 'medsim_http_requests_total{method="POST",route="/search/upload",status="200"} 1' in text
    assert 'medsim_http_requests_total{method="POST",route="/search",status="404"} 1' in text
    for stage in ("decode", "embed", "search", "fetch"):
        count = [line for line in text.splitlines() if line.startswith(f'medsim_search_stage_seconds_count{{stage="{stage}"}}')]
        assert count and int(count[0].split()[-1]) >= 1, stage
    assert "/docs" in client.get("/").text and client.get("/openapi.json").json()["paths"]["/search"]["post"]


def test_search_runs_as_the_reader_role(api):
    client, conn, _ = api
    svc = client.app.state.service
    with svc.reader.connection() as c:
        assert c.execute("SELECT current_user").fetchone()[0] == "medsim_reader"
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT pixels FROM medsim.images LIMIT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("DELETE FROM medsim.embeddings")


def test_a_bug_is_a_500_that_leaks_nothing(api, monkeypatch, caplog):
    client, conn, _ = api

    def broken(*a, **kw):
        raise RuntimeError("secret internals at /srv/medsim/checkpoint")

    monkeypatch.setattr("medsim.search.pipeline.run", broken)
    with caplog.at_level(logging.ERROR, logger="medsim.serve"):
        r = client.post("/search", json={"image_id": gallery_id(conn)})
    assert r.status_code == 500 and r.json()["error"] == "InternalError"
    assert "secret" not in r.text and "Traceback" not in r.text
    rid = r.json()["detail"].split()[-1]
    assert any(rid in rec.getMessage() and rec.exc_info for rec in caplog.records)


def test_faiss_is_loaded_once_and_reloaded_only_when_the_gallery_changes(api, tmp_path, monkeypatch):
    client, conn, mid = api
    gid = gallery_id(conn)
    r = client.post("/search", json={"image_id": gid, "engine": "faiss"})
    assert r.status_code == 404 and "no FAISS index built" in r.json()["detail"]
    b1 = faiss_index.build(conn, mid, "flat", out_dir=tmp_path).meta["build_id"]
    # searches after the first load must not hash the gallery (the old per-call check)
    calls = []
    real = faiss_index.fingerprint
    monkeypatch.setattr(faiss_index, "fingerprint", lambda *a: calls.append(a) or real(*a))
    r = client.post("/search", json={"image_id": gid, "k": 5, "engine": "faiss"})
    assert r.status_code == 200 and r.json()["index_build"] == b1
    assert [n["image_id"] for n in r.json()["neighbours"]] == sql_neighbours(conn, gid, 5)
    calls.clear()
    for _ in range(3):
        assert client.post("/search", json={"image_id": gid, "engine": "faiss"}).status_code == 200
    assert calls == []
    # a new image embedded: the loaded build is stale, and so is the latest one -> 409
    conn.execute("INSERT INTO medsim.images (dataset_id, split, split_index, labels, height, width, channels, "
                 "pixels, sha256) SELECT dataset_id, 'train', 100000, labels, height, width, channels, pixels, "
                 "sha256(pixels || 'x') FROM medsim.images WHERE id = %s", (gid,))
    conn.execute("SELECT 1")
    from medsim import queue

    queue.enqueue(conn, mid)
    embed_all(conn.info.dsn)
    r = client.post("/search", json={"image_id": gid, "engine": "faiss"})
    assert r.status_code == 409 and r.json()["error"] == "StaleIndex"
    # pgvector still answers, and a new build is picked up without a restart
    assert client.post("/search", json={"image_id": gid}).status_code == 200
    b2 = faiss_index.build(conn, mid, "flat", out_dir=tmp_path).meta["build_id"]
    r = client.post("/search", json={"image_id": gid, "k": 5, "engine": "faiss"})
    assert r.status_code == 200 and r.json()["index_build"] == b2
    assert [n["image_id"] for n in r.json()["neighbours"]] == sql_neighbours(conn, gid, 5)


def test_gallery_version_moves_with_every_change_of_a_models_embeddings(embedded, db_url):
    conn, mid = embedded

    def version():
        return faiss_index.gallery_version(conn, mid)

    v0 = version()
    assert v0 >= 1
    conn.execute("UPDATE medsim.embeddings SET embedding = embedding WHERE model_id = %s AND image_id = "
                 "(SELECT min(image_id) FROM medsim.embeddings WHERE model_id = %s)", (mid, mid))
    assert version() == v0 + 1
    conn.execute("DELETE FROM medsim.images WHERE id = (SELECT max(image_id) FROM medsim.gallery)")
    assert version() == v0 + 2  # the cascade to medsim.embeddings counts
    conn.execute("UPDATE medsim.images SET split = split WHERE id = (SELECT min(id) FROM medsim.images)")
    assert version() == v0 + 3
    conn.execute("UPDATE medsim.images SET labels = labels WHERE id = (SELECT min(id) FROM medsim.images)")
    assert version() == v0 + 3  # a label change does not touch the vectors


def test_no_current_model_is_a_clear_404_and_an_unready_health(conn, db_url, synth_dir):
    from tests.helpers import ingest_synth

    ingest_synth(conn, synth_dir)
    app = create_app(ServeConfig(auth=False, database_url=db_url))
    with TestClient(app) as client:
        h = client.get("/healthz")
        assert h.status_code == 503 and "no current model" in h.json()["model"]
        r = client.post("/search", json={"image_id": 1})
        assert r.status_code == 404 and "model" in r.json()["detail"]


def test_the_service_refuses_to_start_on_an_unmigrated_database(empty_db_url):
    from medsim.errors import SchemaNotReady

    app = create_app(ServeConfig(auth=False, database_url=empty_db_url))
    with pytest.raises(SchemaNotReady, match="medsim migrate"), TestClient(app):
        pass


def test_preview_embedding_browse_and_export(api):
    """The workbench's endpoints: a preview scaled up by nearest neighbour (each stored pixel
    a square) or smoothly, with an auto-contrast window; the stored embedding, which
    searches as a vector to the same neighbours; a browse page that counts and pages; a
    search exported as CSV (rows = the JSON's neighbours), JSON and ZIP; each in the log."""
    import csv
    import zipfile

    client, conn, mid = api
    gid = gallery_id(conn)
    stored = stored_pixels(conn, gid)
    r = client.get(f"/images/{gid}/preview.png?size=280")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    big = np.asarray(Image.open(io.BytesIO(r.content)))
    assert big.shape[:2] == (280, 280)
    assert np.array_equal(big[::10, ::10], stored)  # nearest neighbour: 10 x 10 squares of the stored pixels
    smooth = np.asarray(Image.open(io.BytesIO(client.get(f"/images/{gid}/preview.png?size=280&smooth=true").content)))
    assert smooth.shape == big.shape and not np.array_equal(smooth, big)
    auto = np.asarray(Image.open(io.BytesIO(client.get(f"/images/{gid}/preview.png?size=280&window=auto").content)))
    assert auto.min() == 0 and auto.max() == 255  # the image's own range stretched to the full one
    etag = r.headers["etag"]
    assert client.get(f"/images/{gid}/preview.png?size=280", headers={"if-none-match": etag}).status_code == 304
    assert client.get(f"/images/{gid}/preview.png?size=2000").status_code == 400
    assert client.get(f"/images/{gid}/preview.png?window=bone").status_code == 400
    assert client.get("/images/987654321/preview.png").status_code == 404

    e = client.get(f"/images/{gid}/embedding").json()
    assert e["model_id"] == mid and e["dim"] == len(e["embedding"]) == 64
    by_vector = client.post("/search", json={"vector": e["embedding"], "k": 5}).json()
    by_id = client.post("/search", json={"image_id": gid, "k": 4}).json()
    assert [n["image_id"] for n in by_vector["neighbours"]][1:] == [n["image_id"] for n in by_id["neighbours"]]
    assert client.get(f"/images/{gid}/embedding?model=999").status_code == 404
    test_id = conn.execute("SELECT min(id) FROM medsim.images WHERE split = 'test'").fetchone()[0]
    assert client.get(f"/images/{test_id}/embedding").status_code in (200, 404)

    page = client.get("/images?dataset=retinamnist&split=val&limit=7&offset=3").json()
    n_val = conn.execute("SELECT count(*) FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id "
                         "WHERE d.flag = 'retinamnist' AND i.split = 'val'").fetchone()[0]
    want = [r[0] for r in conn.execute("SELECT i.id FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id "
                                       "WHERE d.flag = 'retinamnist' AND i.split = 'val' ORDER BY i.id "
                                       "OFFSET 3 LIMIT 7")]
    assert page["total"] == n_val and [d["id"] for d in page["images"]] == want
    assert {(d["dataset"], d["split"]) for d in page["images"]} == {("retinamnist", "val")}
    assert page["images"][0]["thumbnail_url"] == f"/images/{want[0]}/thumbnail.png"
    label = page["images"][0]["label_name"]
    labelled = client.get("/images", params={"dataset": "retinamnist", "label": label, "limit": 200}).json()
    assert labelled["total"] > 0 and {d["label_name"] for d in labelled["images"]} == {label}
    assert client.get("/images?filters=[1]").status_code == 400
    assert client.get("/images?limit=1000").status_code == 400
    assert client.get('/images?filters={"site": "nowhere"}').json()["total"] == 0

    body = {"image_id": gid, "k": 6}
    r = client.post("/search/export?format=csv", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    answer = client.post("/search", json=body).json()
    assert [int(x["image_id"]) for x in rows] == [n["image_id"] for n in answer["neighbours"]]
    assert [float(x["distance"]) for x in rows] == pytest.approx([n["distance"] for n in answer["neighbours"]])
    js = client.post("/search/export?format=json", json=body).json()
    assert [n["image_id"] for n in js["neighbours"]] == [n["image_id"] for n in answer["neighbours"]]
    z = zipfile.ZipFile(io.BytesIO(client.post("/search/export?format=zip", json=body).content))
    names = set(z.namelist())
    assert {"README.txt", "result.csv", "result.json", "thumbnails/query.png"} <= names
    assert len([n for n in names if n.startswith("thumbnails/0")]) == 6
    first = answer["neighbours"][0]["image_id"]
    assert np.array_equal(np.asarray(Image.open(z.open(f"thumbnails/001-{first}.png"))), stored_pixels(conn, first))
    assert client.post("/search/export?format=xlsx", json=body).status_code == 400
    actions = {r[0] for r in conn.execute("SELECT DISTINCT action FROM medsim.access_log")}
    assert {"preview", "embedding", "browse", "export"} <= actions


def test_an_upload_is_kept_for_its_url_then_deleted_and_logged(api):
    """An upload search returns a handle: its preview (drawn by the server, so a DICOM file
    has one), a search by the handle with the same neighbours, an export. Past its
    retention the handle is one sentence, the pixels are gone and the log says so; the
    reader role cannot read kept uploads."""
    import pydicom

    client, conn, mid = api
    ct = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    r = client.post("/search/upload", files={"image": ("CT_small.dcm", ct.read_bytes(), "application/dicom")},
                    data={"k": "5"})
    assert r.status_code == 200, r.text
    q = r.json()["query"]
    handle = q["handle"]
    assert len(handle) >= 20 and q["preview_url"] == f"/uploads/{handle}/preview.png"
    p = client.get(q["preview_url"] + "?size=256")
    assert p.status_code == 200 and p.headers["content-type"] == "image/png"
    assert max(Image.open(io.BytesIO(p.content)).size) == 256
    again = client.post("/search", json={"upload": handle, "k": 5}).json()
    assert [n["image_id"] for n in again["neighbours"]] == [n["image_id"] for n in r.json()["neighbours"]]
    assert again["query"]["kind"] == "upload" and again["query"]["handle"] == handle
    z = client.post("/search/export?format=zip", json={"upload": handle, "k": 3})
    assert z.status_code == 200
    import zipfile

    assert "thumbnails/query.png" in zipfile.ZipFile(io.BytesIO(z.content)).namelist()
    # what is kept: the stored form, not the file (nor its name)
    kept = conn.execute("SELECT height, width, channels, bit_depth, length(pixels) FROM medsim.uploads "
                        "WHERE handle = %s", (handle,)).fetchone()
    assert kept[:2] == (128, 128) and kept[4] == 128 * 128 * kept[2] * kept[3] // 8
    with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
        conn.execute("SET LOCAL ROLE medsim_reader")
        conn.execute("SELECT pixels FROM medsim.uploads")
    assert client.post("/search", json={"upload": handle, "image_id": 1}).status_code == 400
    # past its retention: the next upload deletes it and logs that
    conn.execute("UPDATE medsim.uploads SET expires_at = now() - interval '1 second' WHERE handle = %s", (handle,))
    conn.commit()
    r = client.post("/search", json={"upload": handle, "k": 5})
    assert r.status_code == 404 and "uploads are kept 24 h" in r.json()["detail"]
    assert client.get(f"/uploads/{handle}/preview.png").status_code == 404
    client.post("/search/upload", files={"image": ("q.png", png(stored_pixels(conn, gallery_id(conn))), "image/png")},
                data={"k": "2"})
    assert conn.execute("SELECT count(*) FROM medsim.uploads WHERE handle = %s", (handle,)).fetchone()[0] == 0
    sha = hashlib.sha256(ct.read_bytes()).hexdigest()
    assert conn.execute("SELECT count(*) FROM medsim.access_log WHERE action = 'upload_deleted' "
                        "AND query_sha256 = %s", (sha,)).fetchone()[0] == 1
    assert client.post("/search", json={"upload": "x" * 65}).status_code == 400


def test_uploads_are_not_kept_with_retention_zero(embedded, db_url):
    conn, _ = embedded
    with TestClient(create_app(ServeConfig(auth=False, database_url=db_url, upload_retention_h=0))) as client:
        r = client.post("/search/upload", files={"image": ("q.png", png(stored_pixels(conn, gallery_id(conn))),
                                                           "image/png")}, data={"k": "2"})
        assert r.status_code == 200 and r.json()["query"]["handle"] is None
    assert conn.execute("SELECT count(*) FROM medsim.uploads").fetchone()[0] == 0


def test_expired_uploads_are_deleted_when_the_service_starts(embedded, db_url):
    conn, _ = embedded
    cfg = ServeConfig(auth=False, database_url=db_url)
    with TestClient(create_app(cfg)) as client:
        r = client.post("/search/upload", files={"image": ("q.png", png(stored_pixels(conn, gallery_id(conn))),
                                                           "image/png")}, data={"k": "2"})
        handle = r.json()["query"]["handle"]
    conn.execute("UPDATE medsim.uploads SET expires_at = now() - interval '1 second'")
    conn.commit()
    with TestClient(create_app(cfg)):
        pass
    assert conn.execute("SELECT count(*) FROM medsim.uploads WHERE handle = %s", (handle,)).fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM medsim.access_log WHERE action = 'upload_deleted'").fetchone()[0] == 1


def test_explain_a_pair_as_json_and_png(api):
    """GET /explain: both maps in [0, 1] (JSON, with what they measure) or one overlay (PNG);
    a kept upload as the query; unknown images and bad options are one sentence; logged."""
    client, conn, mid = api
    gid = gallery_id(conn)
    nb = client.post("/search", json={"image_id": gid, "k": 1}).json()["neighbours"][0]["image_id"]
    r = client.get(f"/explain?query={gid}&neighbour={nb}")
    assert r.status_code == 200, r.text
    body = r.json()
    q, n = np.array(body["query"]), np.array(body["neighbour"])
    assert q.shape == n.shape == (28, 28) and q.min() >= 0 and q.max() <= 1 and n.max() > 0
    assert body["method"] == "integrated_gradients" and "not the reason" in body["what"]
    for which in ("query", "neighbour"):  # the deletion test, run with the answer
        f = body["faithfulness"][which]
        assert f["faithful"] in (True, False, None) and set(f) == {"deletion_auc", "random_auc", "faithful"}
    png = client.get(f"/explain?query={gid}&neighbour={nb}&format=png&which=query&size=128")
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (128, 128)
    occ = client.get(f"/explain?query={gid}&neighbour={nb}&method=occlusion").json()
    assert np.array(occ["neighbour"]).shape == (28, 28)
    up = client.post("/search/upload", files={"image": ("q.png", png_of(conn, gid), "image/png")},
                     data={"k": "1"}).json()
    assert client.get(f"/explain?query={up['query']['handle']}&neighbour={nb}").status_code == 200
    assert client.get(f"/explain?query=987654321&neighbour={nb}").status_code == 404
    assert client.get(f"/explain?query={gid}&neighbour=987654321").status_code == 404
    assert client.get(f"/explain?query={gid}&neighbour={nb}&method=lime").status_code == 400
    assert client.get(f"/explain?query=nosuchhandle&neighbour={nb}").status_code == 404
    assert conn.execute("SELECT count(*) FROM medsim.access_log WHERE action = 'explain'").fetchone()[0] >= 3


def png_of(conn, image_id: int) -> bytes:
    return png(stored_pixels(conn, image_id))


def test_search_by_a_region_over_http(api):
    client, conn, mid = api
    gid = gallery_id(conn)
    r = client.post("/search", json={"image_id": gid, "k": 4, "box": [0, 0, 14, 14]})
    assert r.status_code == 200 and r.json()["query"]["label"] == f"image {gid}, region [0, 0, 14, 14]"
    up = client.post("/search/upload", files={"image": ("q.png", png_of(conn, gid), "image/png")},
                     data={"k": "4", "box": "[0, 0, 14, 14]"})
    assert up.status_code == 200 and up.json()["query"]["size"] == [28, 28], up.text
    assert [n["image_id"] for n in up.json()["neighbours"]][:3] == [n["image_id"] for n in r.json()["neighbours"]][:3] \
        or up.json()["query"]["in_gallery"] == []  # an upload's region is not on file: its own image may come back
    kept = client.post("/search", json={"upload": up.json()["query"]["handle"], "k": 4, "box": [0, 0, 14, 14]})
    assert kept.status_code == 200
    for box, says in (([0, 0, 40, 10], "reaches outside"), ([3, 3, 3, 9], "empty or inverted"),
                      ([1, 2, 3], "four whole numbers")):
        r = client.post("/search", json={"image_id": gid, "k": 4, "box": box})
        assert r.status_code == 400 and says in r.json()["detail"], r.text
    r = client.post("/search/upload", files={"image": ("q.png", png_of(conn, gid), "image/png")},
                    data={"k": "4", "box": "[0, 0, 99, 99]"})
    assert r.status_code == 400 and "reaches outside the image (28 x 28 pixels)" in r.json()["detail"]


def test_concurrent_uploads_delete_each_expired_upload_once(embedded, db_url):
    """Four uploads at once, each purging expired uploads in its own transaction: every
    expired upload is deleted and logged exactly once (the second DELETE waits on the row
    lock and then finds nothing)."""
    import threading

    conn, _ = embedded
    cfg = ServeConfig(auth=False, database_url=db_url, pool_size=8)
    body = png_of(conn, gallery_id(conn))
    with TestClient(create_app(cfg)) as client:
        for _ in range(6):
            client.post("/search/upload", files={"image": ("q.png", body, "image/png")}, data={"k": "1"})
        conn.execute("UPDATE medsim.uploads SET expires_at = now() - interval '1 second'")
        conn.commit()
        codes = []

        def upload():
            r = client.post("/search/upload", files={"image": ("q.png", body, "image/png")}, data={"k": "1"})
            codes.append(r.status_code)

        threads = [threading.Thread(target=upload) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert codes == [200] * 4
    assert conn.execute("SELECT count(*) FROM medsim.access_log WHERE action = 'upload_deleted'").fetchone()[0] == 6
    assert conn.execute("SELECT count(*) FROM medsim.uploads WHERE expires_at <= now()").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM medsim.uploads").fetchone()[0] == 4
