"""Stage `train`: QLoRA on the tokenized data -> a LoRA adapter, its loss per step and a summary.

The recipe is configuration of the libraries, not code: bitsandbytes NF4 base (modeling.load_base),
peft `prepare_model_for_kbit_training` + LoRA, TRL `SFTTrainer`.

Faults: checkpoints live beside the output under the same key (`<key>.checkpoints/`), sealed after
each save, so a Prefect retry or a new run with the same inputs resumes from the newest whole one
(the Trainer restores optimizer, scheduler, RNG and data order). A CUDA out-of-memory error leaves a
note there that halves the micro-batch and doubles accumulation (same effective batch) for the retry.
A NaN or infinite loss stops training at once.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import resource
import time
from collections.abc import Callable
from pathlib import Path

from finetune.checkpoints import newest_intact_checkpoint, seal_checkpoint
from finetune.config import LoraConfig, QuantConfig, TrainConfig
from finetune.outputs import build_output, output_dir_for, stage_key, write_text_atomic

STAGE = "train"
MODULES = [__name__, "finetune.modeling", "finetune.checkpoints"]
MICRO_BATCH_NOTE = "micro_batch.json"  # in the checkpoints folder: the micro-batch after an OOM


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; retrying the same run would do the same."""


class TrainingOutOfMemory(RuntimeError):
    """Out of GPU memory; the retry uses the smaller micro-batch noted in the checkpoints folder."""


class OutOfMemoryAtSmallestBatch(RuntimeError):
    """Out of GPU memory with a micro-batch of 1: no retry can help."""

# (step, max_steps, logs) after each logged optimizer step; the Prefect task turns it into logs and progress.
Progress = Callable[[int, int, dict], None]


def train_key(tokenized_dir: Path, model_dir: Path, quant: QuantConfig, lora: LoraConfig, train: TrainConfig) -> str:
    return stage_key(STAGE, MODULES, [quant, lora, train], [Path(tokenized_dir), Path(model_dir)])


def checkpoints_dir(root: Path, key: str) -> Path:
    return output_dir_for(root, STAGE, key).with_name(f"{key}.checkpoints")


