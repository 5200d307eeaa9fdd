"""The stages as Prefect tasks, made by one factory: name, cache policy, retries, logs, progress, and
a concurrency slot where one run at a time should hold the hardware.

The logic is in finetune/; a task only runs a stage with Prefect's logger and, for long stages, a
progress artifact.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.concurrency.sync import concurrency
from prefect.logging import get_run_logger
from prefect.states import State

from finetune.core.config import ConfigError, DataConfig
from finetune.core.stage import Hooks, Stage
from finetune.data.sources import Listed, list_sources
from finetune.stages.evaluate import evaluate_adapter, score_model
from finetune.stages.export import export_gguf
from finetune.stages.merge import merge_adapter
from finetune.stages.prepare import prepare_dataset
from finetune.stages.quantize import quantize_base
from finetune.stages.resolve import resolve_model
from finetune.stages.tokenize import tokenize_dataset
from finetune.stages.train import train_adapter
from tasks.caching import RESULT_STORAGE, StageCache, retry_unless_permanent

Inputs = TypeVar("Inputs")
# Global concurrency limit held while training: `make deploy` creates it with limit 1, so two runs on one
# machine never train at once. Where it does not exist (ephemeral mode), Prefect skips it.
TRAINING_SLOT = "finetune-training"
# The slot is held through a lease the run renews while it trains; a run that dies (a killed worker, a lost
# machine) stops renewing, and the server's repossessor frees the slot once the lease has run out. `make
# server` keeps leases on disk (Prefect's filesystem lease storage), so a server restart loses none. The lease
# bounds both how long a dead run keeps the slot and how long a server may be down before a live run loses it.
SLOT_LEASE_SECONDS = 300
SLOT_LEASE_VARIABLE = "FINETUNE_SLOT_LEASE_SECONDS"  # set in the worker's environment to change it (60 at least)
SLOT_WAIT_REPORT_SECONDS = 30  # a waiting run says so this often, in its log (the UI's Logs tab)


def _progress_reporter(artifact_key: str, description: str):
    """`progress(share)` updating a progress artifact created at 0% now, so the UI shows the stage
    started while the model still loads (minutes for a 7B base)."""
    artifact_id = create_progress_artifact(0.0, key=artifact_key, description=description)

    def report(share: float) -> None:
        update_progress_artifact(artifact_id, 100.0 * share)

    return report


def slot_lease_seconds() -> int:
    """The slot's lease: SLOT_LEASE_SECONDS, or the worker environment's FINETUNE_SLOT_LEASE_SECONDS."""
    value = os.environ.get(SLOT_LEASE_VARIABLE, str(SLOT_LEASE_SECONDS))
    if not value.isdigit() or not 60 <= int(value) <= 86400:
        raise ConfigError(f"{SLOT_LEASE_VARIABLE}={value!r}: the training slot's lease is whole seconds from 60 to 86400 (Prefect's bounds); unset it for {SLOT_LEASE_SECONDS}")
    return int(value)


@contextmanager
def holding(slot: str, logger) -> Iterator[None]:
    """Hold the global concurrency limit `slot` for the block, saying every SLOT_WAIT_REPORT_SECONDS what the
    run waits for while another run holds it."""
    started, lease = time.monotonic(), slot_lease_seconds()
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(
                    concurrency(slot, occupy=1, timeout_seconds=SLOT_WAIT_REPORT_SECONDS, lease_duration=lease)
                )
                break
            except TimeoutError:
                logger.info(
                    "waiting for the training slot %s for %.0f s: another run is training (prefect gcl inspect %s); a "
                    "slot left by a run that died is freed when its lease runs out, within %d s", slot,
                    time.monotonic() - started, slot, lease,
                )  # fmt: skip
        if time.monotonic() - started > SLOT_WAIT_REPORT_SECONDS:
            logger.info("training slot %s taken after %.0f s of waiting", slot, time.monotonic() - started)
        yield


def load_secret(name: str) -> str:
    """The value of the Prefect Secret block `name` (from the server, or the local database); a block that
    holds JSON (a data source's credentials) gives its JSON text."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError:
        raise ConfigError(
            f"{name}: no Prefect Secret block of that name (model.token_secret or a data source's credentials_secret); "
            f"create it in the UI (Blocks) or with Secret(value=...).save({name!r})"
        ) from None
    return value if isinstance(value, str) else json.dumps(value)  # a JSON value (credentials) as its text


@dataclass(frozen=True)
class StageTask(Generic[Inputs]):
    """A stage and its Prefect task. Calling it computes the stage key here, in the flow: an error in
    it fails the run (inside a cache policy, Prefect would log it and run the task uncached)."""

    stage: Stage[Inputs]
    task: Task

    def __call__(self, inputs: Inputs, root: Path, name: str | None = None) -> State:
        """Run the stage's task; `name` labels a second use of one stage in a run (score_champion)."""
        key = self.stage.key(inputs)
        run = self.task if name in (None, self.stage.name) else self.task.with_options(task_run_name=name)
        return run(inputs, Path(root), key, return_state=True)


def stage_task(
    stage: Stage[Inputs], retries: int = 0, retry_delay_seconds: list[float] | None = None,
    progress: tuple[str, str] | None = None, slot: str | None = None,
) -> StageTask[Inputs]:  # fmt: skip
    """`progress`: (artifact key, description) of a progress artifact the stage keeps up to date;
    `slot`: a global concurrency limit to hold while the stage runs (not while it is served from cache)."""

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
        report = _progress_reporter(*progress) if progress is not None else Hooks().progress
        hooks = Hooks(logger=get_run_logger(), progress=report, secret=load_secret)
        if slot is None:
            return stage(inputs, root, key=key, hooks=hooks)
        with holding(slot, hooks.logger):
            return stage(inputs, root, key=key, hooks=hooks)

    return StageTask(stage, run)


@task(
    name="list-sources", cache_policy=NO_CACHE, persist_result=False,
    retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_unless_permanent,
)  # fmt: skip
def list_sources_task(data: DataConfig, token_secret: str | None) -> Listed:
    """data.sources and data.heldout_source listed for prepare's key (never cached: a listing is how a run
    sees that a bucket changed); a store that cannot be reached is retried."""
    sources, heldout = listings = list_sources(data, load_secret, token_secret)
    for listing in (*sources, *([heldout] if heldout else [])):
        get_run_logger().info("%s: %s, %s", listing.where, listing.shown, f"{len(listing.content)} object(s)" if listing.kind == "objects" else listing.kind)
    return listings


prepare_task = stage_task(prepare_dataset)
resolve_model_task = stage_task(resolve_model, retries=2, retry_delay_seconds=[5, 30])
tokenize_task = stage_task(tokenize_dataset)
quantize_task = stage_task(quantize_base, retries=1, retry_delay_seconds=[10])
train_task = stage_task(
    train_adapter, retries=2, retry_delay_seconds=[10, 60],
    progress=("training-progress", "Optimizer steps done, in %"), slot=TRAINING_SLOT,
)  # fmt: skip
evaluate_task = stage_task(evaluate_adapter, retries=1, retry_delay_seconds=[10])
merge_task = stage_task(merge_adapter, retries=1, retry_delay_seconds=[10])
export_task = stage_task(export_gguf, retries=1, retry_delay_seconds=[10])
score_task = stage_task(score_model, retries=1, retry_delay_seconds=[10])
