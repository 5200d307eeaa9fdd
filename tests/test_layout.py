"""The shape of the code: short functions, and imports that go one way, flows -> tasks -> stages -> config."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

PACKAGES = ("finetune", "flows", "tasks")
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, ast.Module]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = ast.parse(path.read_text(encoding="utf-8"))
    return found


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    """Modules of this project that `tree` imports anywhere (lazy imports inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in known}


def test_no_function_is_longer_than_sixty_lines():
    too_long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert too_long == []


def test_imports_go_one_way_without_cycles():
    modules = _modules()
    graph = {name: _imports(tree, set(modules)) - {name} for name, tree in modules.items()}
    for name, imported in graph.items():
        if name.startswith("finetune.") and name != "finetune.cli":  # the CLI starts flows; stage logic never does
            assert not {m for m in imported if m.startswith(("flows", "tasks"))}, name
        if name.startswith("tasks."):
            assert not {m for m in imported if m.startswith("flows")}, name
    assert graph["finetune.config"] <= {"finetune.errors", "finetune.readers"}  # config sits at the bottom

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        for other in graph[name]:
            visit(other, (*path, name))

    for name in graph:
        visit(name, ())


def test_stage_logic_does_not_import_prefect():
    for path in sorted((ROOT / "finetune").glob("*.py")):
        if path.stem == "cli":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in imported if m.split(".")[0] == "prefect"}, path.name


def test_no_flow_file_is_named_like_an_importable_module():
    """Prefect loads an entrypoint as a script registered under its file name, with flows/ put first on
    sys.path: a flows/finetune.py would stand in for the package `finetune` in the worker's process."""
    import importlib.util

    stems = [path.stem for path in (ROOT / "flows").glob("*.py") if path.stem != "__init__"]
    assert stems and [stem for stem in stems if importlib.util.find_spec(stem) is not None] == []
