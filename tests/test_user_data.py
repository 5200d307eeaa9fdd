"""Data that was not written for this project: invisible text, a held-out pair written twice, topics
outside a list. What `finetune validate` and the prepare stage make of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.config import DataConfig, TokenizeConfig
from finetune.errors import PermanentError
from finetune.prepare import _validate, prepare_dataset
from finetune.template import PromptFormat
from tests.conftest import ROOT, prepare_inputs, workspace_overrides

# Whitespace and format characters: nothing a reader sees.
INVISIBLE = st.sampled_from([" ", "\t", "\n", "\u00a0", "\u3000", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u200e", "\u202e"])
VISIBLE = st.characters(categories=["Lu", "Ll", "Nd", "Po", "Sm"])


def _validate_command(workspace, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    sets = [arg for item in [*workspace_overrides(workspace), *extra] for arg in ("--set", item)]
    return subprocess.run([sys.executable, "-m", "finetune.cli", "validate", *sets], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@settings(max_examples=60, deadline=None)
@given(st.lists(INVISIBLE, max_size=6), st.one_of(st.none(), VISIBLE), st.lists(INVISIBLE, max_size=6))
def test_a_field_is_empty_exactly_when_nothing_visible_is_left(before, visible, after):
    text = "".join(before) + (visible or "") + "".join(after)
    frame = pd.DataFrame([{"instruction": text, "response": "fine", "history": [], "topic": None, "source_file": "f.jsonl", "source_line": 1}])

    _, rejected = _validate(frame, DataConfig(), PromptFormat(TokenizeConfig().template))

    assert [r["reason"].startswith("instruction is empty after trimming whitespace") for r in rejected] == ([True] if visible is None else [])


def test_an_invisible_field_is_rejected_by_place_and_a_held_out_pair_written_twice_is_collapsed(workspace):
    record = {"instruction": "\u200b\u2060\ufeff \u00ad", "response": "An answer.", "topic": "education"}
    (workspace / "data/raw/invisible.jsonl").write_text(json.dumps(record) + "\n")
    heldout = workspace / "data/eval/heldout.jsonl"
    lines = heldout.read_text().splitlines()
    heldout.write_text("\n".join([*lines, lines[0]]) + "\n")

    result = _validate_command(workspace)

    assert result.returncode == 0, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert "evaluation rows: **25**; rejected: **1**" in result.stdout
    assert "invisible.jsonl:1`: instruction is empty after trimming whitespace and invisible format characters" in result.stdout
    assert "1 duplicate held-out pair(s) collapsed" in result.stdout
    out = prepare_dataset(prepare_inputs(workspace / "data/raw", heldout), workspace / "out")
    report = json.loads((out / "report.json").read_text())
    assert (report["eval_rows"], report["eval_duplicates_collapsed"]) == (25, 1)


def test_a_topic_outside_the_list_names_the_key_that_widens_it(workspace):
    inputs = prepare_inputs(workspace / "data/raw", workspace / "data/eval/heldout.jsonl", DataConfig(topics=["education"]))

    with pytest.raises(PermanentError) as failure:
        prepare_dataset(inputs, workspace / "out")

    assert "topic is missing or not one of data.topics ['education']; data.topics: null accepts any topic" in str(failure.value)


def test_compressed_files_are_read_and_any_other_file_is_named_with_how_to_leave_it_out(workspace):
    import gzip
    import lzma

    from finetune.readers import DataError, data_files, read_pairs

    raw = workspace / "data/raw"
    pairs = [{"instruction": f"Question {i} about compression?", "response": f"Answer {i}.", "topic": "education"} for i in range(3)]
    (raw / "extra.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(p) + "\n" for p in pairs[:2]).encode()))
    (raw / "more.csv.xz").write_bytes(lzma.compress(f'instruction,response,topic\n"{pairs[2]["instruction"]}",Answer 2.,education\n'.encode()))
    (raw / "notes.md").write_text("not data")

    with pytest.raises(DataError) as refused:
        data_files(raw)
    assert str(refused.value).startswith(f"{raw}: no reader for notes.md; readable: .jsonl")
    assert "data.exclude: ['.*', 'notes.md']" in str(refused.value)
    (raw / "broken.jsonl.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match=r"broken.jsonl.gz: not a readable gzip file"):
        read_pairs(raw / "broken.jsonl.gz")
    (raw / "broken.jsonl.gz").unlink()

    inputs = prepare_inputs(raw, workspace / "data/eval/heldout.jsonl", DataConfig(exclude=[".*", "*.md"]))
    report = (prepare_dataset(inputs, workspace / "out") / "report.md").read_text()

    assert "Training rows: **107** from 7 file(s)" in report
    assert "| extra.jsonl.gz | 2 | 0 |" in report and "| more.csv.xz | 1 | 0 |" in report
