"""Schema management: Alembic revisions, then the replaceable objects in sql/.

Two kinds of schema change, kept apart (pgai's incremental/idempotent split; Alembic's
"Replaceable Objects" cookbook), both shipped inside the package (medsim/schema/), so
that `pip install medsim` (a wheel, not only an editable checkout) can migrate:
- ``schema/versions/`` (Alembic): tables, columns, indexes. Forward, never edited once
  landed. Adding one: docs/contributing.md (and bump HEAD below).
- ``schema/sql/NNN_*.sql``: views, functions, triggers and grants, written as ``CREATE OR
  REPLACE``. They describe the current code, so they are applied once, after the
  revisions, whenever the database reaches head (``schema/env.py`` calls ``apply_sql``).
  A revision never applies them: an old revision running the *current* view text
  breaks as soon as that view uses a column a later revision adds.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from medsim.errors import SchemaNotReady

SCHEMA_DIR = Path(__file__).resolve().parent / "schema"
SQL_DIR = SCHEMA_DIR / "sql"

# The revision this code needs. A constant, so that the check every command makes before
# touching the database costs no Alembic import (0.2 s of start-up: Alembic loads
# SQLAlchemy); tests/test_migrations.py asserts it is Alembic's head. Alembic itself is
# imported only where it runs migrations or explains a mismatch.
HEAD = "0022"

# Concurrent `alembic upgrade head` runs (docker compose starts several workers, each
# migrating first) would race on DDL; they take turns on this session lock instead. Any
# login can take an advisory lock (a reader's psql once held this one and `medsim migrate`
# hung without a word), so the wait is bounded and the answer names who holds it.
MIGRATE_TRY_LOCK = "SELECT pg_try_advisory_lock(hashtext('medsim.migrate'))"
MIGRATE_UNLOCK = "SELECT pg_advisory_unlock(hashtext('medsim.migrate'))"
LOCK_HOLDER = """
SELECT a.pid, a.usename, coalesce(nullif(a.application_name, ''), 'no application name'), a.backend_start
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid::bigint = %(high)s AND l.objid::bigint = %(low)s AND l.database = (
      SELECT oid FROM pg_database WHERE datname = current_database())
"""
DEFAULT_LOCK_WAIT_S = 60.0


def lock_holder(raw_conn, name: str) -> str:
    """Who holds the advisory lock keyed hashtext(name): "session N (user U, app, connected
    ...)" or "another session" (for the sentence a bounded lock wait ends with)."""
    key = raw_conn.execute("SELECT hashtext(%s)::bigint", (name,)).fetchone()[0] & 0xFFFFFFFFFFFFFFFF
    holder = raw_conn.execute(LOCK_HOLDER, {"high": key >> 32, "low": key & 0xFFFFFFFF}).fetchone()
    return (f"session {holder[0]} (user {holder[1]}, {holder[2]}, connected {holder[3]:%Y-%m-%d %H:%M})"
            if holder else "another session")


