"""Evaluation's numbers: paired bootstrap intervals, and base vs tuned on the tiny model where the two
are the same model (an adapter that was never trained)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune.core.errors import InternalError
from finetune.reporting.stats import paired_difference


def test_paired_intervals_are_seeded_and_see_a_small_shift_that_unpaired_noise_would_hide():
    rng = np.random.default_rng(3)
    base = rng.normal(3.0, 1.0, 25)  # prompts differ a lot from each other...
    tuned = base - 0.1 + rng.normal(0, 0.05, 25)  # ...and the tuned model is a little better on each

    found = paired_difference(base, tuned, seed=7)

    assert found == paired_difference(base, tuned, seed=7)  # a rerun gives the same interval
    assert found.high < 0 and found.excludes_zero
    assert found.low < found.delta < found.high
    assert not paired_difference(base, rng.permutation(tuned), seed=7).excludes_zero  # pairing broken: noise wins
    same = paired_difference(base, base.copy())
    assert (same.low, same.delta, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero


def test_weighted_difference_is_the_ratio_of_sums():
    base, tuned, tokens = np.array([2.0, 4.0]), np.array([1.0, 4.0]), np.array([3, 1])

    found = paired_difference(base, tuned, weights=tokens)

    assert found.base == pytest.approx((2 * 3 + 4 * 1) / 4) and found.tuned == pytest.approx((1 * 3 + 4 * 1) / 4)
    with pytest.raises(InternalError, match="equal non-empty"):
        paired_difference(base, tuned[:1])


@pytest.mark.slow
def test_an_untrained_adapter_evaluates_identical_to_the_base(tiny_model_dir, workspace, tmp_path):
    """LoRA's B matrices start at zero: base and tuned are the same function, so every difference is 0
    and every interval includes it; the report and metrics carry the intervals and the per-topic rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.core.config import load_config
    from finetune.stages.evaluate import EvaluateInputs, evaluate_adapter
    from tests.conftest import ROOT, tokenized_data, workspace_overrides

    config = load_config(ROOT / "configs" / "tiny.yaml", [*workspace_overrides(workspace), f"model.base={tiny_model_dir}"])
    prepared_dir, tokenized_dir = tokenized_data(config, tiny_model_dir, tmp_path)
    untrained = tmp_path / "untrained"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(untrained / "adapter")

    out = evaluate_adapter(EvaluateInputs(
        train_dir=untrained, model_dir=tiny_model_dir, prepared_dir=prepared_dir, tokenized_dir=tokenized_dir,
        quant=config.quant, tokenize=config.tokenize, eval=config.eval,
    ), tmp_path)  # fmt: skip

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["base"] == metrics["tuned"]
    for name, found in metrics["differences"].items():
        assert found["delta"] == 0 and found["low"] <= 0 <= found["high"] and not found["excludes_zero"], name
    assert {row["topic"] for row in metrics["topics"]} == {"business_finance", "education", "environment", "health_wellness", "science_technology"}
    assert sum(row["examples"] for row in metrics["topics"]) == metrics["examples"] == 25
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 25 and all(0 <= s["tuned_rouge_l"] <= 1 and s["base_answer"] == s["tuned_answer"] for s in samples)
    report = (out / "report.md").read_text()
    assert "| loss per response token |" in report and "+0.000 [+0.000, +0.000] |" in report and "## By topic" in report


def test_a_paired_proportion_interval_has_width_where_every_prompt_moves_the_same_way():
    """25 of 25 prompts from 0 to 1: the bootstrap's interval is [1, 1]; Newcombe's is not. With no discordant
    pair the Wilson bounds of 25/25 and 0/25 are n / (n + z^2) and z^2 / (n + z^2), and the interval's lower
    end is 1 - sqrt(2) * (1 - n / (n + z^2))."""
    from finetune.reporting.stats import paired_proportion_difference

    z2 = 1.959963984540054**2
    before, after = np.zeros(25), np.ones(25)
    assert (paired_difference(before, after).low, paired_difference(before, after).high) == (1.0, 1.0)
    found = paired_proportion_difference(before, after)
    assert found.high == 1.0 and found.low == pytest.approx(1 - np.sqrt(2) * (1 - 25 / (25 + z2)), abs=1e-9)
    assert round(found.low, 3) == 0.812 and found.excludes_zero
    same = paired_proportion_difference(after, after)  # no change: symmetric about 0, never excluding it
    assert same.delta == 0 and same.low == -same.high < 0 and not same.excludes_zero
    one_way = paired_proportion_difference(np.ones(25), np.r_[np.zeros(6), np.ones(19)])
    assert one_way.delta == pytest.approx(-0.24) and one_way.high < 0 < one_way.high - one_way.low


def test_example_losses_are_each_examples_own_loss_whatever_it_is_batched_with(tiny_model_dir):
    """The mean cross-entropy of each example's response tokens, as the model computes it from its labels for
    that example alone: padding, batch neighbours and prompt positions change nothing."""
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.stages.evaluate import example_losses

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length, prompt in [(9, 4), (23, 10), (5, 2), (16, 15)]:
        ids = torch.randint(3, model.config.vocab_size, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    examples = pd.DataFrame(rows)

    losses, counts = example_losses(model, examples, pad_token_id=model.config.pad_token_id, batch_size=3)

    assert counts.tolist() == [5, 13, 3, 1]
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss.item() for r in rows]
    assert losses == pytest.approx(alone, rel=1e-5)
