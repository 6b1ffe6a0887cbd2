"""The package's shape, read from its source: the stages depend one way (adapters → fold → export →
patch / serve, with the runtime under the exporter), and no module reaches into another's private
names. Read with ``ast`` from every ``import`` / ``from`` statement, those inside functions too
(an import moved into a function to dodge a cycle is still a dependency).

That running an exported model leaves torch out of ``sys.modules`` is tested where the exports
are built: ``tests/serve/test_torch_free.py::test_onnx_model_runs_every_task_without_torch``
(``import hypermerge; hypermerge.OnnxModel``, then embed / classify / generate / stream in a
subprocess where importing torch fails), and ``tests/export/test_runtime_imports.py`` for the
runtime modules' own imports."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import hypermerge

PACKAGE = Path(hypermerge.__file__).parent
ROOT = "hypermerge"


def _modules() -> dict[str, Path]:
    """Every module's dotted name -> its file (``hypermerge.export.api`` -> .../export/api.py)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` statement names (relative imports resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + is_package]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> Iterator[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import statement of ``module``."""
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for alias in node.names:
                yield target, alias.name, node.lineno


def _stage(module: str) -> str:
    """The stage a module belongs to: its sub-package (``export``), or a top-level module's own
    name (``cli``, ``errors``); ``hypermerge`` itself is the public facade over all of them."""
    parts = module.split(".")
    return ROOT if len(parts) == 1 else parts[1]


def _target(imported: str, name: str | None) -> str | None:
    """The hypermerge module an import reaches (``from hypermerge.export import api`` reaches
    ``hypermerge.export.api``); None for third-party and standard-library modules."""
    if imported.partition(".")[0] != ROOT:
        return None
    if name is not None and f"{imported}.{name}" in MODULES:
        return f"{imported}.{name}"
    return imported


def stage_graph() -> dict[str, dict[str, list[str]]]:
    """stage -> the stages it imports -> where (``module:line``), self-edges left out."""
    graph: dict[str, dict[str, list[str]]] = {}
    for module in MODULES:
        source = _stage(module)
        graph.setdefault(source, {})
        for imported, name, line in _imports(module):
            target = _target(imported, name)
            if target is None or _stage(target) == source:
                continue
            graph[source].setdefault(_stage(target), []).append(f"{module}:{line}")
    return graph


def _cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of the graph as a path of stages (its first stage repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_stages_import_one_another_without_a_cycle():
    graph = stage_graph()
    assert {"adapters", "fold", "export", "patch", "serve", "runtime", "training"} <= set(graph)
    cycle = _cycle(graph)
    where = [] if cycle is None else [(a, b, graph[a][b][:3]) for a, b in zip(cycle, cycle[1:], strict=False)]
    assert cycle is None, f"stages import each other in a cycle {' -> '.join(cycle)}: {where}"


def test_the_dependency_order_is_adapters_fold_export_patch():
    graph = stage_graph()
    upward = {("adapters", "fold"), ("adapters", "export"), ("adapters", "patch"), ("fold", "export"),
              ("fold", "patch"), ("export", "patch"), ("runtime", "export"), ("runtime", "patch"),
              ("export", "serve"), ("runtime", "serve")}
    found = {(a, b): graph[a][b] for a, b in upward if b in graph.get(a, {})}
    # the facade (`import hypermerge`) imports every stage lazily: a stage importing it imports them all
    found |= {(a, ROOT): targets[ROOT] for a, targets in graph.items() if ROOT in targets and a != ROOT}
    assert found == {}


def _private_uses(module: str) -> Iterator[str]:
    """``from x import _name`` and ``alias._name`` where x / alias is another hypermerge module."""
    tree = ast.parse(MODULES[module].read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported = _resolve(module, node)
            for alias in node.names:
                target = _target(imported, alias.name)
                if target is None or target == module:
                    continue
                if target in MODULES and target.endswith(f".{alias.name}"):
                    aliases[alias.asname or alias.name] = target  # a module imported by name
                elif alias.name.startswith("_") and not alias.name.startswith("__"):
                    yield f"{module}:{node.lineno} imports {imported}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in MODULES and alias.name != module:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            yield f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}"


def test_no_module_uses_another_modules_private_names():
    found = [use for module in MODULES for use in _private_uses(module)]
    assert found == []


def test_the_checker_sees_what_it_looks_for():
    """The graph is not empty by accident: the known edges are there."""
    graph = stage_graph()
    assert "fold" in graph["export"] and "export" in graph["patch"] and "runtime" in graph["export"]
    assert _stage("hypermerge.export.api") == "export" and _stage("hypermerge.cli") == "cli" and _stage(ROOT) == ROOT
