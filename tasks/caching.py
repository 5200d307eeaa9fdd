"""Prefect cache policy and retry rules for the stage tasks.

The cache key of a task is the stage key of its output (finetune.outputs), so the UI shows `Cached`
exactly when the output exists. Prefect's cache record is stored inside that output folder: deleting
the output deletes the cache entry with it, and a cache hit can never hand back a missing folder.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

from finetune.outputs import is_complete, output_dir_for

RESULT_RECORD = ".prefect-result"
# Cache keys are absolute paths of records inside output folders, so records are stored from the root.
RESULT_STORAGE = Path("/")


@dataclass
class StageCache(CachePolicy):
    """Key = `<root>/<stage>/<stage key>/.prefect-result`, computed by the stage's own key function."""

    stage: str = ""
    key_fn: Callable[..., str] = field(default=lambda: "")

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        names = inspect.signature(self.key_fn).parameters
        key = self.key_fn(**{name: inputs[name] for name in names})
        output_dir = output_dir_for(Path(inputs["root"]), self.stage, key).resolve()
        if output_dir.exists() and not is_complete(output_dir):
            return None  # a damaged output: no cache lookup, the stage rebuilds it
        return str(output_dir / RESULT_RECORD)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that a retry cannot fix: bad data, bad config, an unreachable or unknown model."""
    from finetune.config import ConfigError
    from finetune.merge import MergeParityError
    from finetune.prepare import DataError
    from finetune.resolve import ModelResolutionError
    from finetune.train import NonFiniteLossError, OutOfMemoryAtSmallestBatch

    return (ConfigError, DataError, ModelResolutionError, MergeParityError, NonFiniteLossError, OutOfMemoryAtSmallestBatch)


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry transient failures (and out-of-memory, with a smaller
    micro-batch), never errors that the same inputs would raise again."""
    try:
        state.result()
    except user_error_types():
        return False
    except Exception:
        return True
    return True
