"""`medsim` command line: a thin shell over the stage modules, which tests call directly."""

from __future__ import annotations

import argparse
import sys

from medsim import db


class UserError(Exception):
    """An error whose message is the whole story for the user (no traceback)."""


def _connect(args):
    return db.connect(getattr(args, "database_url", None))


# ------------------------------------------------------------------ db / migrate
def cmd_db(args) -> int:
    if args.action == "start":
        url = db.database_url(start=True)
        print(f"running ({db.source()}): {url}")
    elif args.action == "stop":
        print("stopped" if db.embedded_stop() else "not running")
    elif args.action == "status":
        url = db.embedded_url()
        print(f"embedded: {'running at ' + url if url else 'not running'} (data: {db.pgdata_dir()})")
        print(f"medsim uses: {db.source()}")
    elif args.action == "url":
        print(db.database_url(start=True))
    return 0


def cmd_migrate(args) -> int:
    from medsim import migrate

    url = args.database_url or db.database_url()
    migrate.upgrade(url, args.revision)
    print(f"database at revision {migrate.current(url)}")
    return 0


# ------------------------------------------------------------------ ingest
def cmd_ingest(args) -> int:
    from medsim import catalog, ingest

    failures = 0
    with _connect(args) as conn:
        for flag in args.flags:
            try:
                r = ingest.ingest(
                    conn, flag, size=args.size, data_dir=args.data_dir,
                    accept_unofficial=args.accept_unofficial,
                    allow_download=not args.no_download, show_progress=not args.quiet,
                )
                print(r.line())
            except (catalog.DataMissing, catalog.DataRefused, ValueError) as err:
                failures += 1
                print(f"{flag}: NOT ingested: {err}", file=sys.stderr)
        for flag, size, official, split, n in conn.execute(ingest.Q.dataset_summary):
            if flag in [f.lower() for f in args.flags] and size == args.size:
                print(f"  {flag:16s} {split:5s} {n:7d}{'' if official else '  (unofficial file)'}")
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medsim", description=__doc__)
    p.add_argument("--database-url", default=None,
                   help="postgresql:// URL (default: $DATABASE_URL, then PG* variables, then the embedded server)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("db", help="manage the embedded PostgreSQL server")
    s.add_argument("action", choices=["start", "stop", "status", "url"],
                   help="start/stop the embedded server, show its status, or print the URL medsim uses")
    s.set_defaults(func=cmd_db)

    s = sub.add_parser("migrate", help="apply Alembic migrations (same as `alembic upgrade head`)")
    s.add_argument("revision", nargs="?", default="head", help="target revision (default: head)")
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("ingest", help="load MedMNIST subsets into Postgres")
    s.add_argument("flags", nargs="+", metavar="FLAG", help="2D MedMNIST flags, e.g. breastmnist retinamnist")
    s.add_argument("--size", type=int, default=28, choices=[28, 64, 128, 224], help="image size (default 28)")
    s.add_argument("--data-dir", default=None,
                   help="directory holding the .npz files (default: $MEDSIM_DATA_DIR, then ~/.medmnist)")
    s.add_argument("--accept-unofficial", action="store_true",
                   help="ingest a file whose md5 differs from the catalogue but whose structure matches")
    s.add_argument("--no-download", action="store_true", help="never try to download missing files")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_ingest)

    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, db.DatabaseUnavailable) as err:
        print(f"medsim: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
