"""Stage `train`: QLoRA on the tokenized data -> a LoRA adapter, its loss per step and a summary.

The recipe is configuration of the libraries, not code: bitsandbytes NF4 base (modeling.load_base),
peft `prepare_model_for_kbit_training` + LoRA, TRL `SFTTrainer`. Checkpoints live beside the output
under the same key (`<key>.checkpoints/`), so a retry or a new run with the same inputs resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

from finetune.config import LoraConfig, QuantConfig, TrainConfig
from finetune.outputs import build_output, output_dir_for, stage_key

STAGE = "train"
MODULES = [__name__, "finetune.modeling"]

# (step, max_steps, logs) after each logged optimizer step; the Prefect task turns it into logs and progress.
Progress = Callable[[int, int, dict], None]


def train_key(tokenized_dir: Path, model_dir: Path, quant: QuantConfig, lora: LoraConfig, train: TrainConfig) -> str:
    return stage_key(STAGE, MODULES, [quant, lora, train], [Path(tokenized_dir), Path(model_dir)])


def checkpoints_dir(root: Path, key: str) -> Path:
    return output_dir_for(root, STAGE, key).with_name(f"{key}.checkpoints")


def latest_checkpoint(directory: Path) -> Path | None:
    """Newest `checkpoint-N` that the Trainer finished writing (its trainer_state.json is written last)."""
    done = [p for p in directory.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


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
) -> Path:
    """Train a LoRA adapter on the frozen (4-bit) base; write adapter/, log_history.json, summary.json."""
    key = train_key(tokenized_dir, model_dir, quant, lora, train)
    work_dir = checkpoints_dir(root, key)

    def build(out: Path) -> dict:
        import torch
        from datasets import Dataset
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
        from trl import SFTConfig, SFTTrainer

        from finetune.modeling import device_name, load_base, pick_compute_dtype

        # Later transformers 5 releases renamed gradient_checkpointing to activation_checkpointing.
        fields = {f.name for f in dataclasses.fields(SFTConfig)}
        checkpointing_arg = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        started = time.monotonic()
        compute_dtype = pick_compute_dtype(quant.compute_dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        dataset = Dataset.from_parquet(str(Path(tokenized_dir) / "train.parquet")).select_columns(["input_ids", "labels"])

        model = load_base(Path(model_dir), quant)
        base_bytes_loaded = model.get_memory_footprint()
        if quant.load_in_4bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing)
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

        steps_per_epoch = math.ceil(math.ceil(len(dataset) / train.batch_size) / train.grad_accum)
        args = SFTConfig(
            output_dir=str(work_dir),
            per_device_train_batch_size=train.batch_size,
            gradient_accumulation_steps=train.grad_accum,
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

        class ReportProgress(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    line = log_line(state.global_step, state.max_steps, logs)
                    if progress is not None:
                        progress(state.global_step, state.max_steps, logs)
                    else:
                        print(line, file=sys.stderr, flush=True)

        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[ReportProgress()]
        )
        trainer.remove_callback(PrinterCallback)  # ReportProgress prints one line per step instead
        resume_from = latest_checkpoint(work_dir) if work_dir.is_dir() else None
        reset_peak_memory()
        train_started = time.monotonic()
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        train_seconds = time.monotonic() - train_started

        trainer.model.save_pretrained(out / "adapter")
        tokenizer.save_pretrained(out / "adapter")
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        (out / "log_history.json").write_text(json.dumps(history, indent=2), encoding="utf-8")
        peak, peak_kind = peak_memory_bytes()
        tokens = history[-1].get("num_tokens", 0) if history else 0  # cumulative tokens the trainer saw
        summary = {
            "train_steps": trainer.state.global_step,
            "steps_per_epoch": steps_per_epoch,
            "resumed_from_step": int(resume_from.name.split("-")[1]) if resume_from else 0,
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
