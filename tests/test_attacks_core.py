"""Issue 33, the access core's doors: lockouts an attacker could cause, the forwarded
header, metadata of ungranted datasets, passwords on the embedded server, deleting and
disabling users, the access log's hash chain, SQL logins' limits and advisory locks.

Each test is one of the issue's probes, made as the attacker (or the malicious SQL user)
made it, against `medsim serve` in process and a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import getpass
import itertools
import os
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from fastapi.testclient import TestClient

from medsim import access, access_log, db
from medsim.errors import Busy, NotFound
from medsim.service.app import create_app
from medsim.service.guard import TrustedProxies
from medsim.service.state import ServeConfig
from tests.conftest import create_database
from tests.helpers import embed_all, ingest_synth, register_model

_n = itertools.count()


@pytest.fixture(scope="module")
def town(admin_url, template_db, tmp_path_factory):
    """Synthetic breast + retina, a current model trained (on paper) on both, embedded;
    alice sees breastmnist only, root every dataset."""
    from tests import synth

    url = create_database(admin_url, f"t_core_{next(_n)}", template=template_db)
    d = tmp_path_factory.mktemp("npz")
    synth.write_npz(d, "breastmnist", seed=1)
    synth.write_npz(d, "retinamnist", seed=2)
    with db.connect(url, autocommit=True) as conn:
        ingest_synth(conn, d)
        mid = register_model(conn)
        conn.execute("INSERT INTO medsim.training_epochs VALUES (%s, 1, 1, 0.5, 1, 0.5, 0.5, 1)", (mid,))
        embed_all(url)
        tokens = {}
        for user, grants in (("alice", ["breastmnist"]), ("root", None)):
            access.add_user(conn, user, sql_login=True)
            access.grant(conn, user, grants or [], every=grants is None)
            tokens[user] = access.create_token(conn, user, "admin" if grants is None else "images")
    return {"url": url, "tokens": tokens, "mid": mid}


def bearer(token: str) -> dict:
    return {"Authorization": "Bearer " + token}


# --------------------------------------------------------------------------- 1-2: lockouts

def test_strangers_cannot_lock_a_token_out_by_its_id(town):
    """Probe 1: 50 requests naming token ids with garbage secrets, from many addresses,
    used to make the real tokens answer 429 for a minute."""
    token, tid = town["tokens"]["alice"]
    app = create_app(ServeConfig(database_url=town["url"]))
    for n in range(12):
        with TestClient(app, client=(f"198.51.100.{n}", 1000)) as attacker:
            for _ in range(5):
                assert attacker.get("/datasets", headers=bearer(f"msm_{tid}_" + "x" * 43)).status_code in (401, 429)
    with TestClient(app, client=("203.0.113.9", 1000)) as alice:
        r = alice.get("/datasets", headers=bearer(token))
        assert r.status_code == 200, r.text


def test_failures_at_one_address_never_refuse_a_valid_token_there(town):
    """Probe 2: ten bad tokens from one address (a hospital NAT) locked out every real user
    behind it, the admin included. Now the failing requests slow down (429), the valid
    ones pass."""
    app = create_app(ServeConfig(database_url=town["url"]))
    with TestClient(app, client=("10.0.0.1", 1000)) as nat:
        codes = [nat.get("/datasets", headers=bearer(f"msm_{9000 + i}_" + "y" * 43)).status_code for i in range(15)]
        assert codes[:10] == [401] * 10 and set(codes[10:]) == {429}
        r = nat.get("/datasets", headers=bearer("garbage"))
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0 and "this address" in r.json()["detail"]
        for user in ("alice", "root"):
            assert nat.get("/datasets", headers=bearer(town["tokens"][user][0])).status_code == 200


def test_a_pair_limit_slows_guessing_one_token_from_one_address(town):
    token, tid = town["tokens"]["alice"]
    app = create_app(ServeConfig(database_url=town["url"]))
    with TestClient(app, client=("10.0.0.2", 1000)) as guesser:
        codes = [guesser.get("/datasets", headers=bearer(f"msm_{tid}_" + "z" * 43)).status_code for _ in range(7)]
        assert codes[:5] == [401] * 5 and codes[5:] == [429, 429]
        assert guesser.get("/datasets", headers=bearer(token)).status_code == 200


# --------------------------------------------------------------------------- 3: X-Forwarded-For

def test_forwarded_for_is_believed_only_from_trusted_proxies(town):
    """Probe 3: from a loopback peer, X-Forwarded-For decided the rate-limited address and
    what access_log.client recorded."""
    token = town["tokens"]["alice"][0]
    forged = {**bearer(token), "X-Forwarded-For": "6.6.6.6"}
    for allow, expect in ((None, "127.0.0.1"), ("127.0.0.1", "6.6.6.6")):
        app = create_app(ServeConfig(database_url=town["url"], forwarded_allow_ips=allow))
        with TestClient(app, client=("127.0.0.1", 1000)) as client:
            assert client.get("/images/1/thumbnail.png", headers=forged).status_code in (200, 404)
        with db.connect(town["url"]) as conn:
            got = conn.execute("SELECT client, forwarded FROM medsim.access_log ORDER BY chain_seq DESC LIMIT 1"
                               ).fetchone()
        assert got == (expect, "6.6.6.6"), (allow, got)


def test_trusted_proxies_take_the_first_untrusted_hop():
    p = TrustedProxies("10.0.0.0/8, 127.0.0.1")
    assert p.client("127.0.0.1", "6.6.6.6, 10.1.2.3").address == "6.6.6.6"
    assert p.client("127.0.0.1", "1.1.1.1, 6.6.6.6").address == "6.6.6.6"  # only the last hop is vouched for
    assert p.client("192.0.2.1", "6.6.6.6").address == "192.0.2.1"  # an untrusted peer's header is ignored
    assert p.client("127.0.0.1", "not an address").address == "127.0.0.1"
    with pytest.raises(Exception, match="forwarded-allow-ips"):
        TrustedProxies("10.0.0.0/33")


# --------------------------------------------------------------------------- 4: metadata

def sql_login(town, user: str):
    return db.connect(town["url"].replace("postgresql://postgres", f"postgresql://medsim_user_{user}", 1),
                      autocommit=True)


def test_a_sql_login_sees_no_metadata_of_ungranted_datasets(town):
    """Probe 4: models.datasets, pacs_sources, training_epochs, gallery_versions."""
    with db.connect(town["url"], autocommit=True) as conn:
        retina = conn.execute("SELECT id FROM medsim.datasets WHERE flag = 'retinamnist'").fetchone()[0]
        conn.execute("INSERT INTO medsim.pacs_sources (dataset_id, url, viewer) VALUES "
                     "(%s, 'http://secret-pacs.example/dicom-web', 'http://viewer/{study}')", (retina,))
    with sql_login(town, "alice") as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT datasets FROM medsim.models")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT train_config FROM medsim.models")
        assert c.execute("SELECT datasets FROM medsim.model_catalog").fetchall() == [(["breastmnist"],)]
        assert c.execute("SELECT train_config ? 'flags' FROM medsim.model_catalog").fetchone() == (False,)
        assert c.execute("SELECT count(*) FROM medsim.pacs_sources").fetchone() == (0,)
        assert c.execute("SELECT count(*) FROM medsim.training_epochs").fetchone() == (0,)
        assert c.execute("SELECT count(*) FROM medsim.gallery_versions").fetchone() == (0,)
    with sql_login(town, "root") as c:  # every dataset: everything
        assert c.execute("SELECT datasets FROM medsim.model_catalog").fetchall() == [(["breastmnist", "retinamnist"],)]
        assert c.execute("SELECT url FROM medsim.pacs_sources").fetchall() == [("http://secret-pacs.example/dicom-web",)]
    with db.connect(town["url"]) as conn:  # the owner reads the lists whole through the catalogue too
        assert conn.execute("SELECT datasets FROM medsim.model_catalog").fetchone() == (["breastmnist", "retinamnist"],)


def test_models_over_http_and_search_still_work_for_a_partial_user(town):
    app = create_app(ServeConfig(database_url=town["url"]))
    with TestClient(app) as client:
        h = bearer(town["tokens"]["alice"][0])
        models = client.get("/models", headers=h).json()
        assert models and all(m["datasets"] == ["breastmnist"] for m in models), models
        with db.connect(town["url"]) as conn:
            q = conn.execute("SELECT i.id FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id "
                             "WHERE d.flag = 'breastmnist' AND i.split = 'test' LIMIT 1").fetchone()[0]
        r = client.post("/search", json={"image_id": q, "k": 3}, headers=h)
        assert r.status_code == 200 and len(r.json()["neighbours"]) == 3, r.text
        r = client.post("/search", json={"image_id": q, "k": 3, "engine": "exact"}, headers=h)
        assert r.status_code == 200 and r.json()["model"]["id"] == town["mid"], r.text


# --------------------------------------------------------------------------- 5: the embedded server

@pytest.mark.skipif(os.geteuid() != 0, reason="peer authentication for another OS user needs root to switch users")
def test_the_embedded_server_checks_passwords(tmp_path, monkeypatch):
    """Probe 5: the embedded server trusted everyone: a --sql-login user with any password,
    and `postgres` with any password, a superuser."""
    monkeypatch.setenv("MEDSIM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    url = db.embedded_start()
    try:
        from medsim import migrate

        migrate.upgrade(url)
        with db.connect(url, autocommit=True) as conn:  # the owner: the OS user running medsim, no password
            access.add_user(conn, "mallory", sql_login=True)
            conn.execute("ALTER ROLE medsim_user_mallory PASSWORD 'right horse battery'")
        as_mallory = url.replace("postgresql://postgres:", "postgresql://medsim_user_mallory:", 1)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(as_mallory.replace("mallory:", "mallory:wrong", 1)).close()
        with psycopg.connect(as_mallory.replace("mallory:", "mallory:right%20horse%20battery", 1)) as c:
            assert c.execute("SELECT current_user").fetchone() == ("medsim_user_mallory",)
        # another OS user (nobody) naming the superuser, with any password: refused
        superuser = url.replace("postgres:", "postgres:anything", 1)
        # where the package puts the socket in a world-writable directory (its runtime dir,
        # as root) any local user reaches it: make this one reachable, as that layout is
        here = tmp_path / "home" / "pgdata"
        while here != here.parent:
            here.chmod(here.stat().st_mode | 0o001)
            here = here.parent
        r = subprocess.run(["runuser", "-u", "nobody", "--", db.pg_tool("psql"), superuser, "-c", "SELECT 1"],
                           capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
        assert r.returncode != 0 and "authentication failed" in r.stderr, (r.stdout, r.stderr)
        assert getpass.getuser() in (tmp_path / "home" / "pgdata" / "pg_ident.conf").read_text()
    finally:
        db.embedded_stop()


# --------------------------------------------------------------------------- 8: users

def test_a_deleted_user_leaves_nothing_a_namesake_inherits(town):
    """Probe 8: deleting the row by hand left the role and its grants; a new user of that
    name inherited them although `user add` says it sees nothing until granted."""
    with db.connect(town["url"], autocommit=True) as conn:
        access.add_user(conn, "temp", sql_login=True)
        access.grant(conn, "temp", ["retinamnist"])
        token, _ = access.create_token(conn, "temp")
        d = access.delete_user(conn, "temp")
        assert d["grants"] == 1 and d["live_tokens"] == 1
        with pytest.raises(NotFound):
            access.delete_user(conn, "temp")
        assert conn.execute("SELECT count(*) FROM medsim.dataset_grants WHERE role_name = 'medsim_user_temp'"
                            ).fetchone() == (0,)
        access.add_user(conn, "temp")
        with pytest.raises(Exception, match="not valid"):
            access.authenticate(conn, "Bearer " + token)
        fresh = access.create_token(conn, "temp")[0]
        assert not access.authenticate(conn, "Bearer " + fresh).granted
        row = conn.execute("SELECT detail FROM medsim.access_log WHERE action = 'user' ORDER BY chain_seq DESC "
                           "LIMIT 1").fetchone()[0]
        assert row["deleted"] == "temp"
        access.delete_user(conn, "temp")


def test_a_disabled_user_is_refused_until_enabled(town):
    app = create_app(ServeConfig(database_url=town["url"]))
    with db.connect(town["url"], autocommit=True) as conn:
        access.add_user(conn, "sleepy")
        access.grant(conn, "sleepy", ["breastmnist"])
        token, _ = access.create_token(conn, "sleepy")
        access.set_disabled(conn, "sleepy", True)
        with TestClient(app) as client:
            r = client.get("/datasets", headers=bearer(token))
            assert r.status_code == 401 and "disabled" in r.json()["detail"]
            access.set_disabled(conn, "sleepy", False)
            assert client.get("/datasets", headers=bearer(token)).status_code == 200
        access.delete_user(conn, "sleepy")


def test_user_delete_from_the_cli(town):
    env = {**os.environ, "DATABASE_URL": town["url"]}
    with db.connect(town["url"], autocommit=True) as conn:
        access.add_user(conn, "leaver")
    r = subprocess.run([sys.executable, "-m", "medsim", "user", "delete", "leaver"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "deleted" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "medsim", "user", "delete", "leaver"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and "no user named 'leaver'" in r.stderr


# --------------------------------------------------------------------------- 10: the chain

def fill_log(url, n=6):
    with db.connect(url, autocommit=True) as conn:
        for i in range(n):
            access.log_as(conn, "alice", None, "10.0.0.5", "search", [i + 1], query_kind="image_id")


@pytest.fixture
def logged(db_url):
    fill_log(db_url)
    return db_url


def owner_does(url, *statements):
    with psycopg.connect(url, autocommit=True) as c:
        for s in statements:
            c.execute(s)


def test_an_untouched_log_verifies_and_prints_its_head(logged):
    with db.connect(logged) as conn:
        v = access_log.verify(conn)
        assert v.ok and v.rows == 6 and v.head_seq == 6, v.sentence()
        assert access_log.verify(conn, [f"3:{conn.execute('SELECT encode(row_hash, chr(104)||chr(101)||chr(120)) FROM medsim.access_log WHERE chain_seq = 3').fetchone()[0]}"]).ok


ATTACKS = {
    "update with the trigger disabled": [
        "ALTER TABLE medsim.access_log DISABLE TRIGGER append_only",
        "UPDATE medsim.access_log SET user_name = 'bob' WHERE chain_seq = 3",
        "ALTER TABLE medsim.access_log ENABLE TRIGGER append_only"],
    "DROP TRIGGER then delete": [
        "DROP TRIGGER append_only ON medsim.access_log",
        "DELETE FROM medsim.access_log WHERE chain_seq = 4"],
    "replica mode, delete the last rows": [
        "SET session_replication_role = replica",
        "DELETE FROM medsim.access_log WHERE chain_seq >= 5"],
    "backdated insert with the chain off": [
        "SET session_replication_role = replica",
        "INSERT INTO medsim.access_log (user_name, action, image_ids, at) VALUES ('alice', 'search', '{1}', "
        "now() - interval '30 days')"],
    "swapped table": [
        "CREATE TABLE medsim.access_log_copy (LIKE medsim.access_log INCLUDING ALL)",
        "INSERT INTO medsim.access_log_copy OVERRIDING SYSTEM VALUE SELECT * FROM medsim.access_log WHERE chain_seq <> 2",
        "ALTER TABLE medsim.access_log RENAME TO access_log_old",
        "ALTER TABLE medsim.access_log_copy RENAME TO access_log"],
    "delete a middle row, replica mode": [
        "SET session_replication_role = replica",
        "DELETE FROM medsim.access_log WHERE chain_seq = 2"],
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_every_rewrite_of_the_log_is_found(logged, attack):
    """Probe 10: the owner could disable the trigger, DROP TRIGGER, use replica mode, swap
    the table or insert a backdated row without a trace."""
    owner_does(logged, *ATTACKS[attack])
    with db.connect(logged) as conn:
        v = access_log.verify(conn)
    assert not v.ok, attack
    assert "broken" in v.sentence()


def test_a_rewrite_with_recomputed_hashes_is_caught_by_an_anchor(logged):
    with db.connect(logged) as conn:
        anchor = f"{access_log.verify(conn).head_seq}:{access_log.verify(conn).head_hash}"
    # the owner rewrites row 6 and recomputes its hash and the head: the chain alone is consistent
    owner_does(logged, "SET session_replication_role = replica",
               "UPDATE medsim.access_log SET user_name = 'bob' WHERE chain_seq = 6",
               "UPDATE medsim.access_log l SET row_hash = medsim.access_log_digest(l) WHERE chain_seq = 6",
               "UPDATE medsim.access_log_head SET row_hash = (SELECT row_hash FROM medsim.access_log "
               "WHERE chain_seq = 6)")
    with db.connect(logged) as conn:
        assert access_log.verify(conn).ok  # what the chain alone cannot see (the docs say so)
        v = access_log.verify(conn, [anchor])
    assert not v.ok and "anchor" in v.problem


def test_a_purge_is_a_row_of_the_chain_and_the_rest_still_verifies(logged):
    with db.connect(logged, autocommit=True) as conn:
        cut = conn.execute("SELECT at FROM medsim.access_log WHERE chain_seq = 4").fetchone()[0]
        d = access_log.purge(conn, cut, by="(admin: test)")
        assert d["through"] == 3 and d["rows"] == 3
        fill_log(logged, 2)
        v = access_log.verify(conn)
        assert v.ok, v.sentence()
        assert conn.execute("SELECT min(chain_seq), count(*) FROM medsim.access_log").fetchone() == (4, 6)
    # deleting more by hand afterwards is not a purge: found
    owner_does(logged, "SET session_replication_role = replica", "DELETE FROM medsim.access_log WHERE chain_seq = 4")
    with db.connect(logged) as conn:
        assert not access_log.verify(conn).ok


def test_concurrent_writers_keep_one_chain(db_url):
    def write(k):
        with db.connect(db_url, autocommit=True) as conn:
            for i in range(25):
                access.log_as(conn, f"w{k}", None, None, "search", [i])

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with db.connect(db_url) as conn:
        v = access_log.verify(conn)
    assert v.ok and v.rows == 100, v.sentence()


def test_verify_from_the_cli_exits_2_on_a_broken_chain(logged):
    env = {**os.environ, "DATABASE_URL": logged}
    ok = subprocess.run([sys.executable, "-m", "medsim", "access-log", "verify"], capture_output=True, text=True,
                        env=env, timeout=120)
    assert ok.returncode == 0 and "holds: 6 row(s)" in ok.stdout, ok.stderr
    owner_does(logged, *ATTACKS["update with the trigger disabled"])
    bad = subprocess.run([sys.executable, "-m", "medsim", "access-log", "verify"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2 and "broken at row 3" in bad.stdout, (bad.stdout, bad.stderr)


# --------------------------------------------------------------------------- 11: SQL logins

def test_a_sql_login_gets_timeouts_by_default(town):
    with sql_login(town, "alice") as c:
        assert c.execute("SHOW statement_timeout").fetchone() == ("1min",)
        assert c.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("5min",)


def test_a_sql_logins_advisory_lock_makes_user_add_wait_boundedly_and_name_it(town, monkeypatch):
    """Probe 11: a SQL login's pg_advisory_lock stalled `medsim user add` silently."""
    monkeypatch.setattr(access, "LOCK_WAIT_S", 1.0)
    with sql_login(town, "alice") as c:
        c.execute("SELECT pg_advisory_lock(hashtext('medsim.user:' || 'victim'))")
        with db.connect(town["url"], autocommit=True) as conn:
            t0 = time.monotonic()
            with pytest.raises(Busy, match="medsim_user_alice"):
                access.add_user(conn, "victim")
            assert time.monotonic() - t0 < 10
        c.execute("SELECT pg_advisory_unlock_all()")
    with db.connect(town["url"], autocommit=True) as conn:
        access.add_user(conn, "victim")
        access.delete_user(conn, "victim")


