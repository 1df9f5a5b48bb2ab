"""Run Alembic from Python (the demo, the tests) and apply the idempotent SQL in sql/."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = ROOT / "sql"


def alembic_config(url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "db"))
    cfg.attributes["url"] = url
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


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


def head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("")).get_current_head()


def check(conn) -> None:
    """Raise SchemaNotReady unless the database is at this code's head revision.

    Commands call it before touching medsim tables, so an unmigrated (or newer) database
    gives one clear sentence instead of an UndefinedTable traceback. to_regclass keeps a
    missing table from being an error (which would abort an open transaction).
    """
    found = conn.execute("SELECT to_regclass('public.alembic_version') IS NOT NULL").fetchone()[0]
    row = conn.execute("SELECT version_num FROM public.alembic_version").fetchone() if found else None
    have, want = (row[0] if row else None), head()
    if have == want:
        return
    if have is None:
        raise SchemaNotReady("the database has no medsim schema yet: run `medsim migrate` "
                             "(or `alembic upgrade head`)")
    from alembic.script import ScriptDirectory

    known = {r.revision for r in ScriptDirectory.from_config(alembic_config("")).walk_revisions()}
    if have in known:
        raise SchemaNotReady(f"the database is at revision {have}, this medsim needs {want}: "
                             "run `medsim migrate` (or `alembic upgrade head`)")
    raise SchemaNotReady(f"the database is at revision {have}, which this medsim does not know "
                         f"(it needs {want}): it was migrated by a newer medsim")


def apply_sql(op, name: str) -> None:
    """Execute sql/<name> (CREATE OR REPLACE ...) inside a revision.

    Sent through the raw psycopg connection without parameters, so neither SQLAlchemy's
    ``:name`` binds nor ``%`` placeholders are interpreted inside function bodies.
    """
    raw = op.get_bind().connection.driver_connection
    raw.execute((SQL_DIR / name).read_text())
