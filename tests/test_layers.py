"""The layers you can see: images < sources < training < search < worker/service/cli.

Every import in the package (at the top of a module or inside a function: a lazy import
is still a dependency) is read from the source, so a new module is checked the day it
lands. Nothing imports upward, and no two modules import each other, however indirectly.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medsim"

# medsim.<first part> -> its layer; below "images" is what every layer may use
LAYERS = {
    0: {"errors", "settings", "db", "queries", "migrate", "pgcopy", "schema"},  # the floor
    1: {"images"},  # pixels: read, convert, resize
    2: {"sources", "queue", "access", "access_log"},  # where images come from; the queue they fill; who may see them
    3: {"model"},  # the network, its runtimes (an imported ONNX encoder too), its explanations
    4: {"training", "registry"},  # training and evaluation, stored models
    5: {"search", "audit"},  # indexes, recall, the search pipeline
    6: {"worker", "service", "cli", "demo", "embed_worker", "__main__"},  # the doors
}
LAYER_OF = {part: level for level, parts in LAYERS.items() for part in parts}
LAYER_NAMES = {0: "the floor", 1: "images", 2: "sources", 3: "model", 4: "training", 5: "search",
               6: "worker/service/cli"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_module(dotted: str) -> bool:
    p = PACKAGE.parent.joinpath(*dotted.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def imports(path: Path) -> set[str]:
    """The medsim modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("medsim")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medsim"):
            for a in node.names:  # `from medsim.images import dicom` imports a module
                sub = f"{node.module}.{a.name}"
                found.add(sub if is_module(sub) else node.module)
    return found


def graph() -> dict[str, set[str]]:
    g = {}
    for path in PACKAGE.rglob("*.py"):
        g[module_name(path)] = {m for m in imports(path) if m != "medsim"}
    return g


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2:
        return 0
    assert parts[1] in LAYER_OF, f"{module} has no layer: add medsim.{parts[1]} to LAYERS in tests/test_layers.py"
    return LAYER_OF[parts[1]]


def test_every_module_has_a_layer():
    for module in graph():
        layer(module)


def test_no_module_imports_upward():
    upward = []
    for module, deps in sorted(graph().items()):
        for dep in sorted(deps):
            if layer(dep) > layer(module):
                upward.append(f"{module} ({LAYER_NAMES[layer(module)]}) imports {dep} "
                              f"({LAYER_NAMES[layer(dep)]})")
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    g = graph()
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def strongly_connected(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                strongly_connected(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in g.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            strongly_connected(v)
    assert not cycles, f"import circles: {cycles}"


@pytest.mark.parametrize("bad, why", [
    ("from medsim.search import pipeline", "images imports search"),
    ("import medsim.worker", "images imports the worker"),
])
def test_the_rule_would_catch_an_upward_import(tmp_path, bad, why):
    """The check itself: an images module that imports upward is reported."""
    f = tmp_path / "probe.py"
    f.write_text(f"def later():\n    {bad}\n")
    deps = imports(f)
    assert deps and all(layer(d) > layer("medsim.images.probe") for d in deps), why


def test_module_and_class_sizes():
    """One module per stage, each small enough to read in one sitting (~350 lines), and no
    class that is a module in disguise (~150 lines)."""
    big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 350 and "schema/versions" not in str(path):
            big.append(f"{path.relative_to(PACKAGE)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno > 150:
                big.append(f"{path.relative_to(PACKAGE)}: class {node.name} {node.end_lineno - node.lineno} lines")
    assert not big, big
