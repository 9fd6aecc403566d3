"""Structure that the code base promises (docs/ARCHITECTURE.md): the run directory's layout is
spelled in one module, curate/store.py. A path literal naming one of its folders anywhere else in
the package fails here, with the file and line."""

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
