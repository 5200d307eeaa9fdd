import json

import pandas as pd
import pytest

from finetune.core.config import LossOn, OverLength, TokenizeConfig
from finetune.stages.prepare import prepare_dataset
from finetune.stages.tokenize import (
    IGNORE_INDEX,
    TokenizeInputs,
    encode_example,
    load_tokenizer,
    tokenize_dataset,
)
from tests.conftest import prepare_inputs


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_prompt_is_masked_and_response_ends_with_trained_eos(tokenizer):
    template = TokenizeConfig().template
    example = encode_example(tokenizer, template, "Why is the sky blue?", "Rayleigh scattering.", LossOn.response)
    ids, labels, n = example["input_ids"], example["labels"], example["prompt_length"]

    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:]
    assert ids[-1] == labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:n]) == "### HUMAN:\nWhy is the sky blue?\n\n### RESPONSE:\n"
    assert tokenizer.decode(ids[n:-1]) == "Rayleigh scattering."


def test_loss_on_full_trains_every_token(tokenizer):
    example = encode_example(tokenizer, TokenizeConfig().template, "Q?", "A.", LossOn.full)
    assert example["labels"] == example["input_ids"]


def test_tokenize_stage_writes_splits_and_stats(workspace, tiny_model_dir):
    prepared = prepare_dataset(prepare_inputs(workspace / "data/raw", workspace / "data/eval/heldout.jsonl"), workspace / "p")

    out = tokenize_dataset(TokenizeInputs(prepared_dir=prepared, model_dir=tiny_model_dir, tokenize=TokenizeConfig(max_length=80)), workspace / "p")

    stats = json.loads((out / "stats.json").read_text())
    assert stats["train"]["examples"] + stats["train"]["rejected"] == 104
    assert stats["train"]["rejected"] > 0  # some default examples exceed 80 tokens
    rejected = pd.read_parquet(out / "rejected.parquet")
    assert len(rejected) == stats["train"]["rejected"] + stats["eval"]["rejected"]
    first = rejected.iloc[0]
    assert first.source_file.endswith(".jsonl") and first.source_line >= 1
    assert "over tokenize.max_length=80" in first.reason
    train = pd.read_parquet(out / "train.parquet")
    assert train.input_ids.str.len().max() <= 80
    assert all(any(t != IGNORE_INDEX for t in labels) for labels in train.labels)
    assert tokenize_dataset.key(TokenizeInputs(prepared_dir=prepared, model_dir=tiny_model_dir, tokenize=TokenizeConfig(max_length=80))) != (
        tokenize_dataset.key(TokenizeInputs(prepared_dir=prepared, model_dir=tiny_model_dir, tokenize=TokenizeConfig()))
    )


def test_truncate_keeps_the_prompt_and_cuts_the_response(workspace, tiny_model_dir):
    prepared = prepare_dataset(prepare_inputs(workspace / "data/raw", workspace / "data/eval/heldout.jsonl"), workspace / "p")

    out = tokenize_dataset(TokenizeInputs(prepared_dir=prepared, model_dir=tiny_model_dir, tokenize=TokenizeConfig(max_length=40, overlength=OverLength.truncate)), workspace / "p")

    stats = json.loads((out / "stats.json").read_text())
    assert stats["train"]["examples"] == 104 and stats["train"]["truncated"] > 0 and stats["train"]["rejected"] == 0
    train = pd.read_parquet(out / "train.parquet")
    assert train.input_ids.str.len().max() == 40
    assert all(list(labels[:n]) == [IGNORE_INDEX] * n for labels, n in zip(train.labels, train.prompt_length))


def test_eos_is_trained_even_when_pad_is_eos(tokenizer):
    """SmolLM2 pads with its EOS; labels are built from the template, not by masking pad ids."""
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    example = encode_example(tokenizer, TokenizeConfig().template, "Q?", "A.", LossOn.response)
    assert example["labels"][-1] == tokenizer.eos_token_id


def test_the_batched_encoding_is_the_one_call_per_text_encoding_and_chunks_change_nothing(workspace, tiny_model_dir, tokenizer, monkeypatch):
    """Every row's ids equal the tokenizer called on its prompt and response one at a time, and a split
    written in chunks of 7 rows is the split written in one chunk, row for row, stats and rejects included."""
    from finetune.stages import tokenize

    prepared = prepare_dataset(prepare_inputs(workspace / "data/raw", workspace / "data/eval/heldout.jsonl"), workspace / "p")
    frame = pd.read_parquet(prepared / "train.parquet")
    cfg = TokenizeConfig(max_length=80)
    template = tokenize.PromptFormat(cfg.template)
    for row, ids in zip(frame.itertuples(), tokenize.encode_split(tokenizer, frame, TokenizeConfig(max_length=4096))[0].input_ids):
        prompt = tokenizer(template.prompt(row.instruction))["input_ids"]
        response = tokenizer(row.response, add_special_tokens=False)["input_ids"]
        assert list(ids) == [*prompt, *response, tokenizer.eos_token_id]

    whole = tokenize_dataset(TokenizeInputs(prepared_dir=prepared, model_dir=tiny_model_dir, tokenize=cfg), workspace / "whole")
    monkeypatch.setattr(tokenize, "CHUNK_ROWS", 7)
    chunked = tokenize_dataset(TokenizeInputs(prepared_dir=prepared, model_dir=tiny_model_dir, tokenize=cfg), workspace / "chunked")
    for name in ("train.parquet", "eval.parquet", "rejected.parquet"):
        assert pd.read_parquet(chunked / name).equals(pd.read_parquet(whole / name))
    assert (chunked / "stats.json").read_text() == (whole / "stats.json").read_text()
    assert json.loads((whole / "stats.json").read_text())["train"]["rejected"] > 0  # rejects fall in several chunks
