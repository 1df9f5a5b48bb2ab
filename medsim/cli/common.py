"""What every command shares: the options that mean the same everywhere (as argparse
parent parsers, declared once), and how a command gets its connection."""

from __future__ import annotations

import argparse

from medsim import db, settings
from medsim.errors import BadArgument
from medsim.search import MAX_K


def parent(*adders) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(p)
    return p


def _model(p):
    p.add_argument("--model", default="current", help="model id, or 'current' (default)")


def _quiet(p):
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _out_dir(p):
    p.add_argument("--out-dir", default="medsim_out", help="where figures, indexes and reports go (default medsim_out)")


def _read_url(p):
    p.add_argument("--read-url", default=None,
                   help="read from this database, e.g. a streaming replica (default: $DATABASE_READ_URL, else the "
                        "main database)")


def _data(p):
    p.add_argument("--data-dir", default=None,
                   help="directory holding the MedMNIST .npz files (default: $MEDSIM_DATA_DIR, then ~/.medmnist)")
    p.add_argument("--accept-unofficial", action="store_true",
                   help="accept a file whose md5 differs from the catalogue but whose structure matches")
    p.add_argument("--no-download", action="store_true", help="never try to download missing files")


MODEL = parent(_model)
QUIET = parent(_quiet)
OUT_DIR = parent(_out_dir)
READ_URL = parent(_read_url)
DATA = parent(_data)


def connect(args, read: bool = False):
    """A connection for a command, checked to be at this code's schema revision; `read`:
    for searches, on the read URL (a replica) when one is given."""
    from medsim import migrate

    url = getattr(args, "database_url", None)
    if read:  # --read-url, then $DATABASE_READ_URL, then the main database
        url = getattr(args, "read_url", None) or settings.get().read_url or url
    # autocommit: each `with conn.transaction()` below is then a real transaction, never
    # a savepoint whose SET LOCAL would leak into the next step
    conn = db.connect(url, autocommit=True)
    try:
        migrate.check(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def key_values(pairs, what: str) -> dict:
    """KEY=VALUE strings -> {key: [values]} (a repeated key: any of its values)."""
    out: dict = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadArgument(f"{what} expects KEY=VALUE, got {item!r}")
        out.setdefault(key, []).append(value)
    return out


def numbers(pairs) -> dict:
    """--param KEY=VALUE strings -> {key: int or float}."""
    out = {}
    for key, values in key_values(pairs, "--param").items():
        value = values[-1]
        try:
            out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            raise BadArgument(f"--param {key} expects a number, got {value!r}") from None
    return out


def ks(text: str) -> tuple[int, ...]:
    try:
        found = tuple(sorted({int(k) for k in text.split(",")}))
    except ValueError:
        raise BadArgument(f"-k expects comma-separated integers, got {text!r}") from None
    if not found or found[0] < 1 or found[-1] > MAX_K:
        raise BadArgument(f"-k values must be between 1 and {MAX_K}")
    return found


def admin_name() -> str:
    """Who ran an administrative command, for the access log: the OS user (the database
    login is the owner's, the same for every administrator)."""
    import getpass

    try:
        return f"(admin: {getpass.getuser()})"
    except Exception:  # no user name for this uid (a container)
        return "(admin)"
