"""The package's shape: no import circle among its modules, no source file over 450 lines.

Static (the module-level ``import`` / ``from ... import`` statements, read with ``ast``), so it
needs no import to run and sees the real dependency graph: imports inside functions (the lazy
ones kept for start-up time) are not module-level edges and are left out.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "anystep"
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports at module level (a package import counts as its
    ``__init__``; ``from pkg import name`` as ``pkg.name`` when that is a module)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module for a in node.names]
            else:
                continue
            for t in targets:
                if t.startswith("anystep"):
                    # importing a.b.c runs a/__init__, a/b/__init__ first
                    parts = t.split(".")
                    deps.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in mods)
        # A module's own packages are being initialised when it runs: not an edge back.
        parts = name.split(".")
        deps -= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_inside_anystep():
    graph = import_graph()
    assert "anystep.sampling" in graph and "anystep.flow.solvers" in graph["anystep.sampling"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_no_source_file_over_450_lines():
    long = {str(p.relative_to(SRC)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
