"""
The ``ilm`` package's import graph has no cycle: not through module-level
imports, not through imports under ``TYPE_CHECKING``, not through imports
inside functions.  Layers point one way (pure core, then the messenger,
then the edges), so each module can be read knowing only what it imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import ilm

PACKAGE = Path(ilm.__file__).parent


def modules() -> dict[str, Path]:
    """
    Every module of the ``ilm`` package, by dotted name.
    """
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """
    The ``ilm`` modules that module ``name`` imports, anywhere in it.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source not in known:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in known else source)
    found.discard(name)
    return found


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """
    A cycle in ``graph``, if there is one.
    """
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state:
                found = visit(target)
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


class ImportGraphTests(SynchronousTestCase):
    def test_no_cycle(self) -> None:
        """
        No module of ``ilm`` imports, directly or through others, a module
        that imports it back.
        """
        found = modules()
        known = set(found)
        graph = {name: imports(name, path, known) for name, path in found.items()}
        self.assertIn("ilm._messenger", graph["ilm"])
        self.assertIn("ilm._link", graph["ilm._messenger"])
        self.assertIn("ilm._frames", graph["ilm._link"])
        self.assertIsNone(cycle(graph))

    def test_a_cycle_is_found(self) -> None:
        """
        The check finds a cycle where there is one.
        """
        self.assertEqual(
            cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}), ["a", "b", "c", "a"]
        )
        self.assertIsNone(cycle({"a": {"b"}, "b": set()}))
