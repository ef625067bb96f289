"""The packages import one way, in data-flow order: features/ (the data side) imports neither
recsys/ (model, training) nor serving/; recsys/ does not import serving/; serving/ does not import
the training machinery; nothing imports plexrec/ (the command line and the quickstart, on top);
no modules import each other in a circle.

Read from the source with ``ast``: every ``import`` and ``from ... import`` counts, also those
deferred into function bodies, so a dependency cannot hide from the check by being imported late.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in a module's source, at any depth; relative imports
    resolved against ``package`` (the module's own package)."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + [node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            if not node.module:  # from . import x: each name is a module
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            found.append((node.lineno, node.args[0].value))  # importlib.import_module("pkg.mod")
    return found


def violations(folder: str, forbidden: tuple[str, ...], exempt: set[str] = frozenset()) -> list[str]:
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        if name in exempt:
            continue
        package = ".".join(path.relative_to(ROOT).parts[:-1])
        for line, module in imported_modules(path.read_text(), package):
            if module.split(".")[0] in forbidden:
                out.append(f"{name}:{line} imports {module}")
    return out


def test_the_data_side_imports_neither_training_nor_serving():
    found = violations("features", ("recsys", "serving"))
    assert not found, "features/ must stand on its own:\n" + "\n".join(found)


def test_training_does_not_import_serving():
    found = violations("recsys", ("serving",))
    assert not found, "recsys/ must not import serving/:\n" + "\n".join(found)


TRAINING_MACHINERY = ("recsys.train", "recsys.checkpoints", "recsys.continual", "recsys.learn")  # train_command too


def test_serving_imports_no_training_machinery():
    """A server loads exported versions (recsys/export.py) and runs the ranker; it never trains."""
    found = [f"{name}: imports {module}" for name, imports in module_graph().items() if name.startswith("serving")
             for module in imports if module.startswith(TRAINING_MACHINERY)]
    assert not found, "serving/ must not import the training machinery:\n" + "\n".join(found)


def test_nothing_imports_the_command_line_or_the_quickstart():
    found = []
    for package in PACKAGES:
        found += violations(package, ("plexrec",))
    assert not found, "plexrec/ sits on top, nothing imports it:\n" + "\n".join(found)


def test_the_check_sees_deferred_and_relative_imports():
    source = ("import os\n\ndef f():\n    from recsys.data import x\n    import serving.client\n"
              "\nfrom .store import data_dir\nfrom . import online\nimportlib.import_module('recsys.x')\n")
    assert sorted(imported_modules(source, "features")) == [
        (1, "os"), (4, "recsys.data"), (5, "serving.client"), (7, "features.store"), (8, "features"),
        (8, "features.online"), (9, "recsys.x")]


PACKAGES = ("features", "recsys", "serving")


def module_graph() -> dict[str, set[str]]:
    """Each project module (dotted name) -> the project modules it imports, at any depth of its
    source: ``from a.b import c`` names a.b, and a.b.c too where c is a module."""
    paths = {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
             for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {module for _, module in imported_modules(path.read_text(), package)
                       if module in paths and module != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_modules_import_each_other_in_a_circle():
    """Not directly, not through others, not by an import deferred into a function."""
    found = circles(module_graph())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(circle) for circle in found)


def test_the_circle_check_finds_a_circle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({**graph, "c": set()}) == []
