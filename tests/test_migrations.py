from pathlib import Path

import psycopg
import pytest

from medsim import migrate

REPO = Path(migrate.__file__).resolve().parents[1]
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
    out = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=REPO,
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


# ---------------------------------------------------------------- reproducible upgrades
SCHEMA_SNAPSHOT = {
    "columns": "SELECT table_name, column_name, data_type, is_nullable, column_default "
               "FROM information_schema.columns WHERE table_schema = 'medsim' ORDER BY 1, 2",
    "views": "SELECT viewname, definition FROM pg_views WHERE schemaname = 'medsim' ORDER BY 1",
    "functions": "SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_functiondef(p.oid) "
                 "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                 "WHERE n.nspname = 'medsim' ORDER BY 1, 2",
    "triggers": "SELECT tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'medsim' AND NOT t.tgisinternal ORDER BY 1",
    "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'medsim' ORDER BY 1",
    "reader_grants": "SELECT table_name, privilege_type FROM information_schema.role_table_grants "
                     "WHERE grantee = 'medsim_reader' AND table_schema = 'medsim' ORDER BY 1, 2",
}


def snapshot(url) -> dict:
    with psycopg.connect(url) as c:
        return {k: c.execute(q).fetchall() for k, q in SCHEMA_SNAPSHOT.items()}


def test_upgrade_from_every_revision_gives_the_fresh_schema(admin_url):
    """empty -> r -> head, for every r, is the same schema as empty -> head."""
    from tests.conftest import create_database

    fresh = create_database(admin_url, "mig_fresh")
    migrate.upgrade(fresh)
    want = snapshot(fresh)
    assert want["views"] and want["functions"] and want["triggers"] and want["reader_grants"]
    for i, rev in enumerate(reversed(migrate.revisions())):
        url = create_database(admin_url, f"mig_from_{i}")
        migrate.upgrade(url, rev)
        migrate.upgrade(url)
        assert snapshot(url) == want, f"upgrading from {rev} differs from a fresh upgrade"


def test_sql_using_the_newest_table_does_not_break_old_revisions(admin_url, tmp_path, monkeypatch):
    """The bug this layout prevents: revisions used to apply the *current* sql/ files, so
    a view over a table (or column) that a later revision adds broke every fresh upgrade
    at the old revision. Here the first sql/ file gets such a view; a fresh upgrade, and
    an upgrade from every intermediate revision, must still reach head with it."""
    import shutil

    from tests.conftest import create_database

    sql_dir = tmp_path / "sql"
    shutil.copytree(migrate.SQL_DIR, sql_dir)
    first = sorted(sql_dir.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\nCREATE OR REPLACE VIEW medsim.newest_reports AS\n"
                     "SELECT id, model_id, created_at FROM medsim.recall_reports;\n")
    monkeypatch.setattr(migrate, "SQL_DIR", sql_dir)
    for i, rev in enumerate([None, *reversed(migrate.revisions())]):
        url = create_database(admin_url, f"mig_newest_{i}")
        if rev is not None:
            migrate.upgrade(url, rev)
        migrate.upgrade(url)
        with psycopg.connect(url) as c:
            assert c.execute("SELECT count(*) FROM medsim.newest_reports").fetchone() == (0,)
    migrate.downgrade(url, "base")  # the extra view must not block dropping its table
    assert migrate.current(url) is None


def test_sql_is_reapplied_when_already_at_head(db_url):
    """`medsim migrate` at head re-applies sql/: a view someone replaced by hand comes back."""
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("CREATE OR REPLACE FUNCTION medsim.label_name(p_dataset_id integer, p_labels smallint[]) "
                  "RETURNS text "
                  "LANGUAGE sql AS $$ SELECT 'tampered' $$")
        migrate.upgrade(db_url)
        assert c.execute("SELECT medsim.label_name(1, '{0}')").fetchone() != ("tampered",)


