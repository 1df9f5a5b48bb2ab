"""Issue 34 (6): every command medsim suggests runs as printed.

An error sentence that names a `medsim ...` command is a promise: the command parses with
medsim's own parser (the flags exist, the choices are valid). The commands are collected
from the source of every message medsim can emit, so a new hint is checked the day it is
written; a few are also triggered for real.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from medsim import access, cli
from medsim.search.index_files import rebuild_command
from medsim.search.index_kinds import KINDS

PACKAGE = Path(cli.__file__).resolve().parents[1]
HOLE = "\x00"  # where an f-string's {value} goes
# a suggested command: in backticks, in parentheses, or after "run"
COMMAND = re.compile(r"`(medsim [^`]+)`|\((medsim [a-z][^();]*?)[;)]|\brun (medsim [a-z][^;,.()`]*)")


def messages(tree: ast.AST):
    """Every string a module can show as a message; an f-string's values become HOLE.
    Docstrings and argparse's help and description are left out: they name commands
    (`medsim delete`'s path), they do not hand one over to run."""
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    docs |= {id(s) for n in ast.walk(tree) if isinstance(n, ast.keyword) and n.arg in ("help", "description")
             for s in ast.walk(n.value)}

    def text(node) -> str:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            return "".join(text(v) for v in node.values)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):  # "... run `medsim x " + f"{y}` first"
            return text(node.left) + text(node.right)
        return HOLE

    for node in ast.walk(tree):
        if isinstance(node, ast.Constant | ast.JoinedStr | ast.BinOp) and id(node) not in docs \
                and (t := text(node)) != HOLE:
            yield t


def suggested() -> dict[str, str]:
    """command -> where it is written, for every `medsim ...` in medsim's own messages."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "schema/versions" in path.as_posix():
            continue
        for text in messages(ast.parse(path.read_text())):
            for m in COMMAND.finditer(text):
                found.setdefault(next(g for g in m.groups() if g).strip(), str(path.relative_to(PACKAGE.parent)))
    return found


def subparser(parser, words):
    """The (sub)parser the leading words of a command select."""
    for w in words:
        subs = [a for a in parser._actions if a.choices and hasattr(a, "_name_parser_map")]
        if not subs or w not in subs[0].choices:
            break
        parser = subs[0].choices[w]
    return parser


def argv(command: str) -> list[str]:
    """A suggestion as its argv: a hole or a NAME-like placeholder takes a value the option
    accepts (its first choice, if it has choices); a hole glued to a word (`build{...}`)
    is optional text written elsewhere and dropped."""
    words = command.split()[1:]
    parser, out = cli.build_parser(), []
    for i, w in enumerate(words):
        if set(w) == {HOLE} or re.fullmatch(r"[A-Z][A-Z_]*", w) or w == "...":
            action = subparser(parser, out)._option_string_actions.get(words[i - 1]) if i else None
            out.append(str(action.choices[0] if action is not None and action.choices else 1))
        else:
            out.append(w.replace(HOLE, ""))
    return out


def parses(args: list[str]) -> str | None:
    """None if medsim's parser takes these arguments as `medsim` would, else why not."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            ns, extra = cli.build_parser().parse_known_args(args)
    except SystemExit as e:
        return None if e.code == 0 else err.getvalue().strip().splitlines()[-1]  # --help exits 0
    if extra and ns.command != "psql":
        return f"unrecognized arguments: {' '.join(extra)}"
    return None


def test_the_collector_finds_the_hints():
    found = suggested()
    assert len(found) >= 15, found
    for expected in ("medsim index list", "medsim migrate", "medsim token list", "medsim db stop"):
        assert expected in found


def test_every_suggested_command_parses():
    bad = {f"{cmd!r} ({where})": why for cmd, where in suggested().items() if (why := parses(argv(cmd)))}
    assert not bad, bad


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("splits", [("train", "val", "test"), ("train", "val"), ("train",)])
def test_the_rebuild_command_parses_and_builds_what_it_names(kind, splits):
    cmd = rebuild_command(7, kind, splits).strip("`")
    assert parses(cmd.split()[1:]) is None
    ns = cli.build_parser().parse_args(cmd.split()[1:])
    assert (ns.kind, ns.model, ns.splits) == (kind, "7", ",".join(splits))


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


def test_migrate_says_how_many_images_wait_for_the_worker(embedded, db_url, capsys):
    conn, mid = embedded
    assert cli.main(["--database-url", db_url, "migrate"]) == 0
    assert capsys.readouterr().out.count("\n") == 1  # all embedded: the revision alone
    # what revision 0014 does to images whose model input changed
    conn.execute("DELETE FROM medsim.embeddings WHERE image_id IN (SELECT id FROM medsim.images ORDER BY id LIMIT 40)")
    assert cli.main(["--database-url", db_url, "migrate"]) == 0
    name = conn.execute("SELECT name FROM medsim.models WHERE id = %s", (mid,)).fetchone()[0]
    assert capsys.readouterr().out.splitlines()[1] == (
        f"40 of 2,380 images have no embedding for the current model {mid} ({name}) and are left out of "
        "searches until `medsim worker` embeds them")


def test_a_link_back_to_the_archive_is_a_loop_not_a_way_out(tmp_path):
    from PIL import Image

    from medsim.sources.folder import OUTSIDE, FolderSource

    root = tmp_path / "archive"
    for label in ("a", "b"):
        (root / label / "deeper").mkdir(parents=True)
        Image.new("L", (8, 8), 7).save(root / label / "0.png")
    os.symlink(root, root / "a" / "everything")  # back to the archive's own folder
    os.symlink("..", root / "a" / "deeper" / "up")  # back to a folder above the link
    os.symlink(root / "b", root / "a" / "bees")  # to another folder of the archive
    os.symlink(tmp_path, root / "b" / "out")  # out of it
    _, problems = FolderSource(root).entries()
    assert dict(problems) == {
        "a/everything": "a link back to the archive's own folder (a loop): not followed",
        "a/deeper/up": "a link back to a, a folder above it (a loop): not followed",
        "a/bees": "a link to b inside the archive: not followed (its files are read there)",
        "b/out": OUTSIDE}
