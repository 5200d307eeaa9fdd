"""The one shape of every stage: a typed inputs object in, an output folder named by its key out.

A stage module defines a frozen dataclass of its inputs (upstream output folders and config sections,
by keyword) and a builder that fills a temporary folder from them; `Stage` ties the two together. The
key is computed once from the inputs object and handed to the builder, so nothing matches parameters
by name and two `Path`s cannot swap places unnoticed.

The code part of a key is the stage's module and every module of this package that it imports,
directly or through another one, found by reading their imports. Each is hashed as its syntax tree
with docstrings removed, so editing a comment, a docstring or the formatting keeps every output, while
any change to what the code does makes that stage (and everything downstream) run again.
`finetune.core.config` is left out: the config values a stage reads are in its key already, and it holds
values and their validation only (tests/test_keys.py checks that it decides nothing).

The libraries part of a key is the installed version of every library that computes the stage: those
its modules import (found from the same import statements), less the plumbing that only moves files or
parses config, plus those a stage reaches through another library without importing them (bitsandbytes
through transformers' quantization config, say), which the stage names. An upgrade of transformers reruns
every stage that imports it; nothing else.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Generic, TypeVar

from finetune.core.config import ConfigError
from finetune.core.errors import InternalError
from finetune.core.outputs import build_output, digest_cache_dir, stage_key, write_text_atomic

Inputs = TypeVar("Inputs")
NOT_CODE = frozenset({"finetune.core.config"})  # its values enter keys as config sections
# Imported by stage modules for plumbing (locks, config, YAML): their versions do not change an output.
PLUMBING = frozenset({"filelock", "pydantic", "pyyaml"})


def _ignore_progress(share: float) -> None:
    pass


def _no_secrets(name: str) -> str:
    raise ConfigError(
        f"model.token_secret={name}: Prefect Secret blocks are read inside a Prefect run (finetune run, a "
        "deployment); calling the stage directly, set HF_TOKEN instead"
    )


@dataclass(frozen=True)
class Hooks:
    """How a running stage talks to whoever runs it: a logger, `progress(share done, 0..1)` for long
    stages, and `secret(name)` for values that must reach the stage but never its key, logs or outputs."""

    logger: logging.Logger | logging.LoggerAdapter = field(default_factory=lambda: logging.getLogger("finetune"))
    progress: Callable[[float], None] = _ignore_progress
    secret: Callable[[str], str] = _no_secrets


def hub_token(token_secret: str | None, secret: Callable[[str], str]) -> str | None:
    """The hub token, for models and datasets alike: the Prefect Secret block `token_secret`
    (model.token_secret) read through `secret`, else HF_TOKEN, else none."""
    return secret(token_secret) if token_secret else os.environ.get("HF_TOKEN") or None


# (inputs, key, temporary output folder, hooks) -> extra manifest fields. The temporary folder is a
# sibling of the final one, `<root>/<stage>/.<key>.*.tmp`, renamed into place when the builder returns.
Builder = Callable[[Any, str, Path, Hooks], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Stage(Generic[Inputs]):
    """A pipeline stage; call it with its inputs object and the root folder of its outputs."""

    name: str
    inputs_type: type[Inputs]
    builder: Builder
    module: str  # the module that defines the stage: its code (and what it imports) is in the key
    # Distributions that compute the stage without being imported by it (reached through another library).
    reached_through: tuple[str, ...] = ()

    def libraries(self) -> dict[str, str]:
        """{distribution: installed version} of the libraries whose upgrade must rerun this stage."""
        names = (imported_distributions(self.module) - PLUMBING) | {_normalized_name(n) for n in self.reached_through}
        return {name: library_version(name) for name in sorted(names)}

    def key(self, inputs: Inputs) -> str:
        if not isinstance(inputs, self.inputs_type):
            raise InternalError(f"stage {self.name} takes {self.inputs_type.__name__}, got {type(inputs).__name__}")
        return stage_key(self.name, code_digest(self.module), inputs, self.libraries())

    def __call__(self, inputs: Inputs, root: Path, *, key: str | None = None, hooks: Hooks | None = None) -> Path:
        """`<root>/<name>/<key>/`, built unless it is complete already; `key` if the caller computed it."""
        key = key or self.key(inputs)
        hooks = hooks or Hooks()
        return build_output(Path(root), self.name, key, lambda out: self.builder(inputs, key, out, hooks))


def _module_path(name: str) -> Path | None:
    """The source file of module `name` of this package, found without importing anything."""
    top, *rest = name.split(".")
    spec = find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(next(iter(spec.submodule_search_locations))).joinpath(*rest)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def library_version(distribution: str) -> str:
    """The installed version without its local build tag: torch 2.13.0+cpu and 2.13.0+cu128 are the same
    code, so a CPU and a GPU machine compute the same key (a stage's dtype and device are in its config)."""
    try:
        return metadata.version(distribution).split("+")[0]
    except metadata.PackageNotFoundError:
        return "not installed"


def _remembered(name: str, identity: str, compute: Callable[[], Any]) -> Any:
    """`compute()`, remembered as JSON under the digest cache's folder by `identity`: a new process (every
    `finetune run`) reads it back instead of computing it again. Identities name everything the value
    depends on, so an entry is never stale; an unwritable cache only costs the computation."""
    entry = digest_cache_dir().parent / name / f"{hashlib.sha256(identity.encode()).hexdigest()}.json"
    try:
        return json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    value = compute()
    try:
        write_text_atomic(entry, json.dumps(value))
    except OSError:
        pass
    return value


def _installed_identity() -> str:
    """What is installed where imports look: every distribution's metadata folder on sys.path, by name
    (which carries its version) and modification time."""
    found = [sys.version]
    for folder in map(Path, sys.path):
        try:
            with os.scandir(folder) as entries:
                found += sorted(
                    f"{folder}/{e.name}:{e.stat().st_mtime_ns}" for e in entries if e.name.endswith((".dist-info", ".egg-info"))
                )
        except OSError:
            continue
    return "\n".join(found)


@functools.cache
def _providers() -> dict[str, list[str]]:
    """Top-level import name -> distributions; reading every installed package's metadata takes ~0.5 s on
    a 2-core CPU, so the map is remembered for the set of installed packages."""
    return _remembered("providers", _installed_identity(), lambda: dict(metadata.packages_distributions()))


def imported_distributions(module: str) -> set[str]:
    """Third-party distributions (PEP 503 names) that `module` and the modules of its package it imports
    import, at any depth. An import of a module that no distribution provides counts as itself."""
    package = module.split(".")[0]
    tops = {
        name.split(".")[0]
        for other in stage_modules(module)
        for level, name, _ in _source(_module_path(other)).imports
        if not level and name
    }
    tops -= {package, "__future__", *sys.stdlib_module_names}
    return {_normalized_name(dist) for top in tops for dist in _providers().get(top, [top])}


def _normalized_name(distribution: str) -> str:
    """A distribution's name as PyPI compares them (PEP 503): rouge_score and rouge-score are one."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


@dataclass(frozen=True)
class _Source:
    """What keys read of one source file."""

    normalized: str  # the syntax tree without docstrings, written back
    imports: tuple[tuple[int, str, tuple[str, ...]], ...]  # (level, module, names) of every import statement


def _parse_source(text: str) -> dict[str, Any]:
    tree = ast.parse(text)
    imports = []
    for node in ast.walk(tree):  # at any depth: lazy imports inside functions too
        if isinstance(node, ast.Import):
            imports += [(0, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imports.append((node.level, node.module or "", tuple(alias.name for alias in node.names)))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return {"normalized": ast.unparse(tree), "imports": imports}


@functools.lru_cache(maxsize=1024)
def _parse(path: Path, mtime_ns: int, size: int) -> _Source:
    """Parsed once per version of the file in a process, and remembered across processes by its bytes and
    the Python version (whose ast.unparse writes the normalized text)."""
    text = path.read_text(encoding="utf-8")
    identity = f"{sys.version_info[:2]}\0{text}"
    parsed = _remembered("sources", identity, lambda: _parse_source(text))
    imports = tuple((level, name, tuple(names)) for level, name, names in parsed["imports"])
    return _Source(parsed["normalized"], imports)


def _source(path: Path) -> _Source:
    """The file parsed once per version of it (its mtime and size): a flow computes many keys."""
    stat = path.stat()
    return _parse(path, stat.st_mtime_ns, stat.st_size)


def _imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import statement of `module` may refer to."""
    names: set[str] = set()
    for level, base, imported in _source(path).imports:
        if level:  # relative: resolved against the importing module's package
            parent = module.rsplit(".", level)[0]
            base = f"{parent}.{base}" if base else parent
        names.add(base)
        names.update(f"{base}.{name}" for name in imported)  # `from pkg import module`
    return names


def stage_modules(module: str) -> list[str]:
    """`module` and the modules of its package it imports, directly or through others."""
    package = module.split(".")[0]
    found: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in found or name in NOT_CODE or (path := _module_path(name)) is None:
            continue
        found.add(name)
        imported = _imported_names(path, name)
        todo += [other for other in imported if other.split(".")[0] == package]
    return sorted(found)


def normalized_source(path: Path) -> str:
    """The code of a module without comments, docstrings or formatting: its syntax tree, written back."""
    return _source(path).normalized


def code_digest(module: str) -> str:
    """Hash of the code a stage runs: `module` and what it imports from its package (see above)."""
    digest = hashlib.sha256()
    for name in stage_modules(module):
        digest.update(f"{name}\0{normalized_source(_module_path(name))}\0".encode())
    return digest.hexdigest()

