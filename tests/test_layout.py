"""The package's layout rules, checked on the source with `ast` (nothing is imported):

* no import cycles between the modules of ``mlx_persona``;
* no module over 400 lines, no function over 80 lines (the training loop: 150).

Imports inside functions count as edges, like module-level ones. The package imports lazily on purpose
(mlx only once the backend is set up, heavy extras only in the command that needs them), but a lazy
import changes *when* a module runs, not what it depends on: two modules that import each other, even
lazily, cannot be read, tested or moved apart, and the cycle turns into an ImportError the day someone
hoists the import. Only ``if TYPE_CHECKING:`` blocks are left out: they never run.

Package ``__init__`` re-exports are edges to what is named: ``from mlx_persona.x import y`` is an edge
to ``mlx_persona.x.y`` when ``y`` is a module, else to ``mlx_persona.x`` (its ``__init__``). The parent
packages Python runs first are not edges, so a package whose ``__init__`` re-exports its modules'
names is not a cycle with each of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlx_persona"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# (module, qualified name) -> limit, each with its reason.
FUNCTION_LIMITS = {
    # The training loop: steps, evaluations, checkpoints, signals and non-finite checks read top to bottom
    # in one place; its parts are already functions (tuner.trainer's helpers, the callbacks).
    ("mlx_persona.tuner.trainer", "train"): 150,
}
# module -> reason; empty: every module fits.
MODULE_LINES_ALLOWED: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the package (``web/node_modules`` and other non-package folders left out)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        folder = path.parent
        if all((p / "__init__.py").is_file() for p in [folder, *folder.parents] if p.is_relative_to(PACKAGE)):
            found[module_name(path)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom at any depth, except under ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node):
            children = node.orelse
        todo.extend(children)


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module of ``from ... import`` (relative imports resolved against `module`)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path, known: dict[str, Path]) -> dict[str, int]:
    """The package modules `module` imports -> the line of its first such import."""
    edges: dict[str, int] = {}
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            source = _absolute(module, path.name == "__init__.py", node)
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        for target in targets:
            if target in known and target != module:
                edges[target] = min(edges.get(target, node.lineno), node.lineno)
    return edges


def import_graph() -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}, known


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected component."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v):  # Tarjan's algorithm; the package is small, so recursion depth is no concern
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, c) for c in components]


def _cycle_in(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]]):
            if w == start:
                return path + [start]
            if w in component and w not in seen:
                seen.add(w)
                paths.append(path + [w])
    raise AssertionError(f"no cycle through {start}")  # a strongly connected component always has one


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, int]], known: dict[str, Path]) -> str:
    """``a (a.py:12) -> b (b.py:7) -> a``: each arrow with the file and line of its import."""
    steps = [f"{a} ({known[a].relative_to(ROOT)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps + [cycle[-1]])


def test_the_import_walk_sees_the_package():
    """The walk itself: every stage is found, with edges of every kind this package uses."""
    graph, known = import_graph()
    for stage in ("data", "tuner", "sampling", "eval", "export", "cli", "backend", "models"):
        assert f"mlx_persona.{stage}" in known, stage
    assert "mlx_persona.export.web" in known and not any("node_modules" in str(p) for p in known.values())
    # from-import of a name (an edge to the package), of a module, and a lazy import inside a function.
    assert "mlx_persona.sampling.config" in graph["mlx_persona.sampling.sampler"]
    assert "mlx_persona.sampling.sampler" in graph["mlx_persona.sampling"]
    assert "mlx_persona.export.hf" in graph["mlx_persona.cli.export"]


def test_cycle_finder_on_a_known_graph():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"e2": 5}, "e2": {"e": 6}}
    assert sorted(cycles(graph)) == [["a", "b", "c", "a"], ["e", "e2", "e"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles():
    graph, known = import_graph()
    found = [describe_cycle(c, graph, known) for c in cycles(graph)]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_modules_and_functions_stay_small():
    offenders = []
    for module, path in modules().items():
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        n = len(text.splitlines())
        if n > MAX_MODULE_LINES and module not in MODULE_LINES_ALLOWED:
            offenders.append(f"{rel}: {n} lines (limit {MAX_MODULE_LINES})")
        for name, node in _functions(ast.parse(text)):
            limit = FUNCTION_LIMITS.get((module, name), MAX_FUNCTION_LINES)
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                offenders.append(f"{rel}:{node.lineno}: {name} is {length} lines (limit {limit})")
    assert not offenders, "too long:\n" + "\n".join(offenders)


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def test_every_non_python_file_of_the_package_ships_in_the_wheel():
    """pyproject's package-data must name every file the package reads at run time (C/C++ sources it builds,
    the web page): a wheel without them fails only once installed (jit_hook.cpp was missing once)."""
    import fnmatch
    import subprocess
    import tomllib

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mlx_persona"]
    tracked = subprocess.run(["git", "ls-files", "mlx_persona"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.split()
    data = [f[len("mlx_persona/"):] for f in tracked if not f.endswith(".py")]
    assert data, "no package data found"
    missing = [f for f in data if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
