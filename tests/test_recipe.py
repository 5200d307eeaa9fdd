"""The recipe: the config maps onto TRL's SFTConfig as the seed defines it, and experiment tracking."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.core.config import TrainConfig, load_config
from finetune.training.recipe import (
    CHECKPOINTING_ARG,
    PACK_MAX_TOKENS,
    StepPlan,
    plan_step,
    recomputes_activations,
    sft_config,
    step_shape,
)
from tests.conftest import ROOT


def test_the_seed_recipe_maps_onto_sft_config(tmp_path):
    train = load_config(ROOT / "configs" / "default.yaml", ["train.recipe=seed"]).train
    assert step_shape(train) == (1, 4) and recomputes_activations(train)

    plan = plan_step(train, *step_shape(train), lengths=[100] * 104, cuda=True)
    assert plan == StepPlan(1, 4, "padded")  # the seed's loop everywhere

    args = sft_config(train, tmp_path / "checkpoints", plan, compute_dtype=torch.bfloat16, use_cpu=True)

    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_train_epochs) == (1, 4, 3)
    assert (args.learning_rate, args.max_grad_norm, args.weight_decay) == (2e-4, 0.3, 0.0)
    assert str(args.lr_scheduler_type.value) == "constant_with_warmup" and args.warmup_steps == 0.03
    assert str(args.optim.value) == "adamw_torch"
    assert (args.bf16, args.fp16, args.use_cpu) == (True, False, True)
    assert getattr(args, CHECKPOINTING_ARG) is True
    assert (args.save_steps, args.save_total_limit, args.seed, args.data_seed) == (13, 3, 42, 42)
    assert args.output_dir == str(tmp_path / "checkpoints")
    assert args.logging_steps == 1 and args.logging_nan_inf_filter is False  # every step seen, NaN included
    assert args.max_length is None  # tokenize already enforced tokenize.max_length
    assert args.padding_free is False


def test_the_fast_recipe_takes_the_whole_step_at_once_and_low_memory_recomputes(tmp_path):
    train = load_config(ROOT / "configs" / "default.yaml").train
    assert train.recipe == "fast" and step_shape(train) == (4, 1) and not recomputes_activations(train)

    plan = plan_step(train, *step_shape(train), lengths=[75, 130, 101], cuda=False)
    args = sft_config(train, tmp_path, plan, compute_dtype=torch.bfloat16, use_cpu=True)

    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.padding_free) == (4, 1, True)
    assert getattr(args, CHECKPOINTING_ARG) is False
    # On the CPU the training process collates each micro-batch itself: workers would take its cores.
    assert (args.dataloader_num_workers, args.dataloader_pin_memory) == (0, False)
    low_memory = load_config(ROOT / "configs" / "default.yaml", ["train.gradient_checkpointing=true"]).train
    assert step_shape(low_memory) == (4, 1) and recomputes_activations(low_memory)


def test_the_fast_step_is_graphed_on_cuda_packed_elsewhere_and_one_by_one_when_long():
    train = load_config(ROOT / "configs" / "default.yaml").train
    short = [75, 130, 101, 90]

    assert plan_step(train, 4, 1, short, cuda=True) == StepPlan(4, 1, "graphed", static_length=136)
    assert plan_step(train, 4, 1, short, cuda=False) == StepPlan(4, 1, "packed")
    assert plan_step(train.model_copy(update={"cuda_graphs": False}), 4, 1, short, cuda=True).layout == "packed"
    assert plan_step(train, 2, 2, short, cuda=True) == StepPlan(2, 2, "packed")  # after an OOM halving: eager
    low_memory = train.model_copy(update={"gradient_checkpointing": True})
    assert plan_step(low_memory, 4, 1, short, cuda=True) == StepPlan(4, 1, "packed")
    # Examples that do not fit one packed row of PACK_MAX_TOKENS: padded micro-batches within it, the same 4 per step.
    long = [256, PACK_MAX_TOKENS // 2, PACK_MAX_TOKENS // 2, 300, 900]
    assert plan_step(train, 4, 1, long, cuda=True) == StepPlan(2, 2, "padded")
    assert plan_step(train, 4, 1, [*long, PACK_MAX_TOKENS], cuda=False) == StepPlan(1, 4, "padded")
    many_short = [PACK_MAX_TOKENS // 10] * 64  # 64 per step: 8 rows of 204 fit, 10 would not divide 64
    assert plan_step(train, 64, 1, many_short, cuda=False) == StepPlan(8, 8, "padded")


def test_with_the_variable_length_kernel_long_examples_are_packed_in_as_few_rows_as_fit():
    train = load_config(ROOT / "configs" / "default.yaml").train
    short = [75, 130, 101, 90]
    long = [256, 2048, 2048, 1500, 900]  # 4 per step would be padded one by one without the kernel

    assert plan_step(train, 4, 1, short, cuda=True, varlen=True) == StepPlan(4, 1, "graphed", static_length=136)  # short: the graph still
    assert plan_step(train.model_copy(update={"cuda_graphs": False}), 4, 1, short, cuda=True, varlen=True) == StepPlan(4, 1, "varlen")
    assert plan_step(train, 4, 1, long, cuda=True, varlen=True) == StepPlan(4, 1, "varlen")  # 6,496 tokens in one row
    assert plan_step(train, 2, 2, long, cuda=True, varlen=True) == StepPlan(2, 2, "varlen")  # after an OOM halving: 2 per row
    huge = [train.max_row_tokens // 3] * 8  # three fit a row, but 3 does not divide the 4 of a step: rows of 2
    assert plan_step(train, 4, 1, huge, cuda=True, varlen=True) == StepPlan(2, 2, "varlen")
    assert plan_step(train, 4, 1, [train.max_row_tokens + 1, *long], cuda=True, varlen=True) == StepPlan(1, 4, "varlen")
    small_gpu = train.model_copy(update={"max_row_tokens": 4096})
    assert plan_step(small_gpu, 4, 1, long, cuda=True, varlen=True) == StepPlan(2, 2, "varlen")  # 2,048 + 2,048
    seed = train.model_copy(update={"recipe": "seed"})
    assert plan_step(seed, 1, 4, long, cuda=True, varlen=True) == StepPlan(1, 4, "padded")  # the seed's own step


def test_micro_batch_and_dtype_come_from_the_caller_not_the_config(tmp_path):
    train = TrainConfig(batch_size=4, grad_accum=1, gradient_checkpointing=False, optim="adamw_torch_fused", recipe="seed")

    args = sft_config(train, tmp_path, StepPlan(2, 2, "padded"), compute_dtype=torch.float16, use_cpu=False)

    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 2)  # after an OOM halving
    assert (args.bf16, args.fp16) == (False, True)
    assert getattr(args, CHECKPOINTING_ARG) is False
    assert str(args.optim.value) == "adamw_torch_fused"


@pytest.mark.slow
def test_tensorboard_tracking_logs_every_step_and_leaves_the_train_key_alone(workspace, tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finetune.stages.train import checkpoints_dir, train_adapter
    from tests.conftest import tokenized_data, train_inputs, workspace_overrides

    overrides = [*workspace_overrides(workspace), f"model.base={tiny_model_dir}", "train.epochs=0.25"]
    config = load_config(ROOT / "configs" / "tiny.yaml", [*overrides, "train.report_to=[tensorboard]"])
    _, tokenized_dir = tokenized_data(config, tiny_model_dir, tmp_path)
    inputs = train_inputs(config, tokenized_dir, tiny_model_dir)
    untracked = train_inputs(load_config(ROOT / "configs" / "tiny.yaml", overrides), tokenized_dir, tiny_model_dir)
    assert train_adapter.key(inputs) == train_adapter.key(untracked)  # where it reports is not what it builds

    out = train_adapter(inputs, tmp_path)

    steps = [entry["step"] for entry in json.loads((out / "log_history.json").read_text())]
    (events,) = {path.parent for path in checkpoints_dir(tmp_path, out.name).glob("runs/*/events.out.tfevents.*")}
    logged = EventAccumulator(str(events)).Reload().Scalars("train/loss")
    assert [event.step for event in logged] == steps and len(steps) == 4


@pytest.mark.slow
def test_batches_collated_by_worker_processes_train_the_same_steps(workspace, tiny_model_dir, tmp_path):
    """train.data_workers: the next micro-batches are collated in other processes (2 by default for the fast
    recipe on a CUDA GPU, 0 on the CPU); the steps are the same batches in the same order, with the same losses."""
    from finetune.stages.train import train_adapter
    from tests.conftest import tokenized_data, train_inputs, workspace_overrides

    common = [*workspace_overrides(workspace), f"model.base={tiny_model_dir}", "train.epochs=0.25", "lora.dropout=0"]
    assert load_config(ROOT / "configs" / "tiny.yaml", common).train.data_workers == "auto"
    losses, keys = {}, set()
    for workers in (0, 1):
        config = load_config(ROOT / "configs" / "tiny.yaml", [*common, f"train.data_workers={workers}"])
        args = sft_config(config.train, tmp_path, StepPlan(4, 1, "packed"), compute_dtype=torch.float32, use_cpu=True)
        assert (args.dataloader_num_workers, args.dataloader_persistent_workers) == (workers, workers > 0)
        _, tokenized_dir = tokenized_data(config, tiny_model_dir, tmp_path)
        inputs = train_inputs(config, tokenized_dir, tiny_model_dir)
        keys.add(train_adapter.key(inputs))
        out = train_adapter(inputs, tmp_path / str(workers))
        assert json.loads((out / "summary.json").read_text())["data_workers"] == workers
        losses[workers] = [entry["loss"] for entry in json.loads((out / "log_history.json").read_text())]

    assert len(keys) == 1  # how batches are collated is not what is trained
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], abs=1e-6), losses


def test_a_tracker_that_is_not_installed_is_named_with_its_extra():
    from importlib.util import find_spec

    from finetune.core.preflight import tracking_problems

    config = load_config(None, ["train.report_to=[tensorboard, mlflow]"])

    expected = [] if find_spec("mlflow") else ["train.report_to: mlflow is not installed; pip install 'qlora-flow[mlflow]' or remove it from the list"]
    assert tracking_problems(config) == expected  # tensorboard comes with the dev extra


@pytest.mark.slow
def test_the_fast_step_optimizes_what_the_seed_loop_does(builtin_model_dir, workspace, tmp_path):
    """The embedded model, real weights, the default data and seed: the seed's loop (1 x 4, padded,
    checkpointing) and the fast step (one padding-free micro-batch of 4) give the same loss at every
    step. Dropout off, so that both draw nothing at random; fp32, so that the differences left are the
    order of float additions (a packed row sums in another order than four padded ones)."""
    from finetune.stages.train import train_adapter
    from tests.conftest import tokenized_data, train_inputs, workspace_overrides

    common = [*workspace_overrides(workspace), "train.epochs=0.115", "lora.dropout=0", "quant.compute_dtype=float32"]
    losses = {}
    for recipe in ("seed", "fast"):
        config = load_config(ROOT / "configs" / "default.yaml", [*common, f"train.recipe={recipe}"])
        _, tokenized_dir = tokenized_data(config, builtin_model_dir, tmp_path)
        out = train_adapter(train_inputs(config, tokenized_dir, builtin_model_dir), tmp_path / recipe)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["micro_batch"] == ([1, 4] if recipe == "seed" else [4, 1])
        losses[recipe] = [entry["loss"] for entry in json.loads((out / "log_history.json").read_text())]

    assert len(losses["seed"]) == len(losses["fast"]) == 3  # ceil(0.115 x 26)
    assert max(abs(a - b) for a, b in zip(losses["seed"], losses["fast"])) < 1e-3, losses
