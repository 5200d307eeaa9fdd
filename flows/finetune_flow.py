"""The `finetune` flow: prepare -> resolve_model -> tokenize -> quantize_base -> train -> evaluate -> merge -> score -> promote.

The flow only chains tasks and keeps the run record; each stage's logic is in finetune/<stage>.py.
Every stage takes one inputs object, built here by keyword from upstream output folders and config
sections.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from finetune.core.champion import ChampionRecordError, champion_model_dir, read_record
from finetune.core.config import FinetuneConfig, load_config
from finetune.core.errors import PermanentError
from finetune.core.measure import PeakMemory
from finetune.core.outputs import read_manifest, write_text_atomic
from finetune.core.preflight import check_hardware
from finetune.core.record import RunRecord, read_json
from finetune.reporting.run_card import write_run_reports
from finetune.stages.evaluate import EvaluateInputs, ScoreInputs
from finetune.stages.export import ExportInputs
from finetune.stages.merge import MergeInputs
from finetune.stages.prepare import PrepareInputs
from finetune.stages.quantize import QuantizeInputs
from finetune.stages.resolve import ResolveInputs
from finetune.stages.tokenize import TokenizeInputs
from finetune.stages.train import TrainInputs
from tasks.promotion import promote_task
from tasks.reporting import publish_reports
from tasks.stages import (
    StageTask,
    evaluate_task,
    export_task,
    list_sources_task,
    merge_task,
    prepare_task,
    quantize_task,
    resolve_model_task,
    score_task,
    tokenize_task,
    train_task,
)


class _MessageOnlyForPermanent(logging.Filter):
    """Prefect logs a failed task or flow run with its traceback. For a failure that the user fixes (bad
    data, a bad config key: finetune.core.errors.PermanentError, or a stage failure it caused) the message
    already names the file, line or key; the traceback would only point into this project's code."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        while error is not None and not isinstance(error, PermanentError):
            error = error.__cause__
        if error is not None:
            record.exc_info, record.exc_text = None, None
        return True


RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


def hide_tracebacks_of_permanent_errors() -> None:
    """Install the filter on Prefect's run loggers, once per process. Called when the flow starts, not at
    import: importing this module (a test, a notebook) changes no logging. It stays for the process, since
    Prefect logs the flow run's own failure after the flow function has returned."""
    for name in RUN_LOGGERS:
        run_logger = logging.getLogger(name)
        if not any(isinstance(f, _MessageOnlyForPermanent) for f in run_logger.filters):
            run_logger.addFilter(_MessageOnlyForPermanent())


def _prefect_state(flow_run_id: str) -> str | None:
    """The state type of a flow run as the Prefect server knows it (COMPLETED, CRASHED, ...); None where it
    cannot say (another server's run, a server that is down)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(UUID(flow_run_id)).state.type.value
    except Exception:  # not on this server, unreachable, or not an id: it cannot say  # noqa: BLE001
        return None


class StageFailed(RuntimeError):
    def __init__(self, stage: str, reason: str, run_dir: Path):
        super().__init__(f"stage {stage} failed: {reason}")
        self.stage, self.reason, self.run_dir = stage, reason, run_dir


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _close(record: RunRecord, status: str, error: str | None = None) -> dict[str, Any]:
    """Finish the record (run.json), write its run card and pictures, and publish them as artifacts."""
    result = record.finish(status, error)
    write_run_reports(result)
    publish_reports(result)
    return result


def _fail(record: RunRecord, name: str, error: BaseException) -> StageFailed:
    """Finish the record as failed at `name`, publish it, and return the error for the caller to raise."""
    reason = _first_line(error)
    try:
        _close(record, "failed", f"{name}: {reason}")
    except OSError as unwritten:  # the run folder's disk is full too: the stage's own error comes first
        logging.getLogger("finetune").warning("the run record of %s could not be written: %s", record.run_dir, unwritten)
    return StageFailed(name, reason, record.run_dir)


def _run_stage(record: RunRecord, stage_task: StageTask, inputs: Any, root: Path, name: str | None = None) -> Path:
    """Run one stage task and record it under `name` (the stage's own by default); a failure, in the
    task or in computing its key, ends the run."""
    name = name or stage_task.stage.name
    started = time.monotonic()
    memory = PeakMemory()
    try:
        state = stage_task(inputs, root, name)
        output_dir = state.result()  # the task's own exception, re-raised, when it failed
    except Exception as error:
        record.stage_done(name, "failed", time.monotonic() - started, None, memory.read())
        raise _fail(record, name, error) from error
    state_name = "cached" if state.name == "Cached" else "completed"
    record.stage_done(name, state_name, time.monotonic() - started, output_dir, memory.read())
    return output_dir


def _listed_sources(record: RunRecord, config: FinetuneConfig) -> tuple:
    """(data.sources, data.heldout_source) listed for prepare's key (a task, retried when a store cannot be
    reached); a failure is prepare's."""
    if not config.data.sources and not config.data.heldout_source:
        return (), None
    started = time.monotonic()
    try:
        return list_sources_task(config.data, config.model.token_secret)
    except Exception as error:
        record.stage_done("prepare", "failed", time.monotonic() - started, None, None)
        raise _fail(record, "prepare", error) from error


