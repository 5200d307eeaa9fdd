"""The six stages as Prefect tasks, made by one factory: name, cache policy, retries, logs, progress.

The logic is in finetune/; a task only runs a stage with Prefect's logger and, for long stages, a
progress artifact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from prefect import Task, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger
from prefect.states import State

from finetune.evaluate import evaluate_adapter
from finetune.merge import merge_adapter
from finetune.prepare import prepare_dataset
from finetune.resolve import resolve_model
from finetune.stage import Hooks, Stage
from finetune.tokenization import tokenize_dataset
from finetune.train import train_adapter
from tasks.caching import RESULT_STORAGE, StageCache, retry_unless_permanent

Inputs = TypeVar("Inputs")


def _progress_reporter(artifact_key: str, description: str):
    """`progress(share)` that creates the progress artifact on first use and updates it after."""
    artifact_id = None

    def report(share: float) -> None:
        nonlocal artifact_id
        if artifact_id is None:
            artifact_id = create_progress_artifact(100.0 * share, key=artifact_key, description=description)
        else:
            update_progress_artifact(artifact_id, 100.0 * share)

    return report


@dataclass(frozen=True)
class StageTask(Generic[Inputs]):
    """A stage and its Prefect task. Calling it computes the stage key here, in the flow: an error in
    it fails the run (inside a cache policy, Prefect would log it and run the task uncached)."""

    stage: Stage[Inputs]
    task: Task

    def __call__(self, inputs: Inputs, root: Path) -> State:
        key = self.stage.key(inputs)
        return self.task(inputs, Path(root), key, return_state=True)


def stage_task(
    stage: Stage[Inputs], retries: int = 0, retry_delay_seconds: list[float] | None = None,
    progress: tuple[str, str] | None = None,
) -> StageTask[Inputs]:  # fmt: skip
    """`progress`: (artifact key, description) of a progress artifact the stage keeps up to date."""

    @task(
        name=stage.name,
        cache_policy=StageCache(stage=stage.name),
        retries=retries,
        retry_delay_seconds=retry_delay_seconds or 0,
        retry_condition_fn=retry_unless_permanent,
        result_storage=RESULT_STORAGE,
        persist_result=True,
    )
    def run(inputs: Inputs, root: Path, key: str) -> Path:
        hooks = Hooks(logger=get_run_logger())
        if progress is not None:
            hooks = Hooks(logger=hooks.logger, progress=_progress_reporter(*progress))
        return stage(inputs, root, key=key, hooks=hooks)

    return StageTask(stage, run)


prepare_task = stage_task(prepare_dataset)
resolve_model_task = stage_task(resolve_model, retries=2, retry_delay_seconds=[5, 30])
tokenize_task = stage_task(tokenize_dataset)
train_task = stage_task(
    train_adapter, retries=2, retry_delay_seconds=[10, 60],
    progress=("training-progress", "Optimizer steps done, in %"),
)  # fmt: skip
evaluate_task = stage_task(evaluate_adapter, retries=1, retry_delay_seconds=[10])
merge_task = stage_task(merge_adapter, retries=1, retry_delay_seconds=[10])
