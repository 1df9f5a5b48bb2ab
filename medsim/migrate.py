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


def apply_sql(op, name: str) -> None:
    """Execute sql/<name> (CREATE OR REPLACE ...) inside a revision.

    Sent through the raw psycopg connection without parameters, so neither SQLAlchemy's
    ``:name`` binds nor ``%`` placeholders are interpreted inside function bodies.
    """
    raw = op.get_bind().connection.driver_connection
    raw.execute((SQL_DIR / name).read_text())
