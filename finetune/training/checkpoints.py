"""Training checkpoints that can be trusted: sealed after the Trainer writes them, checked before resume.

The Trainer writes `checkpoint-N/` file by file; a process killed half way leaves a folder that looks
like a checkpoint. After each save a seal (`seal.json`: size and sha256 of every file) is written
atomically; a checkpoint without a seal, or whose files no longer match it (truncated, deleted), is
damaged: it is removed with a warning and the one before it is used.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from finetune.core.outputs import file_digest, write_text_atomic

SEAL = "seal.json"
PREFIX = "checkpoint-"  # transformers' PREFIX_CHECKPOINT_DIR


def checkpoint_step(checkpoint_dir: Path) -> int:
    return int(checkpoint_dir.name.removeprefix(PREFIX))


def seal_checkpoint(checkpoint_dir: Path) -> None:
    files = sorted(p for p in checkpoint_dir.rglob("*") if p.is_file() and p.name != SEAL)
    seal = {p.relative_to(checkpoint_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": file_digest(p)} for p in files}
    write_text_atomic(checkpoint_dir / SEAL, json.dumps(seal, indent=1))


def checkpoint_problem(checkpoint_dir: Path) -> str | None:
    """None when the checkpoint is whole, else what is wrong with it."""
    try:
        seal = json.loads((checkpoint_dir / SEAL).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "never sealed: its writing was interrupted"
    except json.JSONDecodeError:
        return f"{SEAL} is corrupt"
    for name, expected in seal.items():
        path = checkpoint_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['bytes']} were written"
        if file_digest(path) != expected["sha256"]:
            return f"{name} changed after it was written"
    return None


def newest_intact_checkpoint(directory: Path, logger: logging.Logger) -> Path | None:
    """The newest whole checkpoint under `directory`; damaged newer ones are removed with a warning."""
    if not directory.is_dir():
        return None
    candidates = sorted(directory.glob(f"{PREFIX}*"), key=checkpoint_step, reverse=True)
    for checkpoint in candidates:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        logger.warning("checkpoint %s is damaged (%s); removing it and trying the one before", checkpoint.name, problem)
        shutil.rmtree(checkpoint)
    return None
