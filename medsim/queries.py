"""Every runtime query lives in queries.sql under a `-- name: NAME` header; this module
loads them once so callers write ``Q.claim_batch``.

Rows come back named: ``rows``/``one`` build a dataclass per row with psycopg's
``class_row``, so a column that is renamed, dropped or reordered fails loudly (a missing
or unexpected keyword) instead of being misread by position.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import TypeVar

from psycopg.rows import class_row

T = TypeVar("T")


def load(path: Path) -> SimpleNamespace:
    text = path.read_text()
    parts = re.split(r"^-- name: (\w+)[^\n]*\n", text, flags=re.M)
    queries = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} defined twice in {path}")
        queries[name] = body.strip().rstrip(";")
    return SimpleNamespace(**queries)


Q = load(Path(__file__).with_name("queries.sql"))


def rows(conn, query, params: dict | None = None, *, as_: type[T]) -> list[T]:
    with conn.cursor(row_factory=class_row(as_)) as cur:
        return cur.execute(query, params).fetchall()


def one(conn, query, params: dict | None = None, *, as_: type[T]) -> T | None:
    with conn.cursor(row_factory=class_row(as_)) as cur:
        return cur.execute(query, params).fetchone()


def dicts(conn, query, params: dict | None = None) -> list[dict]:
    """Rows as dicts keyed by column name (for answers passed on as JSON as they are)."""
    cur = conn.execute(query, params)
    names = [d.name for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def scalar(conn, query, params: dict | None = None):
    """The first column of the first row (None when there is no row)."""
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]
