"""The QLoRA recipe, top to bottom: load the 4-bit base and attach LoRA, map the config to TRL's
`SFTConfig`, build the trainer with a callback that watches every step, summarize what happened.

The libraries do the work: bitsandbytes NF4 weights (modeling.load_base), peft's
`prepare_model_for_kbit_training` and LoRA, TRL's `SFTTrainer`. Resuming, out-of-memory retries and
the output folder are the train stage's business (finetune/stages/train.py), not the recipe's.

This module imports torch, transformers, peft and trl at the top: import it where training starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from datasets import Dataset
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import PrinterCallback, TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from finetune.core.config import LoraConfig, QuantConfig, TrainConfig
from finetune.core.errors import InternalError, PermanentError
from finetune.core.preflight import LIGER_MISSING, recomputes_activations, resolved_train
from finetune.training import graphs, varlen
from finetune.training.checkpoints import seal_checkpoint
from finetune.training.loss import LogitsLossSFTTrainer
from finetune.training.modeling import DequantizedLinear, compile_decoder_layers, compiled_layer_count, dequantize_frozen_base, load_base

# Later transformers 5 releases renamed gradient_checkpointing to activation_checkpointing.
_SFT_FIELDS = {f.name for f in dataclasses.fields(SFTConfig)}
CHECKPOINTING_ARG = "activation_checkpointing" if "activation_checkpointing" in _SFT_FIELDS else "gradient_checkpointing"


# A packed row under `sdpa` attends through a block-diagonal mask over its whole length, so its cost grows
# with the square of the row: above this many tokens, one example per micro-batch is cheaper.
PACK_MAX_TOKENS = 2048
# Above this many tokens per micro-batch the GPU's arithmetic, not kernel launches, bounds the step: no graph.
GRAPH_MAX_TOKENS = 4096


@dataclass(frozen=True)
class StepPlan:
    """How one optimizer step is computed: micro-batches of `batch_size` examples, `grad_accum` of them,
    laid out as `padded` rows, one `packed` row (attention through a block-diagonal mask), one `varlen` row
    (packed, attention through the variable-length kernel), or `graphed` (padded to `static_length`, CUDA
    graph)."""

    batch_size: int
    grad_accum: int
    layout: Literal["padded", "packed", "varlen", "graphed"]
    static_length: int | None = None


def step_shape(train: TrainConfig) -> tuple[int, int]:
    """(examples per micro-batch, micro-batches per optimizer step) that the recipe starts from."""
    if train.recipe == "fast":
        return train.batch_size * train.grad_accum, 1
    return train.batch_size, train.grad_accum


def plan_step(
    train: TrainConfig, batch_size: int, grad_accum: int, lengths: list[int], cuda: bool, varlen: bool = False
) -> StepPlan:
    """The step for `train` on examples of `lengths` tokens, starting from `batch_size` x `grad_accum`
    (the recipe's shape, or a smaller micro-batch after an out-of-memory retry).

    Every plan puts the same examples in each optimizer step and averages the loss over the same tokens;
    only the work differs. The seed recipe pads its micro-batches as the seed did. The fast recipe:
    - short examples on CUDA with `train.cuda_graphs`, one micro-batch per step and no checkpointing: padded
      to a static shape and replayed from a CUDA graph (finetune/training/graphs.py);
    - with the variable-length attention kernel (`varlen`, finetune/training/varlen.py): packed rows of at
      most `train.max_row_tokens` and `batch_size` examples, as few as divide the step's examples evenly
      (fewer, longer rows are faster: each costs a dequantization of every 4-bit weight forward and backward
      and its kernel launches; activation memory grows with the row);
    - without it, examples too long to pack (the `batch_size` longest exceed PACK_MAX_TOKENS together):
      padded micro-batches of at most PACK_MAX_TOKENS, accumulated; long examples go one by one, unpadded;
    - otherwise one packed row per micro-batch.
    """
    if train.recipe == "seed":
        return StepPlan(batch_size, grad_accum, "padded")
    packs = sum(sorted(lengths)[-batch_size:]) <= PACK_MAX_TOKENS
    if packs:
        length = graphs.static_length(lengths)
        # Checkpointing is left eager: measured on an H200 (7B shape), the graph kept nearly the memory of no
        # recomputation (7.9 GiB against 8.4 without, 5.3 eager), so the low-memory mode would not be one.
        graph_fits = batch_size * length <= GRAPH_MAX_TOKENS and not recomputes_activations(train)
        if cuda and train.cuda_graphs and grad_accum == 1 and graph_fits:
            return StepPlan(batch_size, 1, "graphed", length)
    if varlen:
        examples, longest = batch_size * grad_accum, sorted(lengths, reverse=True)
        rows = max((d for d in range(1, batch_size + 1) if examples % d == 0 and sum(longest[:d]) <= train.max_row_tokens), default=1)
        return StepPlan(rows, examples // rows, "varlen")
    if not packs:
        # Padded rows instead, as many per micro-batch as keep it within PACK_MAX_TOKENS (one, for long
        # examples), dividing the step's examples evenly so that every step still has all of them.
        examples, longest = batch_size * grad_accum, max(lengths)
        rows = max((d for d in range(1, batch_size + 1) if examples % d == 0 and d * longest <= PACK_MAX_TOKENS), default=1)
        return StepPlan(rows, examples // rows, "padded")
    return StepPlan(batch_size, grad_accum, "packed")


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
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recomputes_activations(train))
        if train.dequantized_base and torch.cuda.is_available():  # after the fp32 cast of the rest, as for 4-bit
            dequantize_frozen_base(model)
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


def sft_config(train: TrainConfig, output_dir: Path, plan: StepPlan, compute_dtype: torch.dtype, use_cpu: bool) -> SFTConfig:
    """TRL's arguments for `train`, with the micro-batch and its layout from `plan`."""
    args = SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=plan.batch_size,
        gradient_accumulation_steps=plan.grad_accum,
        num_train_epochs=train.epochs,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float in [0, 1) is a share of the total steps
        max_grad_norm=train.max_grad_norm,
        weight_decay=train.weight_decay,
        optim=train.optim,
        **{CHECKPOINTING_ARG: recomputes_activations(train)},
        # packed: the micro-batch's sequences laid end to end in one row, with position_ids restarting at each;
        # transformers' attention masks keep every sequence to itself, TRL masks the label at each start.
        padding_free=plan.layout in ("packed", "varlen"),
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
        max_length=None,  # tokenize already enforced tokenize.max_length
        **data_loading(train, use_cpu),
        **fused_kernels(train, use_cpu),
    )
    # One process trains on one GPU (several are train.num_gpus' ranks, each a process). With more GPUs
    # visible and no launcher, the Trainer would wrap the model in nn.DataParallel, which TRL refuses;
    # the Trainer pins its GPU count to 1 in the same way for a model that device_map placed itself.
    # `_n_gpu` is the private field behind the public `n_gpu` (tests/test_borrowed.py guards it).
    if args.n_gpu > 1:
        args._n_gpu = 1
        if args.n_gpu != 1:
            raise InternalError(
                f"transformers {transformers.__version__} no longer reads TrainingArguments._n_gpu, which one-process "
                "training on a machine with several GPUs sets; set train.num_gpus to the GPU count meanwhile"
            )
    return args


