"""A PACS as a source: a real Orthanc (Debian's orthanc + orthanc-dicomweb) on loopback with
authentication on, synthetic instances made with pydicom and pydicom's real test files;
`medsim sync` over DICOMweb, incremental by Orthanc's change log, --prune, a PACS that goes
away mid-sync, answers 5xx, sends garbage or is slow, and results that link back to it."""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medsim import cli
from medsim.errors import BadArgument, DataRefused, PacsUnavailable
from medsim.sources import deletion, pacs, pacs_client, pacs_refs
from tests import orthanc
from tests.synth import make_arrays

FILES = Path(pydicom.__file__).parent / "data" / "test_files"
KEY = "a test key that is long enough"
REAL = ("CT_small.dcm", "MR_small.dcm", "examples_ybr_color.dcm", "rtplan.dcm")  # rtplan: not an image

if orthanc.binary() is None or orthanc.dicomweb_plugin() is None:
    if os.environ.get("MEDSIM_REQUIRE_ORTHANC"):
        raise RuntimeError("MEDSIM_REQUIRE_ORTHANC is set but Orthanc or its DICOMweb plugin is not installed "
                           "(apt-get install orthanc orthanc-dicomweb)")
    pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb): the PACS tests need a real "
                "one", allow_module_level=True)


@pytest.fixture
def pacs_env(monkeypatch):
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", KEY)
    monkeypatch.setenv("MEDSIM_PACS_USER", orthanc.USER)
    monkeypatch.setenv("MEDSIM_PACS_PASSWORD", orthanc.PASSWORD)


@pytest.fixture
def server(tmp_path, pacs_env):
    o = orthanc.Orthanc(tmp_path / "orthanc").start()
    yield o
    o.stop()


def add_study(o, patient: str, n: int, label: str, seed: int, bits: int = 16, date: str = "20260101") -> str:
    """n instances of one series of one new study -> its StudyInstanceUID."""
    x = make_arrays("breastmnist", seed=seed)["train_images"][:n]
    study, series = generate_uid(), generate_uid()
    for i, img in enumerate(x):
        px = img.astype(np.uint16) * 257 if bits == 16 else img
        o.upload(orthanc.instance(px, patient, study, series, label, i, study_date=date))
    return study


def add_real(o) -> None:
    for name in REAL:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(FILES / name)
        ds.StudyDescription = "real"
        out = Path(o.folder) / name
        ds.save_as(out)
        o.upload(out.read_bytes())


@pytest.fixture
def filled(server):
    studies = [add_study(server, f"P{p}", 6, "malignant" if p % 2 else "benign", seed=p) for p in range(4)]
    add_real(server)
    return studies


class Counting:
    """Counts the WADO-RS fetches a sync makes (it runs in this process: small archives):
    ("instance", SOP UID) or ("series", series UID), and the studies they were of."""

    def __init__(self, monkeypatch):
        self.fetches: list[tuple] = []
        self.studies: list[str] = []
        one, many = pacs_client.Server.retrieve, pacs_client.Server.retrieve_series

        def retrieve(srv, study, series, sop):
            self.fetches.append(("instance", sop))
            self.studies.append(study)
            return one(srv, study, series, sop)

        def retrieve_series(srv, study, series):
            self.fetches.append(("series", series))
            self.studies.append(study)
            return many(srv, study, series)

        monkeypatch.setattr(pacs_client.Server, "retrieve", retrieve)
        monkeypatch.setattr(pacs_client.Server, "retrieve_series", retrieve_series)

    def clear(self):
        self.fetches.clear()
        self.studies.clear()


def run(conn, o, **kw):
    return pacs.sync(conn, o.url, "pacs", label_tag="StudyDescription", workers=1, **kw)


