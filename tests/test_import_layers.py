"""The layering of the package: no import cycles, and no Ray or serving stack below serving/.

Import edges are read from the source (ast), so a lazy import inside a function counts between
packages; between modules only what runs at import time counts (not `if TYPE_CHECKING:` blocks).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "dspark_ray"
# The one package cycle left: dspark/ reads checkpoints and decoder layers through engine/ modules
# (loading, feature_capture) while engine/ builds DSpark drafters. A model-execution package below
# both removes it (issue 24). Any other cycle fails.
KNOWN_PACKAGE_CYCLES = [["dspark_ray.dspark", "dspark_ray.engine"]]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "generated" not in p.parts}


def imported(path: Path, at_import_time: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = _import_time_nodes(tree.body) if at_import_time else ast.walk(tree)
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in MODULES}


def _import_time_nodes(body: list[ast.stmt]):
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.If, ast.Try)):
            yield from _import_time_nodes([*node.body, *getattr(node, "orelse", []),
                                           *[s for h in getattr(node, "handlers", []) for s in h.body]])
        else:
            yield node


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while component[-1:] != [node]:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back_at_import_time() -> None:
    graph = {name: {other for other in imported(path, True) if not name.startswith(other + ".")}
             for name, path in MODULES.items()}
    assert cycles(graph) == []


def test_no_new_cycle_between_packages() -> None:
    def package(name: str) -> str:
        return ".".join(name.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        graph.setdefault(package(name), set()).update(
            package(other) for other in imported(path, False) if package(other) != package(name))
    assert cycles(graph) == KNOWN_PACKAGE_CYCLES


def test_the_engine_layers_import_no_ray_and_no_serving() -> None:
    modules = sorted(name for name in MODULES if name.startswith(("dspark_ray.engine", "dspark_ray.dspark")))
    script = ("import importlib, json, sys\n"
              f"for name in {modules!r}:\n"
              "    importlib.import_module(name)\n"
              "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'grpc', 'fastapi')\n"
              "                        or m.startswith('dspark_ray.serving'))))\n")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                               cwd=PACKAGE.parent, check=True)
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == []
