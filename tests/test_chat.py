"""The trained prompt format travels with the saved models, and `finetune chat` talks to them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

TINY = ROOT / "configs" / "tiny.yaml"
QUESTION = "Explain machine learning in simple terms."


@pytest.fixture(scope="module")
def finished_run(tiny_flow_run):
    record, overrides, _ = tiny_flow_run
    return record, overrides


def _chat(overrides: list[str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    sets = [arg for item in overrides for arg in ("--set", item)]
    return subprocess.run(
        [sys.executable, "-m", "finetune.cli", "chat", "--config", str(TINY), *sets, *args],
        cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _greedy(model_dir: Path, text: str, max_new_tokens: int) -> tuple[list[int], str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    new = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1] :].tolist()
    return new, tokenizer.decode(new, skip_special_tokens=True)


def test_the_merged_model_answers_through_its_chat_template_as_through_the_training_prompt(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record, _ = finished_run
    merged_dir = Path(record["stages"]["merge"]["output_dir"]) / "model"
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    templated = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    through_template = model.generate(**templated, max_new_tokens=12, do_sample=False)[0, templated["input_ids"].shape[1] :].tolist()
    through_pipeline, _ = _greedy(merged_dir, f"### HUMAN:\n{QUESTION}\n\n### RESPONSE:\n", 12)
    assert through_template == through_pipeline
    adapter_tokenizer = AutoTokenizer.from_pretrained(Path(record["stages"]["train"]["output_dir"]) / "adapter")
    assert adapter_tokenizer.chat_template == tokenizer.chat_template  # the adapter folder carries it too


def test_finetune_chat_streams_the_merged_models_answer(finished_run):
    record, overrides = finished_run
    _, expected = _greedy(Path(record["stages"]["merge"]["output_dir"]) / "model", f"### HUMAN:\n{QUESTION}\n\n### RESPONSE:\n", 16)

    result = _chat(overrides, QUESTION, "--max-new-tokens", "16")

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == expected.strip()
    assert f"[{Path(record['run_dir']).name}: merged model]" in result.stderr


def test_finetune_chat_reads_a_file_of_prompts_and_talks_to_the_adapter(finished_run, tmp_path):
    _, overrides = finished_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is a budget?\n\nWhat is compost?\n")

    result = _chat(overrides, "--adapter", "--file", str(prompts), "--max-new-tokens", "4")

    assert result.returncode == 0, result.stderr[-2000:]
    assert [line for line in result.stdout.splitlines() if line.startswith("> ")] == ["> What is a budget?", "> What is compost?"]
    assert "base + adapter" in result.stderr


def test_finetune_chat_says_clearly_when_there_is_no_model(finished_run, tmp_path):
    from finetune.cli.chat import ChatError, find_run, load_chat_model

    _, overrides = finished_run
    result = _chat(overrides, "--run", "no-such-run", "Hi")
    assert result.returncode == 2 and "--run no-such-run: no such run" in result.stderr
    assert "Traceback" not in result.stderr

    with pytest.raises(ChatError, match="no runs yet; `finetune run` trains a model first"):
        find_run(tmp_path / "none", None)
    failed = tmp_path / "runs" / "20260101-000000-broken"
    failed.mkdir(parents=True)
    (failed / "run.json").write_text(json.dumps({"status": "failed", "stages": {"prepare": {"output_dir": None}}}))
    with pytest.raises(ChatError, match="no completed run yet"):
        find_run(tmp_path / "runs", None)
    with pytest.raises(ChatError, match="run 20260101-000000-broken has no merged model"):
        load_chat_model(find_run(tmp_path / "runs", "broken"), adapter=False)
    with pytest.raises(ChatError, match="has no adapter: its train stage did not complete"):
        load_chat_model(failed, adapter=True)
