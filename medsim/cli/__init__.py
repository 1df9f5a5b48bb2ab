"""`medsim` command line: a thin shell over the stage modules, which tests call directly.

One module per command group (data, models, embeddings, search, serve); options that mean
the same everywhere are declared once, as parent parsers (common.py). It runs no SQL of
its own, and a command imports a stage only when it runs: `medsim status` or `medsim
search --image-id` through pgvector never pay for torch (2.7 s to import here) or FAISS.
"""

from __future__ import annotations

import argparse
import os
import sys

import psycopg

from medsim import db
from medsim.cli import access, data, embeddings, keys, models, pacs, search, serve
from medsim.errors import DatabaseUnavailable, MedsimError

GROUPS = (data, pacs, keys, access, models, embeddings, search, serve)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medsim")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medsim",
        description="Medical image similarity search on PostgreSQL + pgvector. New here? Run "
                    "`medsim demo --help`; the database is the embedded one unless DATABASE_URL is set.")
    p.add_argument("--database-url", default=None,
                   help="postgresql:// URL (default: $DATABASE_URL, then PG* variables, then the embedded server)")
    p.add_argument("--version", action="version", version=f"medsim {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "psql":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.func(args)
    except MedsimError as err:
        # something the user can fix: one sentence. Anything else is a bug and keeps its
        # traceback (Python prints it and exits 1).
        print(f"medsim: error: {err}", file=sys.stderr)
        return err.exit_code
    except psycopg.OperationalError as err:
        # the server went away (or was never there) mid-command: whatever was in flight
        # rolled back; an operator's problem, not a bug in medsim
        print(f"medsim: error: lost the database ({db.source()}): {str(err).strip().splitlines()[0]}; "
              f"what was in flight was rolled back", file=sys.stderr)
        return DatabaseUnavailable.exit_code
    except BrokenPipeError:
        # output piped into `head` and the like: not worth a traceback. Point stdout at
        # devnull so the interpreter's final flush does not fail again (Python docs recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
