"""`medsim user`, `medsim token`, `medsim grant`, `medsim revoke`: who may use the service
and which datasets they may see (enforced by PostgreSQL row-level security)."""

from __future__ import annotations

import sys

from medsim.cli.common import admin_name, connect


def cmd_user(args) -> int:
    from medsim import access

    with connect(args) as conn:
        if args.user_command == "add":
            role = access.add_user(conn, args.name, sql_login=args.sql_login)
            print(f"user {args.name} added (PostgreSQL role {role}); it sees no dataset until granted: "
                  f"medsim grant {args.name} DATASET... (or --all), then medsim token create {args.name}")
            if args.sql_login:
                print(f"as a SQL login: set its password in psql with \\password {role}")
        elif args.user_command == "delete":
            d = access.delete_user(conn, args.name, by=admin_name())
            print(f"user {args.name} deleted: {d['live_tokens']} live token(s) and {d['grants']} grant(s) removed, "
                  f"its role {'dropped' if d['role_dropped'] else 'closed (still used by another database)'}"
                  f"{', ' + str(d['sessions_ended']) + ' SQL session(s) ended' if d['sessions_ended'] else ''}; "
                  f"its access-log rows stay")
        elif args.user_command in ("disable", "enable"):
            disable = args.user_command == "disable"
            d = access.set_disabled(conn, args.name, disable, sql_login=getattr(args, "sql_login", False),
                                    by=admin_name())
            if disable:
                ended = f" ({d['sessions_ended']} SQL session(s) ended)" if d["sessions_ended"] else ""
                print(f"user {args.name} disabled: its tokens are refused and its SQL login closed{ended}; "
                      f"medsim user enable {args.name} undoes it")
            else:
                print(f"user {args.name} enabled")
        else:
            users = access.list_users(conn)
            if not users:
                print("no users yet: medsim user add NAME")
            for u in users:
                seen = "never" if u["last_used_at"] is None else f"{u['last_used_at']:%Y-%m-%d %H:%M}"
                grants = ", ".join("every dataset" if d == "*" else d for d in u["datasets"]) or "nothing"
                print(f"{u['name']:<20} sees {grants}; {u['live_tokens']} live token(s); last used {seen}")
    return 0


def cmd_log(args) -> int:
    import datetime as dt

    from medsim import access_log
    from medsim.errors import BadArgument, DataRefused

    with connect(args) as conn:
        if args.log_command == "verify":
            v = access_log.verify(conn, args.anchor or [])
            print(v.sentence())
            if not v.ok:
                raise DataRefused("the access log was altered: see the line above")
        else:
            try:
                before = dt.datetime.fromisoformat(args.before)
            except ValueError:
                raise BadArgument(f"--before takes a date (2026-01-31) or a time; got {args.before!r}") from None
            if before.tzinfo is None:
                before = before.astimezone()
            d = access_log.purge(conn, before, by=admin_name())
            print(f"purged {d['rows']:,} access-log row(s) older than {before:%Y-%m-%d %H:%M %Z} (through chain row "
                  f"{d['through']}); the purge is itself a row of the chain, and verify still checks what remains")
    return 0


def cmd_token(args) -> int:
    from medsim import access

    with connect(args) as conn:
        if args.token_command == "create":
            token, tid = access.create_token(conn, args.name, args.scope, access.parse_expiry(args.expires))
            print(token)
            print(f"token {tid} for {args.name}, scope {args.scope}, "
                  f"{'never expires' if args.expires == 'never' else 'expires in ' + args.expires}: shown once, "
                  f"only its hash is kept", file=sys.stderr)
        elif args.token_command == "revoke":
            done = access.revoke_tokens(conn, args.id, args.user)
            print(f"revoked {len(done)} token(s){': ' + ', '.join(map(str, done)) if done else ''}; "
                  "a running service refuses them from its next request")
        else:
            for tid, name, scope, created, expires, revoked, used in access.list_tokens(conn, args.name):
                state = ("revoked" if revoked else "expires " + (f"{expires:%Y-%m-%d %H:%M}" if expires else "never"))
                print(f"{tid:>5}  {name:<20} {scope:<7} created {created:%Y-%m-%d %H:%M}  {state}  "
                      f"last used {'never' if used is None else f'{used:%Y-%m-%d %H:%M}'}")
    return 0


