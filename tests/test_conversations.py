"""Conversations of several exchanges: read from the `messages` layout, trained on every assistant turn,
rendered by the saved chat template exactly as training tokenized them, cut at a turn boundary."""

from __future__ import annotations

import json

import pytest

from finetune.core.config import DataConfig, LossOn, OverLength
from finetune.data.readers import data_files
from finetune.data.template import PromptFormat
from finetune.stages.prepare import load_rows, prepare_dataset
from finetune.stages.tokenize import (
    IGNORE_INDEX,
    encode_example,
    fit_length,
    load_tokenizer,
    set_chat_template,
)
from tests.conftest import prepare_inputs

SEED = "### HUMAN:\n{instruction}\n\n### RESPONSE:\n"
CHATML = "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
TURNS = ["What is rain?", "Water falling from clouds.", "Why does it fall?", "Drops grow too heavy to float.", "And snow?", "Ice crystals, not drops."]


def _messages(turns: list[str], system: str | None = None) -> list[dict]:
    roles = ["user", "assistant"] * (len(turns) // 2)
    return ([{"role": "system", "content": system}] if system else []) + [{"role": r, "content": c} for r, c in zip(roles, turns)]


@pytest.mark.parametrize("template", [SEED, CHATML])
def test_the_labels_of_a_three_exchange_conversation_are_its_answers_and_their_eos(tiny_model_dir, template):
    tokenizer = load_tokenizer(tiny_model_dir)
    example = encode_example(tokenizer, template, TURNS[4], TURNS[5], LossOn.response, TURNS[:4])
    ids, labels = example["input_ids"], example["labels"]

    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in TURNS[1::2]]
    assert [t for t in labels if t != IGNORE_INDEX] == sum(answers, [])
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, ids))
    spans = "".join("x" if t != IGNORE_INDEX else "." for t in labels).split(".")
    assert [len(s) for s in spans if s] == [len(a) for a in answers]  # three trained runs, one per answer
    assert labels[-1] == tokenizer.eos_token_id and example["exchange_ends"][-1] == len(ids)
    prompt = tokenizer(PromptFormat(template).prompt(TURNS[0]), add_special_tokens=True)["input_ids"]
    assert ids[: len(prompt)] == prompt and example["prompt_length"] == len(prompt)


@pytest.mark.parametrize("template", [SEED, CHATML])
def test_a_tokenized_conversation_is_what_the_saved_chat_template_renders(tiny_model_dir, template):
    tokenizer = load_tokenizer(tiny_model_dir)
    set_chat_template(tokenizer, template)
    example = encode_example(tokenizer, template, TURNS[4], TURNS[5], LossOn.response, TURNS[:4])

    rendered = tokenizer.apply_chat_template(_messages(TURNS), tokenize=False)

    assert tokenizer.decode(example["input_ids"]) == rendered
    assert list(tokenizer.apply_chat_template(_messages(TURNS), return_dict=True)["input_ids"]) == example["input_ids"]
    with_system = tokenizer.apply_chat_template(_messages(TURNS[:2], system="Answer briefly."), tokenize=False)
    system_first = encode_example(tokenizer, template, "Answer briefly.\n\n" + TURNS[0], TURNS[1], LossOn.response)
    assert tokenizer.decode(system_first["input_ids"]) == with_system


def test_a_long_conversation_is_cut_at_a_turn_boundary_or_rejected(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    example = encode_example(tokenizer, SEED, TURNS[4], TURNS[5], LossOn.response, TURNS[:4])
    first, second, whole = example["exchange_ends"]
    limit = second + (whole - second) // 2  # inside the third exchange

    cut, reason = fit_length(example, limit, OverLength.truncate)
    assert reason is None and cut["input_ids"] == example["input_ids"][:second] and cut["labels"][-1] == tokenizer.eos_token_id
    assert fit_length(example, limit, OverLength.reject) == (None, f"{whole} tokens, over tokenize.max_length={limit} (or set tokenize.overlength=truncate)")
    one, _ = fit_length(example, first - 2, OverLength.truncate)  # the first exchange alone is too long: its response is cut
    assert one["input_ids"] == example["input_ids"][: first - 2]


def test_messages_records_of_several_exchanges_are_read_checked_and_counted(workspace, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    records = [
        {"messages": _messages(TURNS, system="Answer briefly.")},
        {"messages": _messages(["\u200b", "Nothing.", *TURNS[:2]])},  # an earlier user turn with nothing visible
        {"messages": _messages(TURNS[:2] + ["### RESPONSE:", "x", "Next?", "Yes."])},  # a template marker in an earlier turn
        {"messages": [*_messages(TURNS[:2]), {"role": "user", "content": TURNS[2]}]},  # ends with a user turn
        {"messages": [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi."}]},
    ]
    (raw / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    rows, rejected = load_rows(data_files(raw), DataConfig(), PromptFormat(SEED))

    assert len(rows) == 1
    row = rows.iloc[0]
    assert (row.instruction, row.response) == (TURNS[4], TURNS[5])
    assert list(row.history) == ["Answer briefly.\n\n" + TURNS[0], *TURNS[1:4]]
    assert sorted((r["source_line"], r["reason"]) for r in rejected) == [
        (2, "an earlier turn is empty after trimming whitespace and invisible format characters (zero-width spaces and joiners, soft hyphens, direction marks)"),
        (3, "an earlier turn contains a template marker (### HUMAN: / ### RESPONSE:, from tokenize.template); trained on, the model would learn to write turns of its own"),
        (4, "messages must be user and assistant turns in turn, starting with user and ending with assistant (an optional system turn first); found roles: user, assistant, user"),
        (5, "messages must be user and assistant turns in turn, starting with user and ending with assistant (an optional system turn first); found roles: assistant, user"),
    ]  # fmt: skip

    (workspace / "data/raw/chats.jsonl").write_text(json.dumps(records[0]) + "\n")
    report = json.loads((prepare_dataset(prepare_inputs(workspace / "data/raw", workspace / "data/eval/heldout.jsonl"), workspace / "out") / "report.json").read_text())
    assert (report["train_rows"], report["conversations"]) == (105, 1)
