"""Structure that the code base promises (docs/ARCHITECTURE.md): the run directory's layout is
spelled in one module, curate/store.py (a path literal naming one of its folders anywhere else in
the package fails here, with the file and line), and the package has no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from curate import store

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("curate", "filters", "reports", "pipelines")
NAMES = {
    store.ANNOTATIONS,
    store.IMAGES,
    store.EMBEDDINGS,
    store.WORK,
    store.SELECTIONS,
    store.FORGET,
    store.MANIFEST,
    store.LOCK,
}


def _path_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants that are parts of a path: an argument of a *join(...) call, or a piece of
    an f-string / constant with a folder name followed by '/'."""
    found = []
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if id(node) in docstrings:
            continue  # prose about the layout, not a path
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name.endswith("join"):
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and arg.value in NAMES:
                        found.append((arg.lineno, arg.value))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            for n in NAMES:
                if n.startswith(".") or n.endswith(".json"):
                    continue
                if node.value.startswith(f"{n}/") or f"/{n}/" in node.value:
                    found.append((node.lineno, node.value[:60]))
    return found


def test_run_directory_paths_are_spelled_in_the_store_only():
    offenders = []
    for d in PACKAGE_DIRS:
        for py in sorted((REPO / d).rglob("*.py")):
            if py == REPO / "curate" / "store.py":
                continue
            tree = ast.parse(py.read_text(), filename=str(py))
            offenders += [f"{py.relative_to(REPO)}:{line}: {text!r}" for line, text in _path_literals(tree)]
    assert not offenders, "run-directory paths outside curate/store.py:\n" + "\n".join(offenders)


def test_the_check_finds_a_path_literal():
    tree = ast.parse('import os\nos.path.join(run_dir, "annotations", "x.parquet")\nf = "selections/default"\n')
    assert [t for _, t in _path_literals(tree)] == ["annotations", "selections/default"]


def test_the_package_has_no_import_cycles():
    """Module-level and function-level imports of curate's own modules together form no cycle
    (a cycle is what function-level imports used to hide)."""
    cycles = [sorted(c) for c in _strongly_connected(_import_graph()) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_check_finds_a_cycle():
    found = [sorted(c) for c in _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) if len(c) > 1]
    assert found == [["a", "b", "c"]]


def _modules() -> dict[str, Path]:
    mods = {}
    folders = (
        ("curate", "curate"),
        ("filters", "curate.filters"),
        ("reports", "curate.reports"),
        ("pipelines", "curate.pipelines"),
    )
    for folder, package in folders:
        for py in (REPO / folder).rglob("*.py"):
            parts = [p for p in py.relative_to(REPO / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([package, *parts])] = py
    return mods


def _import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, py in mods.items():
        for node in ast.walk(ast.parse(py.read_text())):
            targets = []
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.level == 0
                and node.module.startswith("curate")
            ):
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module for a in node.names
                ]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("curate")]
            graph[m] |= {t for t in targets if t in mods and t != m}
    return graph


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (recursive: a package of a hundred modules is shallow)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out