def test_full_sync_then_a_rerun_fetches_nothing(conn, server, filled, monkeypatch):
    fetched = Counting(monkeypatch)
    r = run(conn, server)
    a = r.archive
    # 24 synthetic + CT + MR + 30 cine frames (2 repeat the frame before) ; rtplan refused unfetched
    assert r.listed == 24 + 2 + 30 + 1 and a.added == 24 + 2 + 28 and a.duplicates == 2
    skipped = {p: why for p, kind, why in a.problems if kind == "skipped"}
    assert list(skipped.values()) == ["a RT Plan object (SOP class 1.2.840.10008.5.1.4.1.1.481.5), not an image to "
                                      "search: refused"]
    # each synthetic series in one request, the three real files one each (the 30-frame one
    # once); the RT plan never
    kinds = [k for k, _ in fetched.fetches]
    assert kinds.count("series") == 4 and kinds.count("instance") == 3
    assert conn.execute("SELECT source_kind, image_size FROM medsim.datasets").fetchone() == ("pacs", 256)
    # nothing identifying in the images: no name, birth date, raw patient id or raw UID
    text = " ".join(str(v) for row in conn.execute("SELECT * FROM medsim.images").fetchall()
                    for v in row if not isinstance(v, bytes | memoryview))
    for needle in ("Doe^", "19700101", "P0", "P1", filled[0]):
        assert needle not in text
    # 16-bit kept 16-bit; the sync's rows name the UIDs, and medsim_reader may not read them
    assert conn.execute("SELECT count(*) FROM medsim.images WHERE bit_depth = 16").fetchone()[0] >= 24
    assert conn.execute("SELECT count(*) FROM medsim.pacs_instances WHERE study_uid = %s",
                        (filled[0],)).fetchone() == (6,)
    assert conn.execute("SELECT has_table_privilege('medsim_reader', 'medsim.pacs_instances', 'SELECT')"
                        ).fetchone() == (False,)

    fetched.clear()
    again = run(conn, server)
    assert again.archive is None and fetched.fetches == [] and again.mode.startswith("changes since")
    full = run(conn, server, full=True)  # listed again, but every instance is settled: no fetch
    assert full.known == full.listed == r.listed and fetched.fetches == [] and full.archive is None
    assert conn.execute("SELECT count(*) FROM medsim.images").fetchone() == (54,)


def test_a_new_study_is_the_only_thing_fetched(conn, server, filled, monkeypatch):
    run(conn, server)
    fetched = Counting(monkeypatch)
    new = add_study(server, "P9", 5, "benign", seed=9, bits=8)
    r = run(conn, server)
    assert r.archive.added == 5 and r.listed == 5 and r.known == 0
    got = conn.execute("SELECT count(*) FROM medsim.pacs_instances WHERE study_uid = %s", (new,)).fetchone()[0]
    assert fetched.studies == [new] and got == 5  # one request: the new study's series, nothing else


def test_prune_removes_what_the_pacs_deleted(conn, server, filled):
    run(conn, server)
    before = conn.execute("SELECT count(*) FROM medsim.images").fetchone()[0]
    server.delete_study(filled[1])
    r = run(conn, server, prune=True)
    assert r.pruned == 6
    assert conn.execute("SELECT count(*) FROM medsim.images").fetchone()[0] == before - 6
    assert conn.execute("SELECT count(*) FROM medsim.pacs_instances WHERE study_uid = %s",
                        (filled[1],)).fetchone() == (0,)
    assert conn.execute("SELECT kind, images, reason FROM medsim.deletions").fetchone() == (
        "images", 6, f"deleted in the PACS ({server.url})")


def test_a_deleted_patient_is_not_fetched_back(conn, server, filled):
    run(conn, server)
    deletion.delete(conn, patient_id="P2", reason="consent withdrawn")
    r = run(conn, server, full=True)
    assert r.archive is None
    assert conn.execute("SELECT count(*) FROM medsim.images").fetchone() == (48,)
    new = add_study(server, "P2", 3, "benign", seed=12)  # a new study of theirs, later
    r = run(conn, server)
    assert r.withdrawn == 3 and r.archive is None
    assert conn.execute("SELECT count(*) FROM medsim.pacs_instances WHERE study_uid = %s", (new,)).fetchone() == (0,)