def test_log_rows_after_a_purge_keep_time_in_order(logged):
    with db.connect(logged) as conn:
        times = [r[0] for r in conn.execute("SELECT at FROM medsim.access_log ORDER BY chain_seq")]
    assert times == sorted(times) and times[-1] <= dt.datetime.now(dt.timezone.utc)


def test_a_sql_login_that_lifts_its_timeout_is_still_stopped(town):
    """Probe 11: SQL logins had no statement or idle timeout, and could ALTER ROLE their own away."""
    from medsim.service import reaper

    with sql_login(town, "alice") as c:
        c.execute("SET statement_timeout = 0")
        c.execute("ALTER ROLE medsim_user_alice SET statement_timeout = 0")  # allowed: its own session default
        done = {}

        def long_query():
            try:
                c.execute("SELECT pg_sleep(30)")
                done["result"] = "finished"
            except psycopg.errors.QueryCanceled:
                done["result"] = "cancelled"

        t = threading.Thread(target=long_query)
        t.start()
        time.sleep(1.5)
        with db.connect(town["url"], autocommit=True) as owner:
            ended = reaper.reap_once(owner, statement_s=1.0)
        t.join(10)
        assert done.get("result") == "cancelled" and [e[1] for e in ended] == ["medsim_user_alice"]
    with db.connect(town["url"], autocommit=True) as owner:  # the default again, for the other tests
        owner.execute("ALTER ROLE medsim_user_alice SET statement_timeout = '60s'")
