"""Prefect cache policy and retry rule for the stage tasks.

The cache key of a task is the stage key of its output, so the UI shows `Cached` exactly when the
output exists. The key is computed by the flow before the task starts (tasks/stages.py) and passed to
the task; the policy only reads it, so it cannot fail and switch Prefect's caching off on its own.
Prefect's cache record is stored inside the output folder: deleting the output deletes the cache
entry with it, and a cache hit can never hand back a missing folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

from finetune.core.errors import PermanentError
from finetune.core.outputs import is_complete, output_dir_for

RESULT_RECORD = ".prefect-result"
# Cache keys are absolute paths of records inside output folders, so records are stored from the root.
RESULT_STORAGE = Path("/")


@dataclass
class StageCache(CachePolicy):
    """Key = `<root>/<stage>/<key>/.prefect-result`, from the task's `root` and `key` parameters."""

    stage: str = ""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        output_dir = output_dir_for(Path(inputs["root"]), self.stage, inputs["key"]).resolve()
        if output_dir.exists() and not is_complete(output_dir):
            return None  # a damaged output: no cache lookup, the stage rebuilds it
        return str(output_dir / RESULT_RECORD)


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry transient failures (and out-of-memory, with a smaller
    micro-batch), never errors that the same inputs would raise again."""
    try:
        state.result()
    except PermanentError:
        return False
    except Exception:
        return True
    return True
