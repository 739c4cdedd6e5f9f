"""The evaluation package is a pipeline, not a circle: options/entries -> evaluate -> (sweep, compare),
with metrics, plots and the report below them. Checked on the source (ast), imports inside functions
included, so a lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from test_layout import import_graph

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_persona"
EVAL = PACKAGE / "eval"


def _eval_graph() -> dict[str, set[str]]:
    """The eval modules and every package module each imports (test_layout's walk of the whole package)."""
    graph, _ = import_graph()
    return {m: set(edges) for m, edges in graph.items() if m == "mlx_persona.eval" or m.startswith("mlx_persona.eval.")}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), list(graph.get(start, ()))
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())
    return seen


def test_eval_has_no_import_cycle():
    graph = _eval_graph()
    assert len(graph) >= 9, sorted(graph)
    cycles = [m for m in graph if m in _reachable(graph, m)]
    assert not cycles, {m: sorted(graph[m]) for m in cycles}


def test_report_and_plots_sit_below_the_runs():
    graph = _eval_graph()
    runs = {"mlx_persona.eval.evaluate", "mlx_persona.eval.sweep", "mlx_persona.eval.compare"}
    for low in ("mlx_persona.eval.report", "mlx_persona.eval.sweep_report", "mlx_persona.eval.markup",
                "mlx_persona.eval.plots", "mlx_persona.eval.metrics", "mlx_persona.eval.verdict",
                "mlx_persona.eval.persona", "mlx_persona.eval.options", "mlx_persona.eval.entries"):
        assert not _reachable(graph, low) & runs, (low, sorted(_reachable(graph, low) & runs))


def test_only_compare_reaches_the_trainer():
    """Evaluating needs the losses, not the trainer; only a comparison trains (through tuner.run)."""
    allowed = {"mlx_persona.eval.compare": {"mlx_persona.tuner.run", "mlx_persona.tuner.config"}}
    for module, imports in _eval_graph().items():
        tuner = {m for m in imports if m.startswith("mlx_persona.tuner")}
        assert tuner <= allowed.get(module, {"mlx_persona.tuner.losses"}), (module, sorted(tuner))


def test_report_reads_no_file():
    """The reports render what the evaluation hands them (results, rows, PNG bytes), and the verdict is computed
    from the same: none of them reads anything back."""
    reads = []
    for name in ("report.py", "sweep_report.py", "markup.py", "verdict.py"):
        reads += _reads(name)
    assert not reads, reads


def _reads(module: str) -> list[str]:
    """The calls in `module` that read a file."""
    reads = []
    for node in ast.walk(ast.parse((EVAL / module).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            mode = node.args[1] if name == "open" and len(node.args) > 1 else None
            if name in ("read_text", "read_bytes", "load_jsonl", "safe_load", "imread") or \
                    (name == "open" and not (isinstance(mode, ast.Constant) and "w" in str(mode.value))):
                reads.append(f"{module}:{node.lineno}: {name}")
    return reads


def test_eval_modules_and_functions_stay_small():
    too_long = []
    for path in sorted(EVAL.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 400:
            too_long.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                too_long.append(f"{path.name}:{node.lineno}: {node.name} is {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long
