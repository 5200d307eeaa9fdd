"""Stage `train`: QLoRA on the tokenized data -> a LoRA adapter, its loss per step and a summary.

The recipe itself (4-bit base, LoRA, TRL's SFTTrainer) is finetune/training/recipe.py; this module wraps it
with what makes a long training safe to run unattended.

Faults: checkpoints live beside the output under the same key (`<key>.checkpoints/`), sealed after
each save, so a Prefect retry or a new run with the same inputs resumes from the newest whole one
(the Trainer restores optimizer, scheduler, RNG and data order). A CUDA out-of-memory error leaves a
note there that halves the micro-batch and doubles accumulation (same effective batch) for the retry.
A NaN or infinite loss stops training at once.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from finetune.core.config import LoraConfig, QuantConfig, TrainConfig
from finetune.core.errors import PermanentError
from finetune.core.outputs import output_dir_for, write_text_atomic
from finetune.core.preflight import resolved_train
from finetune.core.stage import Hooks, Stage
from finetune.stages.tokenize import load_tokenizer, set_chat_template
from finetune.training.checkpoints import newest_intact_checkpoint

STAGE = "train"
MICRO_BATCH_NOTE = "micro_batch.json"  # in the checkpoints folder: the micro-batch after an OOM


@dataclass(frozen=True, kw_only=True)
class TrainInputs:
    tokenized_dir: Path  # output of tokenize
    model_dir: Path  # output of quantize_base (the 4-bit base), or of resolve_model without quant.load_in_4bit
    quant: QuantConfig
    lora: LoraConfig
    train: TrainConfig

    def __post_init__(self):
        # The key names what the run does: compiled_layers: auto is decided here, for this machine.
        object.__setattr__(self, "train", resolved_train(self.train))


class TrainingOutOfMemory(RuntimeError):
    """Out of GPU memory; the retry uses the smaller micro-batch noted in the checkpoints folder."""


class OutOfMemoryAtSmallestBatch(PermanentError, RuntimeError):
    """Out of GPU memory with a micro-batch of 1: no retry can help."""


class GpuCountError(PermanentError, ValueError):
    """train.num_gpus cannot be met on this machine, or the step does not divide among the GPUs."""


def ranks_for(train: TrainConfig) -> int:
    """How many data-parallel ranks train.num_gpus asks for here (1: train in this process)."""
    import torch

    available = torch.cuda.device_count()
    wanted = max(available, 1) if train.num_gpus == "auto" else train.num_gpus
    if wanted > max(available, 1):
        raise GpuCountError(f"train.num_gpus={train.num_gpus} but this machine has {available} CUDA GPU(s); set it to at most that, or auto")
    return wanted


def split_step(batch_size: int, grad_accum: int, ranks: int) -> tuple[int, int]:
    """(batch_size, grad_accum) of each of `ranks` ranks, so that one optimizer step still has
    batch_size x grad_accum examples in all (the ranks' gradients are averaged)."""
    if batch_size % ranks == 0:
        return batch_size // ranks, grad_accum
    if grad_accum % ranks == 0:
        return batch_size, grad_accum // ranks
    raise GpuCountError(
        f"train.num_gpus: {batch_size * grad_accum} examples per step (train.batch_size x train.grad_accum) do not "
        f"divide among {ranks} GPUs; change either so that they do, or set train.num_gpus to a divisor"
    )


def checkpoints_dir(root: Path, key: str) -> Path:
    """`<root>/train/<key>.checkpoints/`: beside the output, so a retry or a rerun finds them."""
    return output_dir_for(root, STAGE, key).with_name(f"{key}.checkpoints")


def micro_batch(work_dir: Path, train: TrainConfig) -> tuple[int, int, list[dict]]:
    """(batch_size, grad_accum, adjustments): the recipe's step shape, unless an OOM note halved the micro-batch."""
    from finetune.training.recipe import step_shape

    try:
        note = json.loads((work_dir / MICRO_BATCH_NOTE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return *step_shape(train), []
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


def _fit(trainer, resume_from: Path | None, train: TrainConfig) -> float | None:
    """Seconds that `trainer.train()` took, resumed from `resume_from`; None when out of memory."""
    import torch

    from finetune.training.graphs import attention_kernels

    reset_peak_memory()
    started = time.monotonic()
    try:
        with attention_kernels() if train.recipe == "fast" else contextlib.nullcontext():
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.OutOfMemoryError:
        return None
    return time.monotonic() - started


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _train(inputs: TrainInputs, key: str, out: Path, hooks: Hooks) -> dict:
    """The stage: train here, or as data-parallel ranks when train.num_gpus asks for several GPUs."""
    if "WORLD_SIZE" not in os.environ and (ranks := ranks_for(inputs.train)) > 1:
        from finetune.training.distributed import train_on_ranks

        return train_on_ranks(inputs, key, out, hooks, ranks, checkpoints_dir(out.parent.parent, key))
    return train_here(inputs, key, out, hooks)


def _save_adapter(trainer, tokenizer, tokenized_dir: Path, out: Path) -> None:
    """adapter/ with the tokenizer and its chat template (tools prompt base+adapter the way it was
    trained), and log_history.json."""
    from finetune.training.recipe import loss_history

    trainer.model.save_pretrained(out / "adapter")
    template = json.loads((Path(tokenized_dir) / "format.json").read_text(encoding="utf-8"))["template"]
    set_chat_template(tokenizer, template)
    tokenizer.save_pretrained(out / "adapter")
    (out / "log_history.json").write_text(json.dumps(loss_history(trainer), indent=2), encoding="utf-8")


def _plan(train: TrainConfig, dataset, batch_size: int, grad_accum: int, one_process: bool, compute_dtype):
    """recipe.plan_step for this process's share of a step. CUDA graphs in one process only: DDP's hooks
    around the forward and backward are not captured."""
    from finetune.training import recipe, varlen
    from finetune.training.modeling import device_name

    lengths = [len(ids) for ids in dataset["input_ids"]]
    cuda = device_name() == "cuda"
    return recipe.plan_step(train, batch_size, grad_accum, lengths, cuda=cuda and one_process, varlen=cuda and train.varlen_attention and varlen.available(compute_dtype))


def train_here(inputs: TrainInputs, key: str, out: Path, hooks: Hooks) -> dict:
    """Train a LoRA adapter on the frozen (4-bit) base in this process (or as one rank of several: then
    rank 0 writes); write adapter/, log_history.json, summary.json."""
    from finetune.training import recipe  # torch, transformers, peft, trl
    from finetune.training.modeling import device_name, pick_compute_dtype

    started = time.monotonic()
    ranks = int(os.environ.get("WORLD_SIZE", "1"))  # above 1: this process is one of them (finetune/stages/train_rank.py)
    work_dir = checkpoints_dir(out.parent.parent, key)  # out is <root>/train/.<key>.*.tmp
    step_batch, step_accum, adjustments = micro_batch(work_dir, inputs.train)
    if adjustments:
        hooks.logger.warning("micro-batch %d x accumulation %d after an out-of-memory error", step_batch, step_accum)
    compute_dtype = pick_compute_dtype(inputs.quant.compute_dtype)
    tokenizer = load_tokenizer(Path(inputs.model_dir))
    dataset = recipe.load_examples(inputs.tokenized_dir)
    plan = _plan(inputs.train, dataset, *split_step(step_batch, step_accum, ranks), one_process=ranks == 1, compute_dtype=compute_dtype)
    hooks.logger.info("step: %d x %d examples, %s", plan.batch_size, plan.grad_accum, plan.layout)
    model, base_bytes = recipe.load_model_with_lora(inputs.model_dir, inputs.quant, inputs.lora, inputs.train)
    args = recipe.sft_config(inputs.train, work_dir, plan, compute_dtype, device_name() == "cpu")

    def on_step(step: int, max_steps: int, logs: dict) -> None:
        hooks.logger.info(log_line(step, max_steps, logs))
        hooks.progress(step / max_steps)

    trainer = recipe.build_trainer(model, tokenizer, dataset, args, recipe.StepWatch(on_step), plan, hooks.logger, inputs.train)
    if (resume_from := newest_intact_checkpoint(work_dir, hooks.logger)) is not None:
        hooks.logger.info("resuming from %s", resume_from.name)
    trained_from = time.time()
    with recipe.model_module_restored(model):
        train_seconds = _fit(trainer, resume_from, inputs.train)
    if train_seconds is None:  # out of memory: free it before raising, the retry runs in this process
        step = trainer.state.global_step
        del trainer, model
        _free_memory()
        shape = (plan.batch_size, plan.grad_accum) if ranks == 1 else (step_batch, step_accum)  # the whole step's
        raise TrainingOutOfMemory(f"train: out of memory at step {step}; the retry uses {note_out_of_memory(work_dir, *shape, adjustments, step)}")
    if not trainer.is_world_process_zero():
        return {}  # rank 0 writes the output
    _save_adapter(trainer, tokenizer, inputs.tokenized_dir, out)
    resumed_step = int(resume_from.name.removeprefix("checkpoint-")) if resume_from else 0
    peak, peak_kind = peak_memory_bytes()
    summary = {
        **recipe.summarize(trainer, dataset, inputs.train, resumed_step, train_seconds),
        "micro_batch": [plan.batch_size, plan.grad_accum],
        "ranks": ranks,
        "step_layout": "padded" if getattr(trainer, "graph_failed", False) else plan.layout,
        **recipe.kernel_counts(model),
        "micro_batch_adjustments": adjustments,
        "base_memory_bytes_loaded": int(base_bytes),
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": peak_kind,
        "stage_seconds": round(time.monotonic() - started, 1),
        "trained_from": round(trained_from, 3),  # unix time: when this process trained, for schedules and audits
        "trained_until": round(time.time(), 3),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "load_in_4bit": inputs.quant.load_in_4bit,
        "device": device_name(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return {"train_steps": summary["train_steps"], "final_train_loss": summary["final_train_loss"]}


train_adapter = Stage(
    STAGE, TrainInputs, _train, __name__, reached_through=("bitsandbytes", "accelerate")
)  # 4-bit layers and the Trainer's loop
