"""Every runtime query lives in queries.sql under a `-- name: NAME` header; this module
loads them once so callers write ``Q.claim_batch``."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace


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