def test_orthanc_stopped_mid_sync_then_restarted(conn, server, filled, monkeypatch):
    real = pacs_client.Server.call
    calls = []

    def call(srv, what, *args, **kwargs):
        if what.startswith("fetching"):
            calls.append(what)
            if len(calls) == 3:
                server.stop()  # the PACS goes away between two fetches
        return real(srv, what, *args, **kwargs)

    monkeypatch.setattr(pacs_client.Server, "call", call)
    with pytest.raises(PacsUnavailable) as err:
        run(conn, server, chunk=4)
    msg = str(err.value)
    assert "cannot be reached while fetching a" in msg and "the next sync resumes" in msg
    kept = conn.execute("SELECT count(*) FROM medsim.images").fetchone()[0]
    assert 0 < kept < 54  # whole chunks committed, nothing half-written
    assert conn.execute("SELECT cursor FROM medsim.pacs_sources").fetchone() == ({},)  # the cursor did not move
    assert conn.execute("SELECT count(*) FROM medsim.pacs_instances WHERE image_id IS NULL AND outcome = 'stored'"
                        ).fetchone() == (0,)
    server.start()
    monkeypatch.setattr(pacs_client.Server, "call", real)
    r = run(conn, server)
    assert r.archive.added == 54 - kept
    assert conn.execute("SELECT count(*), count(DISTINCT sha256) FROM medsim.images").fetchone() == (54, 54)
    assert conn.execute("SELECT count(*) FROM medsim.pacs_instances").fetchone() == (24 + 2 + 30 + 1,)


def test_one_bad_instance_is_one_sentence_and_is_tried_again(conn, server, filled):
    proxy = orthanc.FaultyProxy(server.root)
    try:
        target = {"500": filled[0], "garbage": filled[1], "gone": filled[2]}

        def fault(path):  # WADO-RS of these studies (QIDO asks /dicom-web/instances?...)
            if path.startswith(f"/dicom-web/studies/{target['500']}"):
                return 503
            if path.startswith(f"/dicom-web/studies/{target['garbage']}"):
                return "garbage"
            if path.startswith(f"/dicom-web/studies/{target['gone']}"):
                return 404  # deleted between the listing and the fetch
            return None

        proxy.fault = fault
        r = pacs.sync(conn, proxy.url, "pacs", label_tag="StudyDescription", workers=1)
        reasons = [why for _, kind, why in r.archive.problems if kind == "skipped"]
        assert sum("the PACS answered 503 while fetching a series" in w for w in reasons) == 6
        assert sum(w.startswith("a malformed answer while fetching a series") for w in reasons) == 6
        assert sum(w == "no longer in the PACS (404)" for w in reasons) == 6
        # 5xx and garbage are tried again (the cursor waits for them); what is gone is settled
        assert r.archive.added == 54 - 18 and r.unsettled == 12 and r.cursor == {}
        assert conn.execute("SELECT count(*) FROM medsim.pacs_instances WHERE reason = 'no longer in the PACS (404)'"
                            ).fetchone() == (6,)
        proxy.fault = lambda path: None
        again = pacs.sync(conn, proxy.url, "pacs", label_tag="StudyDescription", workers=1)
        assert again.archive.added == 12 and again.unsettled == 0 and "changes" in again.cursor
    finally:
        proxy.close()


def test_a_slow_pacs_times_out_in_a_sentence(conn, server, filled, monkeypatch):
    monkeypatch.setenv("MEDSIM_PACS_TIMEOUT", "1")
    proxy = orthanc.FaultyProxy(server.root)
    proxy.fault = lambda path: "slow" if path.startswith(f"/dicom-web/studies/{filled[2]}") else None
    try:
        r = pacs.sync(conn, proxy.url, "pacs", label_tag="StudyDescription", workers=1)
    finally:
        proxy.close()
    reasons = [why for _, kind, why in r.archive.problems if kind == "skipped" and "within" in why]
    assert reasons == ["the PACS did not answer within 1 s while fetching a series (3 tries)"] * 6
    assert r.archive.added == 48 and r.unsettled == 6