# Collating processes of the fast recipe on a CUDA GPU (train.data_workers: auto), each this many batches ahead.
DATA_WORKERS = 2
PREFETCH_BATCHES = 4


def data_loading(train: TrainConfig, use_cpu: bool) -> dict:
    """The Trainer's data loading for `train`. With workers, the next micro-batches are collated in other processes
    while the GPU computes this one; on a CUDA GPU they come in pinned memory and are copied to it without the host
    waiting. Otherwise the training process collates each micro-batch when the step asks for it, as the seed did."""
    cuda = not use_cpu and torch.cuda.is_available()
    workers = train.data_workers
    if workers == "auto":
        workers = DATA_WORKERS if cuda and train.recipe == "fast" else 0
    args: dict = {"dataloader_num_workers": workers, "dataloader_pin_memory": cuda}
    if workers:  # kept across epochs: a new process per epoch would start cold
        args |= {"dataloader_persistent_workers": True, "dataloader_prefetch_factor": PREFETCH_BATCHES}
    if cuda:
        args["accelerator_config"] = {"non_blocking": True}
    return args


# Liger's fused linear cross-entropy is left out: TRL's SFTTrainer computes the loss through its own chunked LM head.
LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": False}


def fused_kernels(train: TrainConfig, use_cpu: bool) -> dict:
    """The Trainer's arguments for `train.fused_kernels` (Liger's Triton kernels: CUDA only)."""
    if not train.fused_kernels or use_cpu or not torch.cuda.is_available():
        return {}
    if importlib.util.find_spec("liger_kernel") is None:
        raise PermanentError(LIGER_MISSING)  # also checked before any stage (check_hardware)
    return {"use_liger_kernel": True, "liger_kernel_config": dict(LIGER_KERNELS)}


