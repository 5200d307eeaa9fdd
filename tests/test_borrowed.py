"""Guards on what the code borrows from its libraries' private parts. Each test names the internal and
fails with what changed, so a library upgrade that breaks the graphed step or one-GPU training says so
here instead of training with wrong metrics or on nn.DataParallel."""

from __future__ import annotations

import logging
import tomllib
import warnings

import pytest
import torch
import transformers
import trl

from finetune.training.graphs import GraphedSFTTrainer
from finetune.training.loss import TRL_STEP_METRICS, trl_internals_problems
from tests.conftest import ROOT

WATCHED = ("transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "torch")


@pytest.fixture(scope="module")
def sft_parts(tiny_model_dir, tmp_path_factory):
    """(model, tokenizer, dataset, SFTConfig) of a CPU training on three short examples."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in ("One two.", "Three four five.", "Six.")]
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
    args = trl.SFTConfig(
        output_dir=str(tmp_path_factory.mktemp("sft")), use_cpu=True, report_to="none", max_length=None,
        per_device_train_batch_size=3, logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    return model, tokenizer, dataset, args


def test_trl_compute_loss_keeps_the_metrics_the_graphed_step_writes(sft_parts):
    model, tokenizer, dataset, args = sft_parts
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert trl_internals_problems(trainer) == [], f"TRL {trl.__version__}: the graphed step's borrowed internals changed"

    model.train()
    batch = trainer.data_collator([dataset[i] for i in range(3)])
    trainer.compute_loss(trainer.model, batch, num_items_in_batch=int((batch["labels"] != -100).sum()))

    written = set(trainer._metrics["train"])
    assert written == set(TRL_STEP_METRICS), (
        f"TRL {trl.__version__}'s compute_loss now writes the step metrics {sorted(written)}; the graphed step "
        f"(finetune/training/loss.py) writes {sorted(TRL_STEP_METRICS)}: update record_step_metrics"
    )
    real_tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    assert trainer._total_train_tokens == real_tokens, f"TRL {trl.__version__} counts _total_train_tokens differently"
    assert trainer._metrics["train"]["num_tokens"] == [trainer._total_train_tokens]


def test_the_graphed_trainer_trains_eagerly_with_a_warning_when_trl_changes(sft_parts, monkeypatch, caplog):
    model, tokenizer, dataset, args = sft_parts
    common = dict(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    logger = logging.getLogger("test.graphs")
    assert GraphedSFTTrainer(**common, static_shape=(3, 8), pad_token_id=0, logger=logger).graph_failed is False

    original = trl.SFTTrainer.__init__

    def without_token_count(self, *a, **k):  # a TRL release that dropped the running token count
        original(self, *a, **k)
        del self._total_train_tokens

    monkeypatch.setattr(trl.SFTTrainer, "__init__", without_token_count)
    with caplog.at_level(logging.WARNING, logger="test.graphs"):
        trainer = GraphedSFTTrainer(**common, static_shape=(3, 8), pad_token_id=0, logger=logger)

    assert trainer.graph_failed is True  # TRL's own compute_loss runs instead
    assert "_total_train_tokens (the running token count) is gone); training eagerly" in caplog.text


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_the_loss_from_the_logits_is_trls_loss_with_trls_metrics(sft_parts, padding_free):
    """On the CPU every recipe trains through LogitsLossSFTTrainer (finetune/training/loss.py) instead of TRL's fused
    LM head: on the same batch, padded or packed in one row, it computes TRL's loss and gradient and writes TRL's
    step metrics with TRL's values."""
    import dataclasses

    from finetune.training.loss import LogitsLossSFTTrainer

    model, tokenizer, dataset, args = sft_parts
    args = dataclasses.replace(args, padding_free=padding_free)
    found = {}
    for trainer_type in (trl.SFTTrainer, LogitsLossSFTTrainer):
        trainer = trainer_type(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        model.train()
        model.zero_grad()
        batch = trainer.data_collator([dataset[i] for i in range(3)])
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=int((batch["labels"] != -100).sum()) + 2)
        loss.backward()
        embedding = model.get_input_embeddings().weight.grad.clone()
        found[trainer_type.__name__] = (loss.item(), embedding, {k: list(v) for k, v in trainer._metrics["train"].items()})
    (trl_loss, trl_grad, trl_metrics), (ours, our_grad, our_metrics) = found["SFTTrainer"], found["LogitsLossSFTTrainer"]
    assert ("position_ids" in batch) == padding_free and ("attention_mask" in batch) != padding_free
    assert abs(ours - trl_loss) < 1e-5 * abs(trl_loss), (ours, trl_loss)
    assert torch.allclose(our_grad, trl_grad, rtol=1e-4, atol=1e-7)
    assert our_metrics.keys() == trl_metrics.keys() == set(TRL_STEP_METRICS)
    for name in TRL_STEP_METRICS:
        assert our_metrics[name] == pytest.approx(trl_metrics[name], rel=1e-5), name


def test_one_process_training_can_pin_transformers_to_one_gpu(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert args.n_gpu == 0  # on the CPU
    args._n_gpu = 1  # what recipe.sft_config does on a machine with several GPUs
    assert args.n_gpu == 1, (
        f"transformers {transformers.__version__} no longer reads TrainingArguments._n_gpu through n_gpu: one process on a "
        "machine with several GPUs would be wrapped in nn.DataParallel (finetune/training/recipe.py sft_config)"
    )


def test_deprecations_of_the_libraries_that_compute_stages_are_shown():
    filters = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["filterwarnings"]
    assert filters[0] == "ignore::DeprecationWarning"  # the rest stays quiet
    with warnings.catch_warnings(record=True) as seen:
        for library in (*WATCHED, "prefect"):
            warnings.warn_explicit(f"{library} deprecation", DeprecationWarning, "x.py", 1, module=f"{library}.sub", registry={})
    assert sorted(str(w.message).split()[0] for w in seen) == sorted(WATCHED)
