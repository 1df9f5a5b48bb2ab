"""Who may see which images: users, their tokens, per-dataset grants, the access log.

The rule itself lives in PostgreSQL (schema/sql/005_access.sql): each user has a role of
its own, row-level security shows a role only the datasets granted to it, and the
service runs a user's requests under that role (SET ROLE, which a session can only do
to roles it was given; nothing a user can set widens what they see). This module keeps
the rows and roles that rule reads, checks tokens, and writes the access log.

Tokens look like ``msm_<id>_<secret>``: the id finds the row, the secret is 32 random
bytes. Only the secret's SHA-256 is stored. A fast hash is right here (unlike for
passwords, which need a slow one): the secret has 256 bits of entropy, so no amount of
guessing per second makes a stolen hash reversible, and a per-request check must be cheap.
The stored and computed digests are compared in constant time (hmac.compare_digest).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from medsim import migrate
from medsim.errors import BadArgument, Busy, Forbidden, NotFound, Unauthorized
from medsim.queries import Q, dicts, one, scalar

SCOPES = ("search", "images", "admin")  # each includes the ones before it
NAME_RULE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
TOKEN_RULE = re.compile(r"^msm_([0-9]{1,10})_([A-Za-z0-9_-]{43})$")
ROLE_PREFIX = "medsim_user_"
TOUCH_EVERY = dt.timedelta(minutes=1)  # last_used_at is written at most this often per token


@dataclass(frozen=True)
class Principal:
    """Who a request is from, once its token checked out."""

    name: str
    role: str  # the PostgreSQL role its queries run under
    scope: str
    sees_all: bool  # granted every dataset (no FAISS selector needed)
    token_id: int | None = None
    granted: bool = True  # granted any dataset at all (when the token was checked)

    def allows(self, scope: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(scope)


# the service with --no-auth: the analysts' role, which sees every dataset
NO_AUTH = Principal("(no auth)", "medsim_reader", "admin", True)


@dataclass
class _TokenRow:
    token_id: int
    secret_sha256: bytes
    scope: str
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None
    user_id: int
    name: str
    role_name: str
    disabled_at: dt.datetime | None
    sees_all: bool
    granted: bool


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def check_name(name: str) -> str:
    if not NAME_RULE.match(name or ""):
        raise BadArgument(f"a user name is a lower-case letter, then up to 39 lower-case letters, digits or _; "
                          f"got {name!r}")
    return name


def _user(conn, name: str):
    u = conn.execute(Q.user_by_name, {"name": check_name(name)}).fetchone()
    if u is None:
        raise NotFound(f"no user named {name!r} (medsim user add {name})")
    return u  # (id, name, role_name)


def add_user(conn, name: str, sql_login: bool = False) -> str:
    """A user and its role (which inherits the reader's privileges but cannot become the
    reader) -> the role name. One transaction: the row and the role exist together."""
    role = ROLE_PREFIX + check_name(name)
    with conn.transaction():
        # two `medsim user add` of one name at once: the second waits, then finds the first's row
        _user_lock(conn, name)
        if conn.execute(Q.user_by_name, {"name": name}).fetchone() is not None:
            raise BadArgument(f"a user named {name!r} exists already")
        conn.execute(Q.user_insert, {"name": name, "role": role})
        ident = sql.Identifier(role)
        # roles are cluster-wide: another database on this server may have made it
        # (CREATE ROLE IF NOT EXISTS does not exist; this lock is per database, so a
        # creation racing from another database shows as DuplicateObject: the role exists)
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            try:
                with conn.transaction():
                    conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(ident))
            except psycopg.errors.DuplicateObject:
                pass
        conn.execute(sql.SQL("GRANT medsim_reader TO {} WITH INHERIT TRUE, SET FALSE").format(ident))
        if not conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]:
            conn.execute(sql.SQL("GRANT {} TO current_user WITH INHERIT FALSE, SET TRUE").format(ident))
        # a role left by a user of this name deleted in another database (roles are the
        # server's) keeps no login or password it had
        conn.execute(sql.SQL("ALTER ROLE {} " + ("LOGIN" if sql_login else "NOLOGIN PASSWORD NULL")).format(ident))
        if sql_login:
            _limit_sql_login(conn, ident)
    return role


# What a SQL login's sessions get by default (issue 33): a person's psql may not hold a
# backend for ever. A login can SET these lower or higher in its own session (PostgreSQL has
# no setting a role cannot change for itself), so `medsim serve` also ends what runs past
# them (service/reaper.py); the defaults make the common case need no reaper.
SQL_LOGIN_LIMITS = {"statement_timeout": "60s", "idle_in_transaction_session_timeout": "5min",
                    "idle_session_timeout": "8h"}
LOCK_WAIT_S = 10.0  # a medsim advisory lock waited for at most this long (any login can take one)


def _limit_sql_login(conn, ident) -> None:
    for setting, value in SQL_LOGIN_LIMITS.items():
        conn.execute(sql.SQL("ALTER ROLE {} SET {} = {}").format(ident, sql.Identifier(setting), sql.Literal(value)))


def _user_lock(conn, name: str) -> None:
    """The per-name lock of user changes, waited for at most LOCK_WAIT_S: any login can take
    an advisory lock (a SQL login once stalled `medsim user add` for as long as it liked),
    so a wait past that names the session holding it instead of hanging."""
    key = "medsim.user:" + name
    conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{int(LOCK_WAIT_S * 1000)}ms",))
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (key,))
    except psycopg.errors.LockNotAvailable:  # rolled back to the savepoint: the transaction goes on
        who = migrate.lock_holder(conn, key)
        raise Busy(f"waited {LOCK_WAIT_S:.0f} s for the lock on user {name!r}, which {who} holds: another medsim "
                   f"command is changing this user, or that session took the lock; end it or try again") from None
    conn.execute("SELECT set_config('lock_timeout', '0', true)")


def delete_user(conn, name: str, by: str = "(administrator)") -> dict:
    """A user gone for good: tokens, grants and role (what a new user of the same name would
    otherwise inherit), its open SQL sessions ended; its access-log rows stay, and the
    deletion itself is a row of the log. One transaction."""
    with conn.transaction():
        _user_lock(conn, name)
        uid, _, role = _user(conn, name)
        tokens = conn.execute("SELECT count(*) FROM medsim.tokens WHERE user_id = %s AND revoked_at IS NULL",
                              (uid,)).fetchone()[0]
        grants = conn.execute(Q.user_grants_delete, {"role": role}).rowcount
        conn.execute(Q.user_delete, {"id": uid})
        ident = sql.Identifier(role)
        conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN PASSWORD NULL").format(ident))
        conn.execute(sql.SQL("REVOKE medsim_reader FROM {}").format(ident))
        try:
            with conn.transaction():  # roles are the server's: another database may still use it
                conn.execute(sql.SQL("DROP ROLE {}").format(ident))
            dropped = True
        except (psycopg.errors.DependentObjectsStillExist, psycopg.errors.InsufficientPrivilege):
            dropped = False
        ended = conn.execute(Q.role_sessions_end, {"role": role}).fetchone()[0]
        detail = {"deleted": name, "live_tokens": tokens, "grants": grants, "role_dropped": dropped,
                  "sessions_ended": ended}
        conn.execute(Q.log_access_detail, {"user_name": by, "action": "user", "detail": Jsonb(detail)})
    return detail


def set_disabled(conn, name: str, disabled: bool, sql_login: bool = False, by: str = "(administrator)") -> dict:
    """Disable a user (tokens refused, SQL login closed, sessions ended; grants and tokens
    kept for enable) or enable it again (a SQL login only with sql_login)."""
    with conn.transaction():
        _user_lock(conn, name)
        uid, _, role = _user(conn, name)
        conn.execute(Q.user_set_disabled, {"id": uid, "disabled": disabled})
        ident = sql.Identifier(role)
        conn.execute(sql.SQL("ALTER ROLE {} " + ("LOGIN" if sql_login and not disabled else "NOLOGIN")).format(ident))
        ended = conn.execute(Q.role_sessions_end, {"role": role}).fetchone()[0] if disabled else 0
        detail = {"disabled" if disabled else "enabled": name, "sessions_ended": ended}
        conn.execute(Q.log_access_detail, {"user_name": by, "action": "user", "detail": Jsonb(detail)})
    return detail


def list_users(conn) -> list[dict]:
    return dicts(conn, Q.users_overview)


def parse_expiry(text: str | None) -> dt.timedelta | None:
    """'30d', '12h', '90m' or 'never' -> a duration (None: never expires)."""
    if text is None or text == "never":
        return None
    m = re.fullmatch(r"([1-9][0-9]{0,4})([dhm])", text.strip())
    if not m:
        raise BadArgument(f"--expires takes a number and d, h or m (30d, 12h, 90m) or 'never'; got {text!r}")
    n, unit = int(m.group(1)), m.group(2)
    return dt.timedelta(days=n) if unit == "d" else dt.timedelta(hours=n) if unit == "h" else dt.timedelta(minutes=n)


def create_token(conn, name: str, scope: str = "images", expires: dt.timedelta | None = None) -> tuple[str, int]:
    """A new token for a user -> (the token, shown once; its id)."""
    if scope not in SCOPES:
        raise BadArgument(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    uid = _user(conn, name)[0]
    secret = secrets.token_urlsafe(32)  # 43 characters, 256 bits
    expires_at = None if expires is None else dt.datetime.now(dt.timezone.utc) + expires
    tid = scalar(conn, Q.token_insert, {"user_id": uid, "digest": _digest(secret), "scope": scope,
                                        "expires_at": expires_at})
    return f"msm_{tid}_{secret}", tid


def revoke_tokens(conn, token_id: int | None = None, name: str | None = None) -> list[int]:
    if (token_id is None) == (name is None):
        raise BadArgument("revoke one token (its id) or every token of a user (--user NAME)")
    if name is not None:
        _user(conn, name)
    done = [r[0] for r in conn.execute(Q.token_revoke, {"id": token_id, "name": name}).fetchall()]
    # an id that names no token is a typo, not a token already revoked: say so (exit 2)
    if token_id is not None and not done and conn.execute(Q.token_check, {"id": token_id}).fetchone() is None:
        raise NotFound(f"no token has id {token_id} (`medsim token list` shows them)")
    return done


def list_tokens(conn, name: str | None = None) -> list[tuple]:
    return conn.execute(Q.tokens_of, {"name": name}).fetchall()


def grant(conn, name: str, flags: list[str], every: bool = False) -> list[str]:
    """Let a user (or a role, e.g. medsim_reader) see these datasets, or every one."""
    role = _role_of(conn, name)
    with conn.transaction():
        if every:
            conn.execute(Q.grant_dataset, {"role": role, "dataset_id": None})
            return ["every dataset"]
        ids = _dataset_ids(conn, flags)
        for flag in flags:
            conn.execute(Q.grant_dataset, {"role": role, "dataset_id": ids[flag]})
    return list(flags)


def revoke(conn, name: str, flags: list[str], every: bool = False) -> int:
    role = _role_of(conn, name)
    ids = [] if every and not flags else list(_dataset_ids(conn, flags).values())  # none named: it says so
    return conn.execute(Q.revoke_datasets, {"role": role, "ids": ids, "all": every}).rowcount


def _role_of(conn, name: str) -> str:
    if name == "medsim_reader":  # the analysts' role is granted like a user
        return name
    return _user(conn, name)[2]


def _dataset_ids(conn, flags: list[str]) -> dict[str, int]:
    if not flags:
        raise BadArgument("name at least one dataset (or --all)")
    found = dict(conn.execute(Q.datasets_by_flag, {"flags": list(flags)}).fetchall())
    missing = [f for f in flags if f not in found]
    if missing:
        raise NotFound(f"no dataset named {', '.join(map(repr, missing))}")
    return found


def authenticate(conn, header: str | None) -> Principal:
    """An Authorization header -> the Principal, or Unauthorized (one sentence). Every
    call reads the token's row: a revoked or expired token stops at its next request."""
    if not header:
        raise Unauthorized("send a token: Authorization: Bearer msm_... (medsim token create NAME)")
    m = _token_match(header)
    if m is None or not header.lower().startswith("bearer "):
        raise Unauthorized("the Authorization header is not a medsim token (Bearer msm_<id>_<secret>)")
    row = one(conn, Q.token_check, {"id": int(m.group(1))}, as_=_TokenRow)
    # the same answer, after the same work, for an unknown id and a wrong secret
    stored = row.secret_sha256 if row is not None else bytes(32)
    if not hmac.compare_digest(stored, _digest(m.group(2))) or row is None:
        raise Unauthorized("the token is not valid", token_id=int(m.group(1)))
    now = dt.datetime.now(dt.timezone.utc)
    if row.revoked_at is not None:
        raise Unauthorized(f"token {row.token_id} was revoked", token_id=row.token_id)
    if row.disabled_at is not None:
        raise Unauthorized(f"user {row.name} is disabled (medsim user enable {row.name})", token_id=row.token_id)
    if row.expires_at is not None and row.expires_at <= now:
        raise Unauthorized(f"token {row.token_id} expired at {row.expires_at:%Y-%m-%d %H:%M} UTC",
                           token_id=row.token_id)
    if row.last_used_at is None or now - row.last_used_at > TOUCH_EVERY:
        conn.execute(Q.token_touch, {"id": row.token_id})
    return Principal(row.name, row.role_name, row.scope, row.sees_all, row.token_id, row.granted)