def cmd_grant(args) -> int:
    from medsim import access

    with connect(args) as conn:
        if args.command == "grant":
            what = access.grant(conn, args.name, args.datasets, every=args.all)
            print(f"{args.name} may now see {', '.join(what)}")
        else:
            n = access.revoke(conn, args.name, args.datasets, every=args.all)
            print(f"{n} grant(s) of {args.name} removed; effective at once, in every session")
    return 0


def register(sub) -> None:
    u = sub.add_parser("user", help="users of the service (each with its own PostgreSQL role)")
    usub = u.add_subparsers(dest="user_command", required=True)
    a = usub.add_parser("add", help="add a user (it sees nothing until granted datasets)")
    a.add_argument("name")
    a.add_argument("--sql-login", action="store_true",
                   help="also let the person log in to PostgreSQL as this role (row-level security applies there too)")
    a.set_defaults(func=cmd_user)
    usub.add_parser("list", help="users, their grants, live tokens and last use").set_defaults(func=cmd_user)
    d = usub.add_parser("delete", help="delete a user: tokens, grants and role go, its access-log rows stay")
    d.add_argument("name")
    d.set_defaults(func=cmd_user)
    d = usub.add_parser("disable", help="refuse a user's tokens and SQL login until enabled (grants kept)")
    d.add_argument("name")
    d.set_defaults(func=cmd_user)
    d = usub.add_parser("enable", help="undo medsim user disable")
    d.add_argument("name")
    d.add_argument("--sql-login", action="store_true", help="also open its SQL login again")
    d.set_defaults(func=cmd_user)

    lg = sub.add_parser("access-log", help="the access log's hash chain: verify it, or purge old rows")
    lsub = lg.add_subparsers(dest="log_command", required=True)
    v = lsub.add_parser("verify", help="recompute the chain; say where it breaks (exit 2) or print its head")
    v.add_argument("--anchor", action="append", metavar="SEQ:HASH",
                   help="a head printed by an earlier verify and kept outside the database: it must still be "
                        "in the chain (repeatable)")
    v.set_defaults(func=cmd_log)
    p = lsub.add_parser("purge", help="delete rows older than a date (retention); the purge is logged in the chain")
    p.add_argument("--before", required=True, help="a date or time (ISO 8601: 2026-01-31, 2026-01-31T12:00)")
    p.set_defaults(func=cmd_log)

    t = sub.add_parser("token", help="bearer tokens for the HTTP service")
    tsub = t.add_subparsers(dest="token_command", required=True)
    c = tsub.add_parser("create", help="a new token for a user, printed once (only its hash is kept)")
    c.add_argument("name")
    c.add_argument("--scope", choices=("search", "images", "admin"), default="images",
                   help="search: searches only; images: also images and thumbnails (default; the page needs it); "
                        "admin: also /metrics")
    c.add_argument("--expires", default="30d", help="30d, 12h, 90m, or never (default 30d)")
    c.set_defaults(func=cmd_token)
    r = tsub.add_parser("revoke", help="revoke a token (its id) or every token of a user (--user)")
    r.add_argument("id", nargs="?", type=int, default=None)
    r.add_argument("--user", default=None, metavar="NAME")
    r.set_defaults(func=cmd_token)
    li = tsub.add_parser("list", help="tokens (never their secrets)")
    li.add_argument("name", nargs="?", default=None)
    li.set_defaults(func=cmd_token)

    for verb, text in (("grant", "let a user see datasets"), ("revoke", "take datasets from a user")):
        g = sub.add_parser(verb, help=text + " (row-level security: the service, FAISS and SQL obey it)")
        g.add_argument("name", help="a user name (or medsim_reader, the analysts' role)")
        g.add_argument("datasets", nargs="*", help="dataset names")
        g.add_argument("--all", action="store_true", help="every dataset, present and future")
        g.set_defaults(func=cmd_grant)
