"""Files exported from other fine-tuning tools, each written as that tool's documentation shows it, read
into the same rows: Axolotl's and LLaMA-Factory's ShareGPT conversations, LLaMA-Factory's alpaca with a
system prompt and history, OpenAI's chat fine-tuning files, and a Hugging Face chat dataset."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from finetune.core.config import DataConfig, TokenizeConfig
from finetune.data.readers import SYSTEM_SEPARATOR, DataError, data_files
from finetune.data.template import PromptFormat
from finetune.stages.prepare import load_rows

PROMPT = PromptFormat(TokenizeConfig().template)
SYSTEM = "You are a concise assistant."


def _rows(tmp_path, name: str, content: str | bytes) -> tuple[list[tuple], list[dict]]:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    rows, rejected = load_rows(data_files(tmp_path), DataConfig(), PROMPT)
    return [(list(r.history), r.instruction, r.response) for r in rows.itertuples()], rejected


def _jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_sharegpt_conversations_as_axolotl_and_llama_factory_write_them(tmp_path):
    axolotl = {"conversations": [
        {"from": "system", "value": SYSTEM}, {"from": "human", "value": "What is rain?"}, {"from": "gpt", "value": "Water falling from clouds."},
        {"from": "human", "value": "And snow?"}, {"from": "gpt", "value": "Frozen rain, as crystals."}]}  # fmt: skip
    llama_factory = {"conversations": [{"from": "human", "value": "What is hail?"}, {"from": "gpt", "value": "Balls of ice."}], "system": SYSTEM, "tools": ""}
    tool_call = {"conversations": [{"from": "human", "value": "How old am I?"}, {"from": "function_call", "value": "{}"},
                                   {"from": "observation", "value": "{}"}, {"from": "gpt", "value": "36."}]}  # fmt: skip

    rows, rejected = _rows(tmp_path, "sharegpt.jsonl", _jsonl(axolotl, llama_factory, tool_call))

    assert rows == [
        ([SYSTEM + SYSTEM_SEPARATOR + "What is rain?", "Water falling from clouds."], "And snow?", "Frozen rain, as crystals."),
        ([], SYSTEM + SYSTEM_SEPARATOR + "What is hail?", "Balls of ice."),
    ]
    assert [r["source_line"] for r in rejected] == [3]
    assert rejected[0]["reason"].startswith("conversations: a turn from 'function_call'; understood speakers are human and gpt")


def test_llama_factory_alpaca_with_a_system_prompt_and_history(tmp_path):
    records = [
        {"instruction": "And in Celsius?", "input": "", "output": "About 34 degrees.", "system": SYSTEM,
         "history": [["What is 94F?", "A hot day."], ["Is that safe?", "Drink water."]]},
        {"instruction": "Compare them.", "input": "basketball and football", "output": "Both are team sports."},
        {"instruction": "Go on.", "input": "", "output": "Sure.", "history": [["only one half"]]},
    ]  # fmt: skip

    rows, rejected = _rows(tmp_path, "alpaca.json", json.dumps(records))

    assert rows == [
        ([SYSTEM + SYSTEM_SEPARATOR + "What is 94F?", "A hot day.", "Is that safe?", "Drink water."], "And in Celsius?", "About 34 degrees."),
        ([], "Compare them.\n\nbasketball and football", "Both are team sports."),
    ]
    assert [(r["source_line"], r["reason"]) for r in rejected] == [(3, "history must be a list of [instruction, response] pairs")]


def test_openai_chat_fine_tuning_files(tmp_path):
    conversation = {"messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is rain?"},
        {"role": "assistant", "content": "Water falling from clouds.", "weight": 1},
        {"role": "user", "content": "And snow?"}, {"role": "assistant", "content": "Frozen rain.", "weight": 1}]}  # fmt: skip
    untrained_turn = {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?", "weight": 0},
        {"role": "user", "content": "What is hail?"}, {"role": "assistant", "content": "Balls of ice."}]}  # fmt: skip

    rows, rejected = _rows(tmp_path, "openai.jsonl", _jsonl(conversation, untrained_turn))

    assert rows == [([SYSTEM + SYSTEM_SEPARATOR + "What is rain?", "Water falling from clouds."], "And snow?", "Frozen rain.")]
    assert [r["source_line"] for r in rejected] == [2] and rejected[0]["reason"].startswith("an assistant turn has weight 0")


def test_a_hugging_face_chat_dataset_file(tmp_path):
    """A split of a chat dataset as the hub stores it (Parquet; ultrachat's columns: prompt, prompt_id, messages)."""
    messages = [{"role": "user", "content": "What is rain?"}, {"role": "assistant", "content": "Water falling from clouds."}]
    pd.DataFrame({"prompt": ["What is rain?"], "prompt_id": ["a1"], "messages": [messages]}).to_parquet(tmp_path / "train-00000-of-00001.parquet")

    rows, rejected = load_rows(data_files(tmp_path), DataConfig(), PROMPT)

    assert (rejected, rows.instruction.tolist(), rows.response.tolist()) == ([], ["What is rain?"], ["Water falling from clouds."])


def test_a_layout_not_understood_lists_the_ones_that_are(tmp_path):
    (tmp_path / "completion.jsonl").write_text(_jsonl({"text": "Axolotl's completion layout: raw text, no pairs."}))
    with pytest.raises(DataError) as error:
        load_rows(data_files(tmp_path), DataConfig(), PROMPT)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'completion.jsonl'}: unknown field layout; found fields ['text']; understood layouts: chat (messages); sharegpt (conversations); alpaca (")
