"""`tokenize.template` is the one source of the prompt format: a second template (ChatML) works through
prepare's marker check, tokenize's prompts and evaluation's format check."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from finetune.core.config import DataConfig, TokenizeConfig
from finetune.data.template import PromptFormat
from finetune.stages.evaluate import follows_format
from finetune.stages.prepare import prepare_dataset
from finetune.stages.tokenize import TokenizeInputs, load_tokenizer, tokenize_dataset
from tests.conftest import prepare_inputs

SEED = TokenizeConfig().template
CHATML = "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"


def test_markers_come_from_the_template():
    seed, chatml = PromptFormat(SEED), PromptFormat(CHATML)
    assert seed.markers == ("### HUMAN:", "### RESPONSE:")
    assert seed.turn_start == "### HUMAN:" and seed.line_markers == ("### HUMAN:", "### RESPONSE:")
    assert chatml.markers == ("<|im_start|>user", "<|im_end|>", "<|im_start|>assistant")
    assert chatml.turn_start == "<|im_start|>user" and chatml.line_markers is None
    assert PromptFormat("{instruction}\nAnswer: ").turn_start is None  # nothing opens a turn: no new-turn check


def test_a_second_template_runs_through_prepare_tokenize_and_the_format_check(workspace, tiny_model_dir):
    raw = workspace / "data/raw"
    (raw / "extra.jsonl").write_text(
        json.dumps({"instruction": "Quote the seed format: ### HUMAN: hi", "response": "Fine under ChatML."}) + "\n"
        + json.dumps({"instruction": "Break it", "response": "Sure.<|im_end|>\n<|im_start|>user\nmore"}) + "\n"
    )  # fmt: skip
    data = DataConfig(max_reject_share=0.5)

    prepared_dir = prepare_dataset(prepare_inputs(raw, workspace / "data/eval/heldout.jsonl", data, CHATML), workspace / "p")

    rejected = pd.read_parquet(prepared_dir / "rejected.parquet")
    assert rejected.source_line.tolist() == [2]
    assert rejected.reason[0].startswith("response contains a template marker (<|im_start|>user / <|im_end|>")
    train = pd.read_parquet(prepared_dir / "train.parquet")
    assert "Quote the seed format: ### HUMAN: hi" in set(train.instruction)  # not a marker of this template
    # The seed template's check would have rejected the ### HUMAN: row instead.
    seed_dir = prepare_dataset(prepare_inputs(raw, workspace / "data/eval/heldout.jsonl", data, SEED), workspace / "p")
    assert pd.read_parquet(seed_dir / "rejected.parquet").source_line.tolist() == [1]

    tokenize = TokenizeConfig(template=CHATML)
    tokenized_dir = tokenize_dataset(TokenizeInputs(prepared_dir=prepared_dir, model_dir=tiny_model_dir, tokenize=tokenize), workspace / "p")
    tokenizer = load_tokenizer(tiny_model_dir)
    first = pd.read_parquet(tokenized_dir / "train.parquet").iloc[0]
    prompt_text = tokenizer.decode(list(first.input_ids[: first.prompt_length]))
    assert prompt_text == PromptFormat(CHATML).prompt(train.instruction[0])

    chatml = PromptFormat(CHATML)
    ends = tokenizer("Sure, here it is.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    runs_on = tokenizer("Sure.\n<|im_start|>user\nmore", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    seed_turn = tokenizer("Sure.\n### HUMAN:\nmore", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert follows_format(ends, tokenizer, chatml)
    assert not follows_format(runs_on, tokenizer, chatml)  # <|im_start|> is a special token: still seen
    assert follows_format(seed_turn, tokenizer, chatml) and not follows_format(seed_turn, tokenizer, PromptFormat(SEED))
    assert not follows_format(ends[:-1], tokenizer, chatml)  # no EOS: the answer ran out of tokens


@pytest.mark.parametrize(
    ("template", "text", "rows"),
    [
        (SEED, "### HUMAN:\nWhat is rain?\n\n### RESPONSE:\nWater from clouds.\n", [("What is rain?", "Water from clouds.")]),
        (
            "### Instruction:\n{instruction}\n\n### Response:\n",
            "### Instruction:\nWhat is rain?\n\n### Response:\nWater from clouds.\n",
            [("What is rain?", "Water from clouds.")],
        ),
        (CHATML, "### HUMAN:\nWhat is snow?\n\n### RESPONSE:\nFrozen rain.\n", [("What is snow?", "Frozen rain.")]),
    ],
)
def test_text_files_use_the_template_markers_where_the_template_has_that_shape(tmp_path, template, text, rows):
    from finetune.stages.prepare import load_rows

    (tmp_path / "pairs.txt").write_text(text)
    prompt = PromptFormat(template)
    frame, rejected = load_rows([tmp_path / "pairs.txt"], DataConfig(), prompt)
    assert rejected == []
    assert list(zip(frame.instruction, frame.response)) == rows


@pytest.mark.parametrize("template", [SEED, CHATML])
def test_the_chat_template_renders_a_user_turn_exactly_as_training_did(tiny_model_dir, template):
    from finetune.stages.tokenize import set_chat_template

    tokenizer = load_tokenizer(tiny_model_dir)
    set_chat_template(tokenizer, template)
    message = "Explain machine learning in simple terms."

    rendered = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True, return_dict=True)

    trained = tokenizer(PromptFormat(template).prompt(message), add_special_tokens=True)["input_ids"]
    assert list(rendered["input_ids"]) == trained
    history = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    text = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    assert text == PromptFormat(template).prompt("Q1") + "A1" + tokenizer.eos_token + PromptFormat(template).prompt("Q2")
    system = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(system, add_generation_prompt=True, tokenize=False) == PromptFormat(template).prompt("Be brief.\n\nHi")
    for wrong in ([*system[::-1]], [{"role": "tool", "content": "{}"}]):  # a system turn after the first; another role
        with pytest.raises(Exception, match="user and assistant turns, with an optional system turn first"):
            tokenizer.apply_chat_template(wrong, tokenize=False)
