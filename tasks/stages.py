"""The six stages as Prefect tasks: name, cache policy, retries, logs. The logic is in finetune/."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from finetune.config import DataConfig, EvalConfig, LoraConfig, MergeConfig, ModelConfig, QuantConfig, TokenizeConfig, TrainConfig
from finetune.evaluate import STAGE as EVALUATE, evaluate_adapter, evaluate_key
from finetune.merge import STAGE as MERGE, merge_adapter, merge_key
from finetune.prepare import STAGE as PREPARE, prepare_dataset, prepare_key
from finetune.resolve import STAGE as RESOLVE, resolve_key, resolve_model
from finetune.tokenization import STAGE as TOKENIZE, tokenize_dataset, tokenize_key
from finetune.train import STAGE as TRAIN, log_line, train_adapter, train_key
from tasks.caching import RESULT_STORAGE, StageCache, retry_unless_user_error

common = {"result_storage": RESULT_STORAGE, "persist_result": True, "retry_condition_fn": retry_unless_user_error}


@task(name=PREPARE, cache_policy=StageCache(stage=PREPARE, key_fn=prepare_key), **common)
def prepare_task(raw_dir: Path, heldout_path: Path, cfg: DataConfig, root: Path) -> Path:
    return prepare_dataset(raw_dir, heldout_path, cfg, root)


@task(name=RESOLVE, cache_policy=StageCache(stage=RESOLVE, key_fn=resolve_key), retries=2, retry_delay_seconds=[5, 30], **common)
def resolve_model_task(cfg: ModelConfig, root: Path) -> Path:
    return resolve_model(cfg, root)


@task(name=TOKENIZE, cache_policy=StageCache(stage=TOKENIZE, key_fn=tokenize_key), **common)
def tokenize_task(prepared_dir: Path, model_dir: Path, cfg: TokenizeConfig, root: Path) -> Path:
    return tokenize_dataset(prepared_dir, model_dir, cfg, root)


@task(name=TRAIN, cache_policy=StageCache(stage=TRAIN, key_fn=train_key), retries=2, retry_delay_seconds=[10, 60], **common)
def train_task(
    tokenized_dir: Path, model_dir: Path, quant: QuantConfig, lora: LoraConfig, train: TrainConfig, root: Path
) -> Path:
    logger = get_run_logger()
    progress_id = create_progress_artifact(0.0, key="training-progress", description="Optimizer steps done, in %")

    def report(step: int, max_steps: int, logs: dict) -> None:
        logger.info(log_line(step, max_steps, logs))
        update_progress_artifact(progress_id, 100.0 * step / max_steps)

    return train_adapter(tokenized_dir, model_dir, quant, lora, train, root, progress=report, logger=logger)


@task(name=EVALUATE, cache_policy=StageCache(stage=EVALUATE, key_fn=evaluate_key), retries=1, retry_delay_seconds=10, **common)
def evaluate_task(
    adapter_dir: Path, model_dir: Path, prepared_dir: Path, tokenized_dir: Path,
    quant: QuantConfig, tokenize: TokenizeConfig, cfg: EvalConfig, root: Path,
) -> Path:  # fmt: skip
    return evaluate_adapter(adapter_dir, model_dir, prepared_dir, tokenized_dir, quant, tokenize, cfg, root)


@task(name=MERGE, cache_policy=StageCache(stage=MERGE, key_fn=merge_key), retries=1, retry_delay_seconds=10, **common)
def merge_task(adapter_dir: Path, model_dir: Path, prepared_dir: Path, tokenize: TokenizeConfig, cfg: MergeConfig, root: Path) -> Path:
    return merge_adapter(adapter_dir, model_dir, prepared_dir, tokenize, cfg, root)
