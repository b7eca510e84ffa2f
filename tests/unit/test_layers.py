"""The job core's modules depend on each other one way (issue 13, point 8).

From the wiring of Celery's signals and threads (workers.app) down through the job
lifecycle to the Celery app and its configuration (workers.celery_app): a reader follows a
job in one direction. Imports inside functions count too: a lazy import is still a
dependency, and a cycle hidden in one is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

WORKERS = Path(__file__).resolve().parents[2] / "workers"


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in WORKERS.glob("*.py"):
        name = path.stem
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "workers":
                    deps.update(alias.name for alias in node.names)
                elif node.module.startswith("workers."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names
                            if a.name.startswith("workers."))
        graph[name] = {d for d in deps if (WORKERS / f"{d}.py").exists() and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep):], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_core_modules_import_each_other_one_way() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_nothing_in_the_core_imports_the_wiring_and_the_app_imports_nothing_above_it() -> None:
    graph = _graph()
    assert not [m for m, deps in graph.items() if "app" in deps], "workers.app is the top"
    assert graph["celery_app"] <= {"settings"}, graph["celery_app"]
