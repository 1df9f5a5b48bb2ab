import psycopg

from medsim import migrate

EXPECTED_TABLES = {"datasets", "images"}


def tables(url):
    with psycopg.connect(url) as c:
        return {r[0] for r in c.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'medsim'")}


def test_round_trip_on_empty_database(empty_db_url):
    assert migrate.current(empty_db_url) is None
    migrate.upgrade(empty_db_url)
    head = migrate.current(empty_db_url)
    assert head is not None
    assert tables(empty_db_url) >= EXPECTED_TABLES
    with psycopg.connect(empty_db_url) as c:
        assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    migrate.downgrade(empty_db_url, "base")
    assert migrate.current(empty_db_url) is None
    with psycopg.connect(empty_db_url) as c:
        assert c.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'medsim'").fetchone() is None
        assert c.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is None
    migrate.upgrade(empty_db_url)
    assert migrate.current(empty_db_url) == head
    assert tables(empty_db_url) >= EXPECTED_TABLES


def test_each_revision_downgrades_one_step(empty_db_url):
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrate.alembic_config(empty_db_url))
    revs = [r.revision for r in reversed(list(script.walk_revisions()))]
    for rev in revs:
        migrate.upgrade(empty_db_url, rev)
        assert migrate.current(empty_db_url) == rev
    for rev in reversed(revs[:-1]):
        migrate.downgrade(empty_db_url, rev)
        assert migrate.current(empty_db_url) == rev


def test_alembic_command_line_reads_database_url(empty_db_url, monkeypatch):
    import subprocess
    import sys

    env = {"DATABASE_URL": empty_db_url, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=migrate.ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert migrate.current(empty_db_url) is not None