def test_views_and_functions_of_another_version_are_one_sentence(db_url, capsys):
    """At head, but sql/ applied by another medsim (sql/ changes without a revision): a
    search used to end in "function medsim.search_gallery(...) does not exist"; now every
    command says to migrate, and `medsim migrate` makes it whole."""
    from medsim import cli

    with psycopg.connect(db_url, autocommit=True) as c:
        migrate.check(c)  # the template was migrated by this code: its stamp matches
        # what an older medsim left: its own stamp, and a search function without p_splits
        c.execute("COMMENT ON SCHEMA medsim IS 'medsim views and functions 0123456789abcdef'")
        c.execute("DROP FUNCTION medsim.search_gallery(vector, integer, integer, jsonb, text, bigint, integer, "
                  "text[]) CASCADE")
        assert cli.main(["search", "--image-id", "1"]) == 2
        err = capsys.readouterr().err
        assert "views and functions are not this medsim's" in err and "run `medsim migrate`" in err
        assert "does not exist" not in err
        assert cli.main(["migrate"]) == 0
        migrate.check(c)
        assert c.execute("SELECT to_regprocedure('medsim.search_gallery(vector, integer, integer, jsonb, text, "
                         "bigint, integer, text[])') IS NOT NULL").fetchone()[0]
        assert c.execute("SELECT obj_description('medsim'::regnamespace, 'pg_namespace')").fetchone()[0] \
            == migrate.sql_stamp()


@pytest.mark.slow
def test_a_wheel_install_migrates_an_empty_database(empty_db_url, tmp_path):
    """`pip install .` (a wheel, not an editable checkout) gives a medsim that creates its own
    schema: the revisions and sql/ ship inside the package. The wheel is built from a copy
    of the sources (setuptools builds in the source tree) and installed into a fresh venv
    whose only medsim is the wheel's; the dependencies come from this venv."""
    import shutil
    import site
    import subprocess
    import sys

    src = tmp_path / "src"
    shutil.copytree(REPO / "medsim", src / "medsim", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    [wheel] = (tmp_path / "dist").glob("medsim-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                        purelib, str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # the dependencies, not medsim: a plain path line does not run this venv's editable-install hook
    (Path(purelib) / "medsim-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {"DATABASE_URL": empty_db_url, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    where = subprocess.run([str(py), "-c", "import medsim; print(medsim.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert where.stdout.strip().startswith(purelib), where
    r = subprocess.run([str(py), "-m", "medsim", "migrate"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"database at revision {migrate.HEAD}" in r.stdout
    with psycopg.connect(empty_db_url) as c:  # and the replaceable objects came with it
        assert c.execute("SELECT to_regprocedure('medsim.search_gallery(vector, integer, integer, jsonb, text, "
                         "bigint, integer, text[])') IS NOT NULL").fetchone() == (True,)


def test_retina_grades_get_readable_names_old_databases_too(db_url, conn, synth_dir):
    """New ingests name RetinaMNIST's labels as grades; revision 0017 renames a database
    ingested with the bare digits, and its downgrade puts them back. Labels (integers), and
    so label keys, do not change."""
    from tests.helpers import ingest_synth

    ingest_synth(conn, synth_dir, flags=("retinamnist",))

    def names():  # off head, the functions that name an image's label are gone: the table itself
        return [r[0] for r in conn.execute(
            "SELECT v FROM medsim.datasets, jsonb_each_text(label_names) AS e(k, v) ORDER BY k")]

    grades = ["grade 0 (no retinopathy)", "grade 1 (mild)", "grade 2 (moderate)", "grade 3 (severe)",
              "grade 4 (proliferative)"]
    assert names() == grades
    assert conn.execute("SELECT DISTINCT medsim.label_name(dataset_id, labels) FROM medsim.images "
                        "ORDER BY 1").fetchall()[0] == ("grade 0 (no retinopathy)",)
    labels_before = conn.execute("SELECT array_agg(labels ORDER BY id) FROM medsim.images").fetchone()[0]
    conn.commit()
    migrate.downgrade(db_url, "0016")
    assert names() == ["0", "1", "2", "3", "4"]
    conn.commit()
    migrate.upgrade(db_url)
    assert names() == grades
    assert conn.execute("SELECT array_agg(labels ORDER BY id) FROM medsim.images").fetchone()[0] == labels_before
    # an archive's own names, even digits, are left alone
    conn.execute("UPDATE medsim.datasets SET is_medmnist = false")
    conn.execute("""UPDATE medsim.datasets SET label_names = '{"0":"0","1":"1","2":"2","3":"3","4":"4"}'""")
    conn.commit()
    migrate.downgrade(db_url, "0016")
    migrate.upgrade(db_url)
    assert names() == ["0", "1", "2", "3", "4"]
