"""Every error the code raises is either a PermanentError (Prefect never retries it; the message names
what to fix) or one of the few failures a retry can fix, each listed here with the reason."""

from __future__ import annotations

import ast
import importlib

from finetune.core.errors import PermanentError
from tests.conftest import ROOT

# Raised on purpose for Prefect to retry: the next attempt can succeed.
RETRIED = {
    "finetune.stages.resolve.HubUnreachableError": "the hub may answer on the next attempt",
    "finetune.stages.train.TrainingOutOfMemory": "the retry trains with half the micro-batch (noted beside the checkpoints)",
    "finetune.data.sources.StoreUnreachable": "an object store may answer on the next attempt (list-sources, prepare)",
    "finetune.training.distributed.RankFailed": "a rank out of memory, or a launcher that died without a word; "
    "a rank's permanent error is RankFailedPermanently",
}
# Functions whose result is raised: what they return.
RETURNS = {
    "finetune.training.distributed._failure": ("RankFailed", "RankFailedPermanently"),
    "finetune.core.outputs.disk_full": ("DiskFullError",),  # a PermanentError: freeing space is the user's
    "finetune.data.sources.storage_error": ("DataError", "StoreUnreachable"),  # missing or refused; unreachable
    "flows.finetune_flow._fail": ("StageFailed",),  # the flow's own failure, wrapping the stage's error (flows are not retried)
}
VALIDATORS = {"field_validator", "model_validator"}  # pydantic turns their ValueError into ConfigError (load_config)


def _raise_sites():
    for path in sorted([*(ROOT / "finetune").rglob("*.py"), *(ROOT / "tasks").glob("*.py"), *(ROOT / "flows").glob("*.py")]):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        enclosing = {}  # node -> the innermost function around it
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                if node is not function and (node not in enclosing or enclosing[node].lineno < function.lineno):
                    enclosing[node] = function
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                function = enclosing.get(node)
                decorators = {ast.unparse(d).split("(")[0].split(".")[-1] for d in getattr(function, "decorator_list", [])}
                raised = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                yield f"{path.relative_to(ROOT)}:{node.lineno}", module, ast.unparse(raised), decorators

def test_every_raise_site_raises_a_permanent_error_or_a_listed_transient_one():
    problems, checked = [], 0
    for place, module, raised, decorators in _raise_sites():
        namespace = importlib.import_module(module)
        obj = eval(raised, vars(namespace))  # noqa: S307 - a name or attribute from the project's own source
        if isinstance(obj, type) and issubclass(obj, BaseException):
            name = f"{obj.__module__}.{obj.__qualname__}"
            permanent = issubclass(obj, PermanentError)
            if not (permanent or name in RETRIED or (obj is ValueError and decorators & VALIDATORS)):
                problems.append(f"{place}: raises {name}, which Prefect would retry; raise a PermanentError naming what to fix")
        else:
            function = f"{obj.__module__}.{obj.__qualname__}"
            if function not in RETURNS:
                problems.append(f"{place}: raises what {function}() returns; list it in RETURNS")
        checked += 1
    assert checked > 70  # the walk found the raise sites (78 when written)
    assert problems == []


def test_the_retried_errors_are_not_permanent_and_the_ones_returned_exist():
    for name in RETRIED:
        module, cls = name.rsplit(".", 1)
        assert not issubclass(getattr(importlib.import_module(module), cls), PermanentError), name
    from finetune.training import distributed

    assert issubclass(distributed.RankFailedPermanently, PermanentError)
    assert issubclass(distributed.RankFailedPermanently, distributed.RankFailed)
