"""The package's import graph: no cycle, and arrows point down only (docs/architecture.md).

Every ``import`` statement in src/blockfp8 counts, function-local ones too (a lazy import hides a cycle from
the interpreter, not from a reader). Importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` and ``a``, so
those count as edges as well, except the importer's own parent packages, which are already running.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "blockfp8"
LIBRARY_FORBIDDEN = (f"{ROOT}.testing", f"{ROOT}.cli", f"{ROOT}.__main__")
# Leaves: the format constants, the device identity and the status words import nothing from the package.
LEAVES = (f"{ROOT}.format", f"{ROOT}.device", f"{ROOT}.status")
# The work (backends) never reaches up to whoever decides, assembles or wraps it.
ABOVE_BACKENDS = tuple(f"{ROOT}.{m}" for m in ("dispatch", "ops", "nn", "checkpoint", "distributed", "fused",
                                                "modules"))


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / ROOT).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not _is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(importer: str, tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(importer, node)
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES}
    return {t for t in found if t in MODULES}


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for target in _targets(name, ast.parse(path.read_text())):
            own = set(_ancestors(name))
            edges |= {t for t in (*_ancestors(target), target) if t not in own and t != name}
        graph[name] = edges
    return graph


GRAPH = import_graph()


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_graph_sees_the_package():
    assert {f"{ROOT}.ops", f"{ROOT}.backends.triton.gemm", f"{ROOT}.testing.timing", f"{ROOT}.cli.bench"} <= set(GRAPH)
    assert f"{ROOT}.dispatch" in GRAPH[f"{ROOT}.ops"]
    # A function-local import counts: ops imports the fused quantizer only on first CUDA use.
    assert f"{ROOT}.backends.triton.act_quant" in GRAPH[f"{ROOT}.ops"]


def test_no_import_cycle():
    assert _find_cycle(GRAPH) is None, " -> ".join(_find_cycle(GRAPH) or [])


def test_cycle_finder_finds_a_planted_cycle():
    planted = {k: set(v) for k, v in GRAPH.items()}
    planted[f"{ROOT}.format"].add(f"{ROOT}.quant")
    assert _find_cycle(planted) is not None


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith(LIBRARY_FORBIDDEN)))
def test_library_never_imports_tools(name):
    bad = sorted(t for t in GRAPH[name] if t.startswith(LIBRARY_FORBIDDEN))
    assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith(f"{ROOT}.testing")))
def test_testing_never_imports_the_cli(name):
    assert not [t for t in GRAPH[name] if t.startswith(f"{ROOT}.cli")]


@pytest.mark.parametrize("name", LEAVES)
def test_leaves_import_nothing_from_the_package(name):
    assert GRAPH[name] == set(), f"{name} imports {sorted(GRAPH[name])}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith(f"{ROOT}.backends")))
def test_backends_do_not_reach_up(name):
    bad = sorted(t for t in GRAPH[name] if t.startswith(ABOVE_BACKENDS))
    assert not bad, f"{name} imports {bad}"