def test_unreachable_wrong_credentials_and_bad_urls(conn, server, pacs_env, monkeypatch, capsys):
    closed = orthanc.free_port()
    with pytest.raises(PacsUnavailable, match=r"cannot be reached while searching instances \(ConnectionRefused"):
        pacs.sync(conn, f"http://127.0.0.1:{closed}/dicom-web", "pacs", label_tag="StudyDescription")
    with pytest.raises(BadArgument, match="not in the URL"):
        pacs.sync(conn, f"http://u:p@127.0.0.1:{server.port}/dicom-web", "pacs", label_tag="StudyDescription")
    with pytest.raises(BadArgument, match="not a DICOMweb URL"):
        pacs.sync(conn, "ftp://pacs/dicom-web", "pacs", label_tag="StudyDescription")
    monkeypatch.setenv("MEDSIM_PACS_PASSWORD", "wrong")
    assert cli.main(["sync", server.url, "--name", "pacs", "--label-tag", "StudyDescription", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "refused our credentials (401)" in err and "MEDSIM_PACS_PASSWORD" in err and "wrong" not in err
    assert conn.execute("SELECT count(*) FROM medsim.datasets").fetchone() == (0,)


def test_two_syncs_at_once_store_each_instance_once(conn, server, filled, db_url):
    import psycopg

    errors, reports = [], []

    def one():
        with psycopg.connect(db_url, autocommit=True) as c:
            try:
                reports.append(run(c, server))
            except DataRefused as err:
                errors.append(str(err))

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all("another sync of pacs" in e for e in errors) and reports
    assert conn.execute("SELECT count(*), count(DISTINCT sha256) FROM medsim.images").fetchone() == (54, 54)


def test_results_link_to_the_pacs_viewer_and_the_original(conn, server, filled):
    run(conn, server)
    ids = [i for (i,) in conn.execute("SELECT id FROM medsim.images ORDER BY id LIMIT 3")]
    links = pacs_refs.viewer_links(conn, ids)
    assert set(links) == set(ids)
    for url in links.values():
        assert url.startswith(f"{server.root}/app/explorer.html#study?uuid=")
        assert server.http.get(url, timeout=10).status_code == 200
        study = url.split("uuid=")[1]  # Orthanc's own id of the study: its REST API knows it
        assert server.http.get(f"{server.root}/studies/{study}", timeout=10).status_code == 200
    data, ref = pacs_refs.original(conn, ids[0])
    ds = pydicom.dcmread(__import__("io").BytesIO(data))
    assert str(ds.SOPInstanceUID) == ref.sop and ds.Rows == 28
    # another template, set on a later sync: the DICOMweb study resource, which answers 200
    run(conn, server, viewer="{root}/dicom-web/studies/{study}/series")
    for url in pacs_refs.viewer_links(conn, ids).values():
        assert server.http.get(url, timeout=10).status_code == 200


def test_cli_sync_walk_through(conn, server, filled, capsys):
    args = ["sync", server.url, "--name", "pacs", "--label-tag", "StudyDescription", "--quiet"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "pacs: synced from" in out and "57 listed" in out and "54 added" in out
    assert "skipped: " in out and "RT Plan" in out
    assert cli.main(args) == 0
    assert "0 listed" in capsys.readouterr().out
    shutil.rmtree(server.folder / "storage", ignore_errors=True)  # the PACS lost everything (a wrong disk)
    server.stop()
    server.start()
    assert cli.main([*args, "--prune"]) == 2
    assert "refusing to prune every image of pacs" in capsys.readouterr().err
    assert conn.execute("SELECT count(*) FROM medsim.images").fetchone() == (54,)


def test_the_service_links_results_to_the_pacs_and_proxies_originals_to_admins(conn, server, filled, db_url):
    from fastapi.testclient import TestClient

    from medsim import access
    from medsim.service.app import create_app
    from medsim.service.state import ServeConfig
    from tests.helpers import embed_all, register_model

    run(conn, server)
    register_model(conn)
    embed_all(db_url)
    tokens = {}
    for user, scope in (("adm", "admin"), ("img", "images"), ("sea", "search")):
        access.add_user(conn, user)
        access.grant(conn, user, ["pacs"])
        tokens[scope] = {"Authorization": "Bearer " + access.create_token(conn, user, scope)[0]}
    query = conn.execute("SELECT id FROM medsim.images WHERE split = 'test' ORDER BY id LIMIT 1").fetchone()[0]
    with TestClient(create_app(ServeConfig(database_url=db_url, auth=True))) as client:
        hits = client.post("/search", json={"image_id": query, "k": 3}, headers=tokens["images"]).json()["neighbours"]
        assert hits and all(h["viewer_url"].startswith(f"{server.root}/app/explorer.html#study?uuid=") for h in hits)
        assert server.http.get(hits[0]["viewer_url"], timeout=10).status_code == 200
        blind = client.post("/search", json={"image_id": query, "k": 3}, headers=tokens["search"]).json()
        assert [h["viewer_url"] for h in blind["neighbours"]] == [None] * 3  # a UID is not the search scope's
        record = client.get(f"/images/{query}", headers=tokens["images"]).json()
        assert record["original_url"] == f"/images/{query}/original" and record["viewer_url"]
        for scope in ("images", "search"):
            assert client.get(f"/images/{query}/original", headers=tokens[scope]).status_code == 403
        r = client.get(f"/images/{query}/original", headers=tokens["admin"])
        assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
        sop = conn.execute("SELECT sop_uid FROM medsim.pacs_instances WHERE image_id = %s", (query,)).fetchone()[0]
        assert str(pydicom.dcmread(__import__("io").BytesIO(r.content)).SOPInstanceUID) == sop
        assert conn.execute("SELECT user_name, image_ids FROM medsim.access_log WHERE action = 'original'"
                            ).fetchall() == [("adm", [query])]
        server.stop()
        r = client.get(f"/images/{query}/original", headers=tokens["admin"])
        assert r.status_code == 502 and "cannot be reached while fetching an instance" in r.json()["detail"]


def test_an_answer_over_the_size_limit_is_refused_before_it_is_read(conn, server, filled, monkeypatch):
    """A series too big at once is asked for instance by instance; an instance over the
    limit is one sentence, not a gigabyte in memory."""
    monkeypatch.setenv("MEDSIM_PACS_MAX_BYTES", "200000")  # the series (6 x ~1.7 KB) pass; the cine does not
    fetched = Counting(monkeypatch)
    r = run(conn, server)
    reasons = [why for _, kind, why in r.archive.problems if kind == "skipped" and "MEDSIM_PACS_MAX_BYTES" in why]
    assert len(reasons) == 30 and reasons[0].startswith("the PACS's answer is ")  # the 30-frame cine, each frame
    # a limit between one instance (64 x 64 x 2 bytes: ~9 KB) and their series (~36 KB); the
    # QIDO answer (~6 KB) fits
    monkeypatch.setenv("MEDSIM_PACS_MAX_BYTES", "20000")
    fetched.clear()
    study, series, rng = generate_uid(), generate_uid(), np.random.default_rng(17)
    for i in range(4):
        px = rng.integers(0, 65535, (64, 64), dtype=np.uint16)
        server.upload(orthanc.instance(px, "P7", study, series, "benign", i))
    r = run(conn, server)
    assert r.archive.added == 4
    assert [k for k, _ in fetched.fetches] == ["series"] + ["instance"] * 4


def test_a_second_key_is_refused_before_anything_is_fetched(conn, server, filled, monkeypatch):
    run(conn, server)
    fetched = Counting(monkeypatch)
    add_study(server, "P8", 3, "benign", seed=18)
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", "another key, also long enough")
    with pytest.raises(BadArgument, match="hashed with another key"):
        run(conn, server)
    assert fetched.fetches == [] and conn.execute("SELECT count(*) FROM medsim.images").fetchone() == (54,)