def _since_champion(record: RunRecord, config: FinetuneConfig, prepared_dir: Path, tokenized_dir: Path) -> None:
    """The run's data against the data the champion was trained on (data_changes.json/.md in the run folder,
    the `data-changes` artifact): nothing when there is no champion yet; a warning, not a failure, when
    the champion's run record or its data folders are gone."""
    from finetune.reporting.data_changes import changes_markdown, data_changes

    champion = read_record(config.paths.models_dir)
    if champion is None:
        return
    champion_run = str(champion["current"].get("run_name"))
    then = read_json(Path(config.paths.runs_dir) / champion_run / "run.json").get("stages", {})
    folders = [Path(then[name]["output_dir"]) if then.get(name, {}).get("output_dir") else None for name in ("prepare", "tokenize")]
    if folders[0] is None or not (folders[0] / "train.parquet").is_file():
        logging.getLogger("finetune").warning("data changes: the prepared data of the champion's run %s is gone; nothing to compare", champion_run)
        return
    changes = data_changes((prepared_dir, tokenized_dir), (folders[0], folders[1]), champion_run)
    write_text_atomic(record.run_dir / "data_changes.json", json.dumps(changes, indent=2))
    write_text_atomic(record.run_dir / "data_changes.md", changes_markdown(changes))
    record.data_changes = changes
    record.save()


def _promote(record: RunRecord, config: FinetuneConfig, prepared_dir: Path, merged_dir: Path) -> None:
    """Score the candidate and the champion on the same held-out set, then let the gate decide."""
    paths = config.paths
    candidate_dir = merged_dir / "model"
    score = {"prepared_dir": prepared_dir, "tokenize": config.tokenize, "eval": config.eval}
    candidate_score = _run_stage(record, score_task, ScoreInputs(model_dir=candidate_dir, **score), paths.output_dir)
    champion_dir = champion_model_dir(paths.models_dir)
    if champion_dir is not None and not champion_dir.is_dir():
        champion_dir = None  # its folder was deleted: the gate says so and promotes
    champion_score = None
    if champion_dir is not None and champion_dir.resolve() != candidate_dir.resolve():
        champion_score = _run_stage(
            record, score_task, ScoreInputs(model_dir=champion_dir, **score), paths.output_dir, name="score_champion"
        )
    try:
        prepared = read_manifest(prepared_dir) or {}
        about = {"data_key": prepared.get("key"), "train_rows": prepared.get("train_rows")}
        record.promotion = promote_task(
            paths.models_dir, candidate_dir, candidate_score, champion_dir, champion_score, config.promote, record.run_name, about
        )
    except Exception as error:
        raise _fail(record, "promote", error) from error


@flow(name="finetune", log_prints=True)
def finetune(config_path: str | None = "configs/default.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """QLoRA fine-tuning as `config_path` plus dotted `overrides` (["lora.r=16"]) say; returns the run record."""
    hide_tracebacks_of_permanent_errors()
    config = load_config(Path(config_path) if config_path else None, overrides or [])
    check_hardware(config)  # before any stage: a paged optimizer on a CPU worker fails here, not in train
    record = RunRecord.begin(
        config, config_path, run_name=flow_run.get_name() or "local", flow_run_id=str(flow_run.get_id()), flow_run_state=_prefect_state
    )
    print(f"run record: {record.run_dir}")
    try:
        return _run(record, config)
    except StageFailed:
        raise
    except Exception as error:  # between stages (the champion record, a folder): the record says so too
        raise _fail(record, "flow", error) from error


def _run(record: RunRecord, config: FinetuneConfig) -> dict[str, Any]:
    """The stages in order, then the gate; a stage's failure is recorded by _run_stage."""
    paths = config.paths
    try:  # no cache rebuilds it: a record that cannot be read stops the run now, not after training
        read_record(paths.models_dir)
    except ChampionRecordError as error:
        raise _fail(record, "champion", error) from error

    prepared_dir = _run_stage(record, prepare_task, PrepareInputs.of(config, *_listed_sources(record, config)), paths.processed_dir)
    model_dir = _run_stage(record, resolve_model_task, ResolveInputs.of(config.model), paths.output_dir)
    tokenized_dir = _run_stage(record, tokenize_task, TokenizeInputs(
        prepared_dir=prepared_dir, model_dir=model_dir, tokenize=config.tokenize,
    ), paths.processed_dir)  # fmt: skip
    _since_champion(record, config, prepared_dir, tokenized_dir)
    base_dir = model_dir  # what train and evaluate load: the base quantized once, or as it is (16-bit LoRA)
    if config.quant.load_in_4bit:
        base_dir = _run_stage(record, quantize_task, QuantizeInputs(model_dir=model_dir, quant=config.quant), paths.output_dir)
    train_dir = _run_stage(record, train_task, TrainInputs(
        tokenized_dir=tokenized_dir, model_dir=base_dir, quant=config.quant, lora=config.lora, train=config.train,
    ), paths.output_dir)  # fmt: skip
    _run_stage(record, evaluate_task, EvaluateInputs(
        train_dir=train_dir, model_dir=base_dir, prepared_dir=prepared_dir, tokenized_dir=tokenized_dir,
        quant=config.quant, tokenize=config.tokenize, eval=config.eval,
    ), paths.output_dir)  # fmt: skip
    merged_dir = _run_stage(record, merge_task, MergeInputs(
        train_dir=train_dir, model_dir=model_dir, prepared_dir=prepared_dir, tokenize=config.tokenize, merge=config.merge,
    ), paths.output_dir)  # fmt: skip
    if config.export.gguf:
        _run_stage(record, export_task, ExportInputs(
            merged_dir=merged_dir, prepared_dir=prepared_dir, template=config.tokenize.template, export=config.export,
        ), paths.output_dir)  # fmt: skip
    _promote(record, config, prepared_dir, merged_dir)

    return _close(record, "completed")