def take_migration_lock(raw_conn, wait_s: float = DEFAULT_LOCK_WAIT_S) -> None:
    """The migration lock, or SchemaNotReady after wait_s naming the session that holds it."""
    import time

    deadline = time.monotonic() + wait_s
    while not raw_conn.execute(MIGRATE_TRY_LOCK).fetchone()[0]:
        if time.monotonic() >= deadline:
            who = lock_holder(raw_conn, "medsim.migrate")
            raise SchemaNotReady(f"waited {wait_s:.0f}s for the migration lock, which {who} holds: another medsim "
                                 f"migrate is running, or that session took the lock; end it or wait")
        time.sleep(0.2)


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()  # no alembic.ini: everything it would say is set here
    cfg.set_main_option("script_location", str(SCHEMA_DIR))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["url"] = url
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(url: str, revision: str = "head", lock_wait_s: float = DEFAULT_LOCK_WAIT_S) -> None:
    from alembic import command

    cfg = alembic_config(url)
    cfg.attributes["lock_wait_s"] = lock_wait_s
    command.upgrade(cfg, revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def revisions() -> list[str]:
    """Every revision in schema/versions, head first (from Alembic's script directory)."""
    from alembic.script import ScriptDirectory

    return [r.revision for r in ScriptDirectory.from_config(alembic_config("")).walk_revisions()]


def current(url: str) -> str | None:
    import psycopg

    with psycopg.connect(url) as conn:
        try:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        except psycopg.errors.UndefinedTable:
            return None
    return row[0] if row else None


def check(conn) -> None:
    """Raise SchemaNotReady unless the database is at this code's head revision.

    Commands call it before touching medsim tables, so an unmigrated (or newer) database
    gives one clear sentence instead of an UndefinedTable traceback. to_regclass keeps a
    missing table from being an error (which would abort an open transaction).
    """
    found = conn.execute("SELECT to_regclass('public.alembic_version') IS NOT NULL").fetchone()[0]
    row = conn.execute("SELECT version_num FROM public.alembic_version").fetchone() if found else None
    have = row[0] if row else None
    if have == HEAD:
        # the revision is not the whole schema: sql/ changes without a new revision (a new
        # argument of search_gallery did), and a database migrated by an older medsim then
        # answered the first search with "function medsim.search_gallery(...) does not exist"
        stamp = conn.execute("SELECT obj_description('medsim'::regnamespace, 'pg_namespace')").fetchone()[0]
        if stamp != sql_stamp():
            raise SchemaNotReady("the database's views and functions are not this medsim's (another version "
                                 "applied them): run `medsim migrate` to apply this version's")
        return
    if have is None:
        raise SchemaNotReady("the database has no medsim schema yet: run `medsim migrate` "
                             "(or `alembic upgrade head`)")
    if have in revisions():
        raise SchemaNotReady(f"the database is at revision {have}, this medsim needs {HEAD}: "
                             "run `medsim migrate` (or `alembic upgrade head`)")
    raise SchemaNotReady(f"the database is at revision {have}, which this medsim does not know "
                         f"(it needs {HEAD}): it was migrated by a newer medsim")


def ensure_roles(raw_conn) -> None:
    """The cluster-wide roles medsim grants to (000_roles.sql), e.g. before a restore."""
    raw_conn.execute((SQL_DIR / "000_roles.sql").read_text())


def ensure_user_roles(raw_conn) -> None:
    """Each medsim user's own role (006_user_roles.sql), e.g. after a restore."""
    raw_conn.execute((SQL_DIR / "006_user_roles.sql").read_text())


def sql_files() -> list[Path]:
    """The replaceable objects, in the order their names give (NNN_ prefixes)."""
    return sorted(SQL_DIR.glob("*.sql"))


@lru_cache(maxsize=1)
def sql_stamp() -> str:
    """What apply_sql leaves as the medsim schema's comment: a digest of every sql/ file,
    so that check() can tell that the views and functions in the database are this code's.
    Once per process: the files are this code's, and check() also serves /health."""
    digest = hashlib.sha256()
    for path in sql_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"medsim views and functions {digest.hexdigest()[:16]}"


def stamp_statement() -> str:
    return f"COMMENT ON SCHEMA medsim IS '{sql_stamp()}'"  # hex digits only: nothing to quote


# Views are dropped and created again rather than replaced: CREATE OR REPLACE VIEW cannot
# drop, rename or retype a column, and sql/ must always win. One DROP statement for all of
# them, so dependencies between medsim's own views need no ordering; a view of someone
# else's that depends on one of ours makes the migration fail loudly instead of vanishing.
DROP_VIEWS = """
DO $$
DECLARE
    v_names text;
BEGIN
    SELECT string_agg(format('%I.%I', schemaname, viewname), ', ') INTO v_names
    FROM pg_views WHERE schemaname = 'medsim';
    IF v_names IS NOT NULL THEN
        EXECUTE 'DROP VIEW ' || v_names;
    END IF;
END
$$
"""


# Leaving head (a downgrade, or an upgrade that stops short): everything sql/ made goes,
# views and functions alike (CASCADE takes the triggers that use them), so that no
# revision's downgrade is blocked by an object it did not create. Below head medsim
# refuses to run anyway; reaching head again applies sql/ afresh.
DROP_REPLACEABLE = DROP_VIEWS + """;
DO $$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS sig FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'medsim' LOOP
        EXECUTE 'DROP FUNCTION ' || f.sig || ' CASCADE';
    END LOOP;
END
$$
"""


def apply_sql(raw_conn) -> None:
    """Apply every sql/ file on a raw psycopg connection, inside the caller's transaction.

    Sent without parameters, so neither SQLAlchemy's ``:name`` binds nor ``%``
    placeholders are interpreted inside function bodies.
    """
    raw_conn.execute(DROP_VIEWS)
    for path in sql_files():
        raw_conn.execute(path.read_text())
    raw_conn.execute(stamp_statement())
