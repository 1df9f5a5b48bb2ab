"""Deletion wins every race: `medsim delete --patient X` while a sync or an ingest-folder is
storing X's images. Issue 34 saw a sync store 80 of X's images 1.1 s after the deletion
committed (and a later --full sync kept them). Here the deletion runs in its own connection
at random moments of a running sync (a real Orthanc) or folder ingest, many rounds, and no
image of X may be on file afterwards, nor come back with a --full sync, a re-ingest or a
--recheck; the PACS's UIDs of X are kept only as keyed hashes."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import random
import threading
import time
from functools import partial

import numpy as np
import psycopg
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from medsim.errors import NotFound
from medsim.sources import archive, deletion, folder, keys, pacs, pacs_client
from medsim.sources.folder import FolderSource
from tests import orthanc

KEY = "a test key that is long enough"
NEW_KEY = "the next key, also long enough"
WITHDRAWN = "patient withdrawn (deletion "


def patient_key(pid: str) -> str:
    return hmac.new(KEY.encode(), pid.encode(), hashlib.sha256).hexdigest()


def on_file(conn, pid: str) -> int:
    return conn.execute("SELECT count(*) FROM medsim.images WHERE patient_key = %s", (patient_key(pid),)).fetchone()[0]


def delete_once_stored(db_url: str, pid: str, delay: float, done: threading.Event, out: dict) -> None:
    """Delete the patient as soon as some of their images are on file (a deletion of a
    patient with none is refused), after `delay`; out['deletion'] is its id, None when the
    run ended before anything of theirs was stored."""
    time.sleep(delay)
    with psycopg.connect(db_url, autocommit=True) as c:
        while True:
            finished = done.is_set()
            try:
                out["deletion"] = deletion.delete(c, patient_id=pid, reason="consent withdrawn").deletion_id
                return
            except NotFound:
                if finished:
                    out["deletion"] = None
                    return
                time.sleep(0.005)


def race(db_url: str, run, pid: str, delay: float):
    """run(conn) in one thread, the deletion in another -> (run's result, deletion id)."""
    done, got = threading.Event(), {}

    def runner():
        try:
            with psycopg.connect(db_url, autocommit=True) as c:
                got["result"] = run(c)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            got["error"] = err
        finally:
            done.set()

    threads = [threading.Thread(target=runner),
               threading.Thread(target=delete_once_stored, args=(db_url, pid, delay, done, got))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if "error" in got:
        raise got["error"]
    return got.get("result"), got.get("deletion")


def withdrawn_refusals(report) -> list[str]:
    return [why for _, kind, why in report.problems if kind == "skipped" and why.startswith(WITHDRAWN)]


# ---------------------------------------------------------------- a folder ingest
def slow_load(base, max_side, group):
    time.sleep(0.02)  # a slow disk: the deletion lands between chunks
    return folder.load_file(base, max_side, group)


class SlowFolder(FolderSource):
    def loader(self):
        return partial(slow_load, self.base(), self.max_side)


def write_round(root, r: int, rng, n: int = 10) -> str:
    """n pictures of patient X{r} and 2 of someone else, listed in the manifest m{r}.csv."""
    d = root / f"r{r}"
    d.mkdir()
    rows = []
    for i in range(n + 2):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(d / f"{i}.png")
        rows.append((f"r{r}/{i}.png", "x" if i % 2 else "y", f"X{r}" if i < n else f"keep{r}"))
    manifest = root / f"m{r}.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "patient_id"), *rows])
    return manifest


def test_ingest_folder_and_delete_patient_race(conn, db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", KEY)
    rng, pick = np.random.default_rng(34), random.Random(34)
    raced = 0
    for r in range(12):
        manifest = write_round(tmp_path, r, rng)

        def ingest(c, manifest=manifest):
            return archive.ingest_archive(c, SlowFolder(tmp_path, manifest=manifest), "ward", progress=False,
                                          workers=1, chunk=2)

        report, deleted = race(db_url, ingest, f"X{r}", pick.uniform(0, 0.15))
        assert deleted is not None, "the ingest stored nothing of the patient"
        assert on_file(conn, f"X{r}") == 0, f"round {r}: the withdrawn patient's images are back"
        assert on_file(conn, f"keep{r}") == 2
        refused = withdrawn_refusals(report)
        raced += bool(refused)
        assert all(why == f"{WITHDRAWN}{deleted})" for why in refused)
    assert raced >= 3, "the deletion never landed while the ingest was running: the test raced nothing"
    # neither a re-run nor a deliberate --recheck brings anyone back
    for r in range(12):
        for recheck in (False, True):
            again = archive.ingest_archive(conn, FolderSource(tmp_path, manifest=tmp_path / f"m{r}.csv"), "ward",
                                           progress=False, workers=1, recheck=recheck)
            assert again.added == 0
        assert on_file(conn, f"X{r}") == 0
    # the ledger settles the refused files with the reason: not read again until they change
    reasons = conn.execute("SELECT DISTINCT reason FROM medsim.source_files WHERE outcome = 'refused'").fetchall()
    assert reasons and all(why.startswith(WITHDRAWN) for (why,) in reasons)


def test_a_deletion_between_listing_and_storing_refuses_the_rest(conn, db_url, tmp_path, monkeypatch):
    """Deterministic: the deletion commits after the ingest listed the files and stored the
    first chunk, before the second chunk is written."""
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", KEY)
    manifest = write_round(tmp_path, 0, np.random.default_rng(1), n=6)
    calls = []

    def loader(base, max_side, group):
        calls.append(group[0].path)
        if len(calls) == 3:  # the first chunk (two files) is committed: withdraw now
            with psycopg.connect(db_url, autocommit=True) as c:
                deletion.delete(c, patient_id="X0")
        return folder.load_file(base, max_side, group)

    class Withdrawing(FolderSource):
        def loader(self):
            return partial(loader, self.base(), self.max_side)

    report = archive.ingest_archive(conn, Withdrawing(tmp_path, manifest=manifest), "ward", progress=False,
                                    workers=1, chunk=2)
    did = conn.execute("SELECT id FROM medsim.deletions").fetchone()[0]
    assert on_file(conn, "X0") == 0 and on_file(conn, "keep0") == 2
    assert withdrawn_refusals(report) == [f"{WITHDRAWN}{did})"] * 4
    assert report.added == 2 + 2  # X0's first chunk (deleted since) and the other patient's two


# ---------------------------------------------------------------- a PACS sync
needs_orthanc = pytest.mark.skipif(orthanc.binary() is None or orthanc.dicomweb_plugin() is None,
                                   reason="Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", KEY)
    monkeypatch.setenv("MEDSIM_PACS_USER", orthanc.USER)
    monkeypatch.setenv("MEDSIM_PACS_PASSWORD", orthanc.PASSWORD)
    o = orthanc.Orthanc(tmp_path / "orthanc").start()
    yield o
    o.stop()


def upload_patient(o, pid: str, rng, n_series: int = 4, per_series: int = 3) -> set[str]:
    """A study of n_series series -> every UID of theirs (study, series, SOP instances)."""
    study, uids = generate_uid(), set()
    uids.add(study)
    for _ in range(n_series):
        series = generate_uid()
        uids.add(series)
        for i in range(per_series):
            data = orthanc.instance(rng.integers(0, 65535, (24, 24), dtype=np.uint16), pid, study, series,
                                    "ct" if i % 2 else "mr", i)
            uids.add(str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID))
            o.upload(data)
    return uids


def sync(c, o, **kw):
    return pacs.sync(c, o.url, "pacs", label_tag="StudyDescription", workers=1, chunk=1, **kw)


def clear_uids(conn, uids: set[str]) -> int:
    return conn.execute("SELECT count(*) FROM medsim.pacs_instances WHERE study_uid = ANY(%(u)s) "
                        "OR series_uid = ANY(%(u)s) OR sop_uid = ANY(%(u)s)", {"u": sorted(uids)}).fetchone()[0]


@needs_orthanc
def test_sync_and_delete_patient_race(conn, db_url, server):
    rng, pick = np.random.default_rng(34), random.Random(34)
    upload_patient(server, "someone", rng)
    sync(conn, server)
    uids, raced, rounds = {}, 0, 15
    for r in range(rounds):
        uids[r] = upload_patient(server, f"X{r}", rng)
        report, deleted = race(db_url, partial(sync, o=server), f"X{r}", pick.uniform(0, 0.1))
        assert deleted is not None, "the sync stored nothing of the patient"
        assert on_file(conn, f"X{r}") == 0, f"round {r}: the withdrawn patient's images are back"
        refused = withdrawn_refusals(report.archive)
        raced += bool(refused)
        assert all(why == f"{WITHDRAWN}{deleted})" for why in refused)
        assert clear_uids(conn, uids[r]) == 0, f"round {r}: pacs_instances keeps the patient's UIDs in clear"
    assert raced >= 3, "the deletion never landed while the sync was running: the test raced nothing"
    # every instance of theirs is settled (by its keyed hash): a --full sync fetches none of them
    fetched = []
    real = pacs_client.Server.retrieve_series
    pacs_client.Server.retrieve_series = lambda srv, study, series: fetched.append(series) or real(srv, study, series)
    try:
        full = sync(conn, server, full=True)
    finally:
        pacs_client.Server.retrieve_series = real
    assert fetched == [] and full.archive is None
    assert full.known == full.listed == 12 * (rounds + 1)
    assert sum(on_file(conn, f"X{r}") for r in range(rounds)) == 0 and on_file(conn, "someone") == 12
    assert all(clear_uids(conn, u) == 0 for u in uids.values())
    hashed = conn.execute("SELECT count(*) FROM medsim.pacs_instances WHERE sop_uid LIKE 'k:2.25.%' "
                          "AND study_uid LIKE 'k:2.25.%' AND series_uid LIKE 'k:2.25.%'").fetchone()[0]
    assert hashed == 12 * rounds


@needs_orthanc
def test_a_deletion_mid_sync_settles_the_rest_as_refused_by_their_hash(conn, db_url, server, monkeypatch):
    """Deterministic: the patient is deleted while the sync fetches their second series."""
    rng = np.random.default_rng(7)
    uids = upload_patient(server, "X", rng)
    upload_patient(server, "keep", rng, n_series=1)
    real, seen = pacs_client.Server.retrieve_series, []

    def retrieve_series(srv, study, series):
        seen.append(series)
        if len([s for s in seen if s in uids]) == 2 and seen[-1] in uids:
            with psycopg.connect(db_url, autocommit=True) as c:
                deletion.delete(c, patient_id="X", reason="consent withdrawn")
        return real(srv, study, series)

    monkeypatch.setattr(pacs_client.Server, "retrieve_series", retrieve_series)
    r = sync(conn, server)
    did = conn.execute("SELECT id FROM medsim.deletions").fetchone()[0]
    assert on_file(conn, "X") == 0 and on_file(conn, "keep") == 3
    assert withdrawn_refusals(r.archive) == [f"{WITHDRAWN}{did})"] * 9
    rows = conn.execute("SELECT outcome, reason, image_id FROM medsim.pacs_instances "
                        "WHERE sop_uid LIKE 'k:%' ORDER BY outcome").fetchall()
    assert len(rows) == 12 and clear_uids(conn, uids) == 0
    assert rows.count(("refused", f"{WITHDRAWN}{did})", None)) == 9  # the three stored first: image_id NULL
    seen.clear()
    full = sync(conn, server, full=True)
    assert seen == [] and full.archive is None and (full.known, full.withdrawn) == (15, 0)
    # a key rotation rewrites the hashed rows too: still known by their hash (not merely
    # left out because their patient is withdrawn)
    monkeypatch.setenv("MEDSIM_NEW_PATIENT_KEY", NEW_KEY)
    keys.rotate(conn, NEW_KEY)
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", NEW_KEY)
    monkeypatch.setenv("MEDSIM_PATIENT_KEY_PREVIOUS", KEY)
    full = sync(conn, server, full=True)
    assert seen == [] and full.archive is None and (full.known, full.withdrawn) == (15, 0)
