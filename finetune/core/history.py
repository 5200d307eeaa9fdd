"""Retraining over time: one line per gate decision in `paths.models_dir/history.jsonl` (promoted, kept,
no change, rollback), oldest first, with the run, its data key and rows, both models' held-out figures and
the paired intervals the gate decided on. The gate and `finetune rollback` append under the champion's
lock; the file is only ever appended to, one whole line per write.

Unlike champion.json it decides nothing: a line that cannot be read (a write cut off by a crash) is left
out of the history with a note, and the next append starts on a line of its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

HISTORY = "history.jsonl"


def append(models_dir: Path, entry: dict[str, Any]) -> None:
    """Add one decision: a single write of a whole line, synced, after a newline if a cut-off write left none."""
    path = Path(models_dir) / HISTORY
    line = json.dumps(entry, sort_keys=True) + "\n"
    with open(path, "a+b") as handle:
        if handle.seek(0, os.SEEK_END):  # not empty: look at its last byte only
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                line = "\n" + line
        handle.write(line.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def read_history(models_dir: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """(the decisions, oldest first; the numbers of lines that could not be read)."""
    path = Path(models_dir) / HISTORY
    if not path.is_file():
        return [], []
    entries, unreadable = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            unreadable.append(number)
    return entries, unreadable