def micro_batch(work_dir: Path, train: TrainConfig) -> tuple[int, int, list[dict]]:
    """(batch_size, grad_accum, adjustments): the config's, unless an OOM note halved the micro-batch."""
    try:
        note = json.loads((work_dir / MICRO_BATCH_NOTE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return train.batch_size, train.grad_accum, []
    return note["batch_size"], note["grad_accum"], note["adjustments"]


def note_out_of_memory(work_dir: Path, batch_size: int, grad_accum: int, adjustments: list[dict], step: int) -> str:
    """Halve the micro-batch for the next attempt, keeping batch_size x grad_accum; return what changed."""
    if batch_size == 1:
        raise OutOfMemoryAtSmallestBatch(
            "train: out of GPU memory with micro-batch 1; lower tokenize.max_length, keep "
            "train.gradient_checkpointing=true, or use a GPU with more memory"
        )
    smaller = batch_size // 2
    longer = math.ceil(batch_size * grad_accum / smaller)  # same effective batch (exactly, for even sizes)
    change = {"at_step": step, "from": [batch_size, grad_accum], "to": [smaller, longer]}
    work_dir.mkdir(parents=True, exist_ok=True)
    note = {"batch_size": smaller, "grad_accum": longer, "adjustments": [*adjustments, change]}
    write_text_atomic(work_dir / MICRO_BATCH_NOTE, json.dumps(note, indent=2))
    return f"micro-batch {batch_size} x accumulation {grad_accum} -> {smaller} x {longer}"


def reset_peak_memory() -> None:
    """Start peak-memory accounting at training: earlier stages in the same process do not count."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: writing 5 to clear_refs resets the process's peak resident set (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_bytes() -> tuple[int, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    try:
        status = Path("/proc/self/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        return kib * 1024, "process_peak_rss"
    except (OSError, StopIteration):
        # ru_maxrss is in KiB on Linux and cannot be reset: the peak since the process started.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss_since_start"


def log_line(step: int, max_steps: int, logs: dict) -> str:
    parts = [f"step {step}/{max_steps}"]
    for name in ("loss", "grad_norm", "learning_rate"):
        if name in logs:
            parts.append(f"{name} {logs[name]:.4g}")
    return "  ".join(parts)


def train_adapter(
    tokenized_dir: Path,
    model_dir: Path,
    quant: QuantConfig,
    lora: LoraConfig,
    train: TrainConfig,
    root: Path,
    progress: Progress | None = None,
    logger: logging.Logger | None = None,
) -> Path:
    """Train a LoRA adapter on the frozen (4-bit) base; write adapter/, log_history.json, summary.json."""
    key = train_key(tokenized_dir, model_dir, quant, lora, train)
    work_dir = checkpoints_dir(root, key)
    logger = logger or logging.getLogger(__name__)

    def build(out: Path) -> dict:
        import torch
        from datasets import Dataset
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model, prepare_model_for_kbit_training
        from transformers import PrinterCallback, TrainerCallback, set_seed
        from trl import SFTConfig, SFTTrainer

        from finetune.modeling import device_name, load_base, pick_compute_dtype
        from finetune.tokenization import load_tokenizer

        started = time.monotonic()
        compute_dtype = pick_compute_dtype(quant.compute_dtype)
        batch_size, grad_accum, adjustments = micro_batch(work_dir, train)
        if adjustments:
            logger.warning("micro-batch %d x accumulation %d after an out-of-memory error", batch_size, grad_accum)
        tokenizer = load_tokenizer(Path(model_dir))
        dataset = Dataset.from_parquet(str(Path(tokenized_dir) / "train.parquet")).select_columns(["input_ids", "labels"])

        model = load_base(Path(model_dir), quant)
        base_bytes_loaded = model.get_memory_footprint()
        if quant.load_in_4bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing)
        set_seed(train.seed)  # the adapter's random init happens here, before the Trainer seeds anything
        model = get_peft_model(
            model,
            PeftLoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
                bias=lora.bias,
                task_type="CAUSAL_LM",
            ),
        )
        trainable, total = model.get_nb_trainable_parameters()

        # Later transformers 5 releases renamed gradient_checkpointing to activation_checkpointing.
        fields = {f.name for f in dataclasses.fields(SFTConfig)}
        checkpointing_arg = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        args = SFTConfig(
            output_dir=str(work_dir),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=grad_accum,
            num_train_epochs=train.epochs,
            learning_rate=train.learning_rate,
            lr_scheduler_type=train.lr_scheduler,
            warmup_steps=train.warmup_ratio,  # a float in [0, 1) is a share of the total steps
            max_grad_norm=train.max_grad_norm,
            weight_decay=train.weight_decay,
            optim=train.optim,
            **{checkpointing_arg: train.gradient_checkpointing},
            bf16=compute_dtype == torch.bfloat16,
            fp16=compute_dtype == torch.float16,
            use_cpu=device_name() == "cpu",
            logging_steps=1,
            logging_nan_inf_filter=False,  # the Trainer's default hides a NaN loss; Watch must see it
            save_strategy="steps",
            save_steps=train.save_every_steps,
            save_total_limit=train.save_total_limit,
            seed=train.seed,
            data_seed=train.seed,
            report_to="none",
            disable_tqdm=True,  # progress goes to the log instead, one line per step
            dataloader_num_workers=0,
            max_length=None,  # tokenize already enforced tokenize.max_length
        )

        class Watch(TrainerCallback):
            """One log line per step, a seal after each checkpoint, and a stop on a non-finite loss."""

            def on_log(self, args, state, control, logs=None, **kwargs):
                if not logs or "loss" not in logs:
                    return
                if not math.isfinite(logs["loss"]):
                    raise NonFiniteLossError(
                        f"train: loss is {logs['loss']} at step {state.global_step}; lower train.learning_rate or "
                        "check the data of that step (the run is not retried)"
                    )
                if progress is not None:
                    progress(state.global_step, state.max_steps, logs)
                else:
                    logger.info(log_line(state.global_step, state.max_steps, logs))

            def on_save(self, args, state, control, **kwargs):
                seal_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}")

        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Watch()])
        trainer.remove_callback(PrinterCallback)  # Watch logs one line per step instead
        resume_from = newest_intact_checkpoint(work_dir, logger)
        if resume_from is not None:
            logger.info("resuming from %s", resume_from.name)
        reset_peak_memory()
        train_started = time.monotonic()
        out_of_memory = False
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except torch.OutOfMemoryError:
            out_of_memory = True
        if out_of_memory:  # outside the except block, so the error's frames (and their tensors) are freed
            step = trainer.state.global_step
            del trainer, model
            gc.collect()
            torch.cuda.empty_cache()
            change = note_out_of_memory(work_dir, batch_size, grad_accum, adjustments, step)
            raise TrainingOutOfMemory(f"train: out of memory at step {step}; the retry uses {change}")
        train_seconds = time.monotonic() - train_started

        trainer.model.save_pretrained(out / "adapter")
        tokenizer.save_pretrained(out / "adapter")
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        (out / "log_history.json").write_text(json.dumps(history, indent=2), encoding="utf-8")
        peak, peak_kind = peak_memory_bytes()
        resumed_step = int(resume_from.name.removeprefix("checkpoint-")) if resume_from else 0
        # Tokens this session trained on (TRL's num_tokens counter restarts on resume, so count them here).
        epoch_tokens = sum(len(ids) for ids in dataset["input_ids"])
        done = (trainer.state.global_step - resumed_step) / max(trainer.state.max_steps, 1)
        tokens = epoch_tokens * train.epochs * done
        summary = {
            "train_steps": trainer.state.global_step,
            "steps_per_epoch": math.ceil(math.ceil(len(dataset) / batch_size) / grad_accum),
            "resumed_from_step": resumed_step,
            "micro_batch": [batch_size, grad_accum],
            "micro_batch_adjustments": adjustments,
            "final_train_loss": history[-1]["loss"] if history else None,
            "trainable_params": int(trainable),
            "total_params": int(total),
            "base_memory_bytes_loaded": int(base_bytes_loaded),
            "base_memory_bytes_16bit": int(total - trainable) * 2,
            "peak_memory_bytes": int(peak),
            "peak_memory_kind": peak_kind,
            "train_seconds": round(train_seconds, 1),
            "stage_seconds": round(time.monotonic() - started, 1),
            "tokens_per_second": round(tokens / train_seconds, 1) if train_seconds > 0 else None,
            "compute_dtype": str(compute_dtype).removeprefix("torch."),
            "load_in_4bit": quant.load_in_4bit,
            "device": device_name(),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        return {"train_steps": summary["train_steps"], "final_train_loss": summary["final_train_loss"]}

    return build_output(root, STAGE, key, build)
