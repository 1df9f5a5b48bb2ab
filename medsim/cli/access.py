"""`medsim user`, `medsim token`, `medsim grant`, `medsim revoke`: who may use the service
and which datasets they may see (enforced by PostgreSQL row-level security)."""

from __future__ import annotations

import sys

from medsim.cli.common import connect


def cmd_user(args) -> int:
    from medsim import access

    with connect(args) as conn:
        if args.user_command == "add":
            role = access.add_user(conn, args.name, sql_login=args.sql_login)
            print(f"user {args.name} added (PostgreSQL role {role}); it sees no dataset until granted: "
                  f"medsim grant {args.name} DATASET... (or --all), then medsim token create {args.name}")
            if args.sql_login:
                print(f"as a SQL login: set its password in psql with \\password {role}")
        else:
            users = access.list_users(conn)
            if not users:
                print("no users yet: medsim user add NAME")
            for u in users:
                seen = "never" if u["last_used_at"] is None else f"{u['last_used_at']:%Y-%m-%d %H:%M}"
                grants = ", ".join("every dataset" if d == "*" else d for d in u["datasets"]) or "nothing"
                print(f"{u['name']:<20} sees {grants}; {u['live_tokens']} live token(s); last used {seen}")
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