@contextmanager
def model_module_restored(model):
    """Liger patches the modeling module of the model's architecture (its RMSNorm and MLP classes, its rotary
    function) for every model built after, as well as the model itself: on exit the module is put back, so that
    later stages in this process (evaluation, merging, on the CPU too) run transformers' own code."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = sys.modules[type(base).__module__]
    saved = dict(vars(module))
    try:
        yield
    finally:
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)


def kernel_counts(model) -> dict[str, int]:
    """What the run's speed levers changed in `model`: Liger's fused modules, the base's dequantized layers, the
    compiled decoder layers."""
    return {
        "fused_modules": fused_module_count(model),
        "dequantized_layers": sum(isinstance(m, DequantizedLinear) for m in model.modules()),
        "compiled_layers": compiled_layer_count(model),
    }


def fused_module_count(model) -> int:
    """How many of the model's modules run a Liger kernel in place of transformers' code."""
    return sum(
        module._get_name().startswith("Liger") or getattr(module.__dict__.get("forward"), "__qualname__", "").startswith("Liger")
        for module in model.modules()
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


def build_trainer(
    model, tokenizer, dataset: Dataset, args: SFTConfig, watch: StepWatch, plan: StepPlan, logger: logging.Logger,
    train: TrainConfig,
) -> SFTTrainer:
    """TRL's trainer for `plan`: the graphed trainer, or SFTTrainer (packed rows through the variable-length kernel
    for `varlen`); with train.compiled_layers on CUDA, the decoder layers of an eager step compiled."""
    common = dict(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[watch])
    if plan.layout == "graphed":
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        trainer = graphs.GraphedSFTTrainer(
            **common, static_shape=(plan.batch_size, plan.static_length), pad_token_id=pad, logger=logger
        )
    else:
        if plan.layout == "varlen":
            varlen.use_varlen_attention(model)
        # TRL's fused LM head runs Triton kernels on a CUDA GPU; without them (the CPU) its torch fallback takes about
        # twice as long as the loss from the logits.
        triton_head = not args.use_cpu and torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
        trainer = SFTTrainer(**common) if triton_head else LogitsLossSFTTrainer(**common)
    if resolved_train(train).compiled_layers and plan.layout != "graphed" and torch.cuda.is_available():
        count = compile_decoder_layers(model, train.activation_memory_budget)
        logger.info("train: %d decoder layers compiled (activation memory budget %g); compiling takes the first steps", count, train.activation_memory_budget)
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
    """Steps, losses, parameters, throughput and data workers of a finished `trainer.train()`."""
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
        "data_workers": trainer.args.dataloader_num_workers,
    }
