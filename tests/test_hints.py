"""Issue 34 (6): every command medsim suggests runs as printed.

An error sentence that names a `medsim ...` command is a promise: the command parses with
medsim's own parser (the flags exist, the choices are valid). The commands are collected
from the source of every message medsim can emit, so a new hint is checked the day it is
written; a few are also triggered for real.
"""

from __future__ import annotations

import os
import subprocess
import sys

from medsim import access, cli


def test_revoke_unknown_token_is_one_sentence(conn, capsys):
    access.add_user(conn, "someone")
    _, tid = access.create_token(conn, "someone")
    assert cli.main(["token", "revoke", str(tid + 100)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"medsim: error: no token has id {tid + 100} (`medsim token list` shows them)"
    assert cli.main(["token", "revoke", str(tid)]) == 0


# ---------------------------------------------------------------- 8. what medsim did is said
def _medsim(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "medsim.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_an_auto_started_embedded_database_is_announced_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["MEDSIM_HOME"] = str(tmp_path / "home")
    try:
        first = _medsim("db", "url", env=env)
        assert first.returncode == 0, first.stderr
        assert first.stdout.startswith("postgresql://")  # stdout stays the URL alone
        assert first.stderr.strip() == (f"started the embedded database ({tmp_path / 'home' / 'pgdata'}); "
                                         "`medsim db stop` stops it")
        again = _medsim("db", "url", env=env)
        assert again.returncode == 0 and again.stderr == ""
    finally:
        assert _medsim("db", "stop", env=env).stdout.strip() == "stopped"


def test_version():
    from importlib.metadata import version

    r = _medsim("--version", timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"medsim {version('medsim')}"
