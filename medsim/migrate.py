"""Run Alembic from Python (the demo, the tests) and apply the idempotent SQL in sql/."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = ROOT / "sql"

# The revision this code needs. A constant, so that the check every command makes before
# touching the database costs no Alembic import (0.2 s of start-up: Alembic loads
# SQLAlchemy); tests/test_migrations.py asserts it is Alembic's head. Alembic itself is
# imported only where it runs migrations or explains a mismatch.
HEAD = "0005"


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "db"))
    cfg.attributes["url"] = url
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def revisions() -> list[str]:
    """Every revision in db/versions, head first (from Alembic's script directory)."""
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


class SchemaNotReady(RuntimeError):
    """The database is not at the revision this medsim needs."""


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
        return
    if have is None:
        raise SchemaNotReady("the database has no medsim schema yet: run `medsim migrate` "
                             "(or `alembic upgrade head`)")
    if have in revisions():
        raise SchemaNotReady(f"the database is at revision {have}, this medsim needs {HEAD}: "
                             "run `medsim migrate` (or `alembic upgrade head`)")
    raise SchemaNotReady(f"the database is at revision {have}, which this medsim does not know "
                         f"(it needs {HEAD}): it was migrated by a newer medsim")


def apply_sql(op, name: str) -> None:
    """Execute sql/<name> (CREATE OR REPLACE ...) inside a revision.

    Sent through the raw psycopg connection without parameters, so neither SQLAlchemy's
    ``:name`` binds nor ``%`` placeholders are interpreted inside function bodies.
    """
    raw = op.get_bind().connection.driver_connection
    raw.execute((SQL_DIR / name).read_text())
