"""The shape of the code: the package map, imports that only go down its layers, short functions, and a
README code map that names every module."""

from __future__ import annotations

import ast
import re

from tests.conftest import ROOT

MAX_FUNCTION_LINES = 60
# Each module may import its own layer and the layers below it, never one above (and no cycles).
LAYERS = (
    ("finetune.core",),  # keys, outputs, record, champion, config, errors: imports nothing of the project above
    ("finetune.data", "finetune.training", "finetune.reporting"),  # parts the stages are built from
    ("finetune.stages",),  # one module per stage, Prefect-free
    ("tasks",),  # the stages as Prefect tasks
    ("flows",),  # the flow: chains tasks
    ("finetune.cli",),  # commands: start flows, or run a stage for a finished run
)
STAGES = {"prepare", "resolve", "tokenize", "quantize", "train", "evaluate", "merge", "export"}


def _module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    paths = [p for top in ("finetune", "flows", "tasks") for p in sorted((ROOT / top).rglob("*.py"))]
    return {_module_name(path): ast.parse(path.read_text(encoding="utf-8")) for path in paths}


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


def _layer(module: str) -> int | None:
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None  # the package roots (finetune, finetune.stages, ...): empty __init__ files


def test_the_package_map_is_the_architecture():
    modules = set(_modules())
    placed = {m for m in modules if _layer(m) is not None}
    assert modules - placed == {"finetune"}, "every module lives in a layer's package"
    stages = {m.removeprefix("finetune.stages.") for m in modules if m.startswith("finetune.stages.")}
    assert STAGES <= stages and stages - STAGES == {"train_rank"}, "finetune/stages/ holds one module per stage"
    assert all(not (ROOT / "finetune" / f"{name}.py").exists() for name in STAGES), "no stage outside finetune/stages/"


def test_imports_only_go_down_the_layers_without_cycles():
    modules = _modules()
    graph = {name: _imports(tree, set(modules)) - {name} for name, tree in modules.items()}
    upward = [
        f"{name} imports {other}"
        for name, imported in graph.items()
        for other in imported
        if _layer(name) is not None and _layer(other) is not None and _layer(other) > _layer(name)
    ]
    assert upward == []
    assert graph["finetune.core.config"] <= {"finetune.core.errors"}  # the schema sits at the bottom

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        for other in graph[name]:
            visit(other, (*path, name))

    for name in graph:
        visit(name, ())


def test_no_function_is_longer_than_sixty_lines():
    too_long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert too_long == []


def test_stage_logic_does_not_import_prefect():
    for name, tree in _modules().items():
        if _layer(name) is None or _layer(name) > 2:  # tasks, flows and commands are Prefect's side
            continue
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in imported if m.split(".")[0] == "prefect"}, name


def test_the_readme_code_map_names_every_module():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Code layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`((?:finetune|flows|tasks)/[\w/]+\.py)`", section))
    on_disk = {
        p.relative_to(ROOT).as_posix()
        for top in ("finetune", "flows", "tasks")
        for p in (ROOT / top).rglob("*.py")
        if p.name != "__init__.py"
    }
    assert sorted(on_disk - named) == [], "modules missing from the README's code map"
    assert sorted(named - on_disk) == [], "the README's code map names modules that do not exist"


def test_no_flow_file_is_named_like_an_importable_module():
    """Prefect loads an entrypoint as a script registered under its file name, with flows/ put first on
    sys.path: a flows/finetune.py would stand in for the package `finetune` in the worker's process."""
    import importlib.util

    stems = [path.stem for path in (ROOT / "flows").glob("*.py") if path.stem != "__init__"]
    assert stems and [stem for stem in stems if importlib.util.find_spec(stem) is not None] == []
