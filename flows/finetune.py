"""The `finetune` flow: prepare -> resolve_model -> tokenize -> train -> evaluate -> merge.

The flow only chains tasks and keeps the run record; each stage's logic is in finetune/<stage>.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from finetune.config import load_config
from finetune.record import RunRecord
from tasks.reporting import publish_reports
from tasks.stages import evaluate_task, merge_task, prepare_task, resolve_model_task, tokenize_task, train_task


class StageFailed(RuntimeError):
    def __init__(self, stage: str, reason: str, run_dir: Path):
        super().__init__(f"stage {stage} failed: {reason}")
        self.stage, self.reason, self.run_dir = stage, reason, run_dir


def _run_stage(record: RunRecord, name: str, stage_task: Any, *args: Any) -> Path:
    started = time.monotonic()
    state = stage_task(*args, return_state=True)
    seconds = time.monotonic() - started
    if not state.is_completed():
        record.stage_done(name, "failed", seconds, None)
        try:
            state.result()
            reason = state.message or state.name
        except Exception as error:  # the task's own exception, re-raised by Prefect
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        publish_reports(record.finish("failed", f"{name}: {reason}"))
        raise StageFailed(name, reason, record.run_dir)
    output_dir = state.result()
    record.stage_done(name, "cached" if state.name == "Cached" else "completed", seconds, output_dir)
    return output_dir


@flow(name="finetune", log_prints=True)
def finetune(config_path: str | None = "configs/default.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """QLoRA fine-tuning as `config_path` plus dotted `overrides` (["lora.r=16"]) say; returns the run record."""
    config = load_config(Path(config_path) if config_path else None, overrides or [])
    paths = config.paths
    record = RunRecord.begin(config, config_path, run_name=flow_run.get_name() or "local", flow_run_id=str(flow_run.get_id()))
    print(f"run record: {record.run_dir}")

    prepared = _run_stage(record, "prepare", prepare_task, paths.raw_dir, paths.heldout_path, config.data, paths.processed_dir)
    model = _run_stage(record, "resolve_model", resolve_model_task, config.model, paths.output_dir)
    tokenized = _run_stage(record, "tokenize", tokenize_task, prepared, model, config.tokenize, paths.processed_dir)
    adapter = _run_stage(
        record, "train", train_task, tokenized, model, config.quant, config.lora, config.train, paths.output_dir
    )
    _run_stage(
        record, "evaluate", evaluate_task,
        adapter, model, prepared, tokenized, config.quant, config.tokenize, config.eval, paths.output_dir,
    )  # fmt: skip
    _run_stage(record, "merge", merge_task, adapter, model, prepared, config.tokenize, config.merge, paths.output_dir)

    result = record.finish("completed")
    publish_reports(result)
    return result
