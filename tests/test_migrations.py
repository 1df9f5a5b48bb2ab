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


def test_head_constant_is_alembics_head():
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrate.alembic_config(""))
    assert migrate.HEAD == script.get_current_head() == migrate.revisions()[0]


def test_each_revision_downgrades_one_step(empty_db_url):
    revs = list(reversed(migrate.revisions()))
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


def test_commands_refuse_a_database_not_at_head(empty_db_url, capsys):
    """An unmigrated, partly migrated or newer database gets one sentence saying what to
    do, from the CLI and from the worker, never an UndefinedTable traceback."""
    from medsim import cli, embed_worker

    def status_error():
        code = cli.main(["--database-url", empty_db_url, "status"])
        return code, capsys.readouterr().err

    code, err = status_error()
    assert code == 2 and "no medsim schema yet: run `medsim migrate`" in err
    assert embed_worker.main(["--database-url", empty_db_url, "--once", "--quiet"]) == 2
    assert "no medsim schema yet" in capsys.readouterr().err

    migrate.upgrade(empty_db_url, "0002")
    code, err = status_error()
    assert code == 2 and f"this medsim needs {migrate.HEAD}" in err

    migrate.upgrade(empty_db_url)
    with psycopg.connect(empty_db_url, autocommit=True) as c:
        migrate.check(c)  # at head: no error
        c.execute("UPDATE alembic_version SET version_num = '9999_future'")
        try:
            migrate.check(c)
            raise AssertionError("a newer schema was accepted")
        except migrate.SchemaNotReady as err:
            assert "migrated by a newer medsim" in str(err)
        c.execute("UPDATE alembic_version SET version_num = %s", (migrate.HEAD,))

    assert cli.main(["--database-url", empty_db_url, "migrate", "nonsense"]) == 2
