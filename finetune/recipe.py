"""The QLoRA recipe, top to bottom: load the 4-bit base and attach LoRA, map the config to TRL's
`SFTConfig`, build the trainer with a callback that watches every step, summarize what happened.

The libraries do the work: bitsandbytes NF4 weights (modeling.load_base), peft's
`prepare_model_for_kbit_training` and LoRA, TRL's `SFTTrainer`. Resuming, out-of-memory retries and
the output folder are the train stage's business (finetune/train.py), not the recipe's.

This module imports torch, transformers, peft and trl at the top: import it where training starts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import PrinterCallback, TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from finetune.checkpoints import seal_checkpoint
from finetune.config import LoraConfig, QuantConfig, TrainConfig
from finetune.errors import PermanentError
from finetune.modeling import load_base

# Later transformers 5 releases renamed gradient_checkpointing to activation_checkpointing.
_SFT_FIELDS = {f.name for f in dataclasses.fields(SFTConfig)}
CHECKPOINTING_ARG = "activation_checkpointing" if "activation_checkpointing" in _SFT_FIELDS else "gradient_checkpointing"


class NonFiniteLossError(PermanentError, RuntimeError):
    """The loss became NaN or infinite; retrying the same run would do the same."""


def load_examples(tokenized_dir: Path) -> Dataset:
    """The tokenized training split: input_ids and labels (prompt tokens already masked)."""
    return Dataset.from_parquet(str(Path(tokenized_dir) / "train.parquet")).select_columns(["input_ids", "labels"])


def load_model_with_lora(model_dir: Path, quant: QuantConfig, lora: LoraConfig, train: TrainConfig):
    """(model, bytes of the base as loaded): the frozen base, 4-bit unless `quant.load_in_4bit` is off,
    with freshly initialized LoRA adapters on `lora.target_modules`."""
    model = load_base(Path(model_dir), quant)
    base_bytes = model.get_memory_footprint()
    if quant.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.checkpointing)
    set_seed(train.seed)  # the adapter's random init happens here, before the Trainer seeds anything
    adapters = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, adapters), base_bytes


def sft_config(
    train: TrainConfig, output_dir: Path, batch_size: int, grad_accum: int, compute_dtype: torch.dtype, use_cpu: bool
) -> SFTConfig:
    """TRL's arguments for `train` (micro-batch given apart: an out-of-memory retry halves it)."""
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=train.epochs,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float in [0, 1) is a share of the total steps
        max_grad_norm=train.max_grad_norm,
        weight_decay=train.weight_decay,
        optim=train.optim,
        **{CHECKPOINTING_ARG: train.checkpointing},
        # fast: the micro-batch's sequences laid end to end in one row, with position_ids restarting at each;
        # transformers' attention masks keep every sequence to itself, TRL masks the label at each start.
        padding_free=train.recipe == "fast",
        bf16=compute_dtype == torch.bfloat16,
        fp16=compute_dtype == torch.float16,
        use_cpu=use_cpu,
        logging_steps=1,
        logging_nan_inf_filter=False,  # the Trainer's default hides a NaN loss; StepWatch must see it
        save_strategy="steps",
        save_steps=train.save_every_steps,
        save_total_limit=train.save_total_limit,
        seed=train.seed,
        data_seed=train.seed,
        report_to=list(train.report_to) or "none",
        disable_tqdm=True,  # progress goes to the log instead, one line per step
        dataloader_num_workers=0,
        max_length=None,  # tokenize already enforced tokenize.max_length
    )


class StepWatch(TrainerCallback):
    """After each optimizer step: stop on a non-finite loss, else report (step, max_steps, logs);
    after each checkpoint: seal it, so a resume can tell a whole checkpoint from a torn one."""

    def __init__(self, on_step: Callable[[int, int, dict], None]):
        self.on_step = on_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        if not math.isfinite(logs["loss"]):
            raise NonFiniteLossError(
                f"train: loss is {logs['loss']} at step {state.global_step}; lower train.learning_rate or "
                "check the data of that step (the run is not retried)"
            )
        self.on_step(state.global_step, state.max_steps, logs)

    def on_save(self, args, state, control, **kwargs):
        seal_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}")


def build_trainer(model, tokenizer, dataset: Dataset, args: SFTConfig, watch: StepWatch) -> SFTTrainer:
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[watch])
    trainer.remove_callback(PrinterCallback)  # StepWatch logs one line per step instead
    if args.fp16:
        # TRL keeps a quantized model's adapters in bf16, but fp16's loss scaler unscales fp32 or fp16 gradients
        # only: the adapters train in fp32 under fp16 autocast (the usual mixed precision), which GPUs without
        # bf16 can run.
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return trainer


def loss_history(trainer: SFTTrainer) -> list[dict]:
    """One entry per optimizer step: step, loss, grad_norm, learning_rate, epoch."""
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def summarize(trainer: SFTTrainer, dataset: Dataset, train: TrainConfig, resumed_step: int, train_seconds: float) -> dict:
    """Steps, losses, parameters and throughput of a finished `trainer.train()`."""
    state = trainer.state
    history = loss_history(trainer)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    # Tokens this session trained on (TRL's num_tokens counter restarts on resume, so count them here).
    epoch_tokens = sum(len(ids) for ids in dataset["input_ids"])
    tokens = epoch_tokens * train.epochs * (state.global_step - resumed_step) / max(state.max_steps, 1)
    micro_batches = math.ceil(len(dataset) / trainer.args.per_device_train_batch_size)
    return {
        "train_steps": state.global_step,
        "steps_per_epoch": math.ceil(micro_batches / trainer.args.gradient_accumulation_steps),
        "resumed_from_step": resumed_step,
        "final_train_loss": history[-1]["loss"] if history else None,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "base_memory_bytes_16bit": int(total - trainable) * 2,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(tokens / train_seconds, 1) if train_seconds > 0 else None,
    }