def require(principal: Principal, scope: str, what: str) -> None:
    if not principal.allows(scope):
        raise Forbidden(f"{what} needs a token with scope {scope}; this one has {principal.scope}")


def act_as(conn, principal: Principal) -> None:
    """Run this connection's next statements as the principal's role (row-level
    security then decides what they see). A pooled connection remembers the role it was
    last set to (in autocommit, SET ROLE lasts until the next one; the server does not
    report it), which saves the round trip when one user's requests follow each other."""
    if getattr(conn, "_medsim_role", None) != principal.role:
        conn._medsim_role = None  # unknown until the server has said yes
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(principal.role)))
        conn._medsim_role = principal.role


def visible_datasets(conn) -> list[str]:
    """As the connection's current role."""
    return [r[0] for r in conn.execute(Q.visible_datasets)]


def log(conn, principal: Principal, client: str | None, action: str, image_ids: list[int], **query) -> None:
    log_as(conn, principal.name, principal.token_id, client, action, image_ids, **query)


def log_as(conn, user_name: str, token_id: int | None, client: str | None, action: str, image_ids: list[int], *,
           query_kind: str | None = None, query_image_id: int | None = None, query_sha256: str | None = None,
           model_id: int | None = None, engine: str | None = None, forwarded: str | None = None) -> None:
    """One access-log row; log() for a request's principal, this for what has only a user
    name (an upload deleted after its retention)."""
    conn.execute(Q.log_access, {"user_name": user_name, "token_id": token_id, "client": client, "forwarded": forwarded,
                                "action": action, "query_kind": query_kind, "query_image_id": query_image_id,
                                "query_sha256": query_sha256, "model_id": model_id, "engine": engine,
                                "image_ids": list(image_ids)})

def _token_match(header: str | None):
    """The token in an Authorization header's credentials, matched by TOKEN_RULE, or None."""
    _, _, token = (header or "").partition(" ")
    return TOKEN_RULE.match(token.strip())


def token_id_of(header: str | None) -> int | None:
    """The token id a header names, if it is shaped like a token (for rate limits)."""
    m = _token_match(header)
    return int(m.group(1)) if m else None
