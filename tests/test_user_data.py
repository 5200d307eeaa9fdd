"""Data that was not written for this project: invisible text, a held-out pair written twice, topics
outside a list, one instruction with two answers, near copies of held-out rows, files no reader handles.
What `finetune validate`, `finetune run` and the prepare stage make of each."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.core.config import DataConfig, TokenizeConfig
from finetune.core.errors import PermanentError
from finetune.data.schemas import validate_rows
from finetune.data.template import PromptFormat
from finetune.stages.prepare import prepare_dataset
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

    _, rejected = validate_rows(frame, DataConfig(), PromptFormat(TokenizeConfig().template))

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

    from finetune.data.readers import DataError, data_files, read_pairs

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


def _run_command(workspace, *extra: str) -> subprocess.CompletedProcess:
    """`finetune run` against the session's Prefect server (the prefect_server fixture), as with PREFECT_API_URL set."""
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url)}
    sets = [arg for item in [*workspace_overrides(workspace), *extra] for arg in ("--set", item)]
    return subprocess.run([sys.executable, "-m", "finetune.cli", "run", *sets], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _one_line(result: subprocess.CompletedProcess) -> str:
    ours = [line for line in result.stderr.splitlines() if line.startswith("finetune: ")]
    assert len(ours) == 1 and "Traceback" not in result.stderr, result.stderr
    return ours[0]


STOCK = "What is the difference between a stock and a bond?"  # data/raw/business_finance.jsonl:3
DEBIT = "What is the difference between a debit card and a credit card?"  # data/eval/heldout.jsonl:12


def test_one_instruction_with_two_responses_is_rejected_by_both_places_and_a_near_copy_of_a_held_out_row_is_listed(prefect_server, workspace):
    raw, heldout = workspace / "data/raw", workspace / "data/eval/heldout.jsonl"
    conflict = {"instruction": STOCK.lower().replace(" a ", "  a "), "response": "Stocks are loans and bonds are shares.", "topic": "business_finance"}
    near = {"instruction": DEBIT.replace("What is", "What's"), "response": "One spends your money, the other borrows.", "topic": "business_finance"}
    (raw / "conflict.jsonl").write_text(json.dumps(conflict) + "\n" + json.dumps(near) + "\n")

    result = _validate_command(workspace)

    assert result.returncode == 0, result.stderr
    assert "rejected: **2**" in result.stdout
    assert "Same instruction, different responses (1; data.conflicts: reject):" in result.stdout
    assert (
        f"`{raw}/business_finance.jsonl:3`: same instruction as {raw}/conflict.jsonl:1 with a different response; "
        "fix one of them, or set data.conflicts: keep_first or keep_all"
    ) in result.stdout
    assert f"`{raw}/conflict.jsonl:1`: same instruction as {raw}/business_finance.jsonl:3 with a different response" in result.stdout
    assert f"- `{raw}/conflict.jsonl:2` ~ `{heldout}:12` (0." in result.stdout

    line = _one_line(_run_command(workspace, "data.max_reject_share=0"))
    assert line.startswith("finetune: stage prepare failed: 2 of 106 rows rejected, over data.max_reject_share=0.0: ")
    assert f"{raw}/business_finance.jsonl:3 (same instruction as {raw}/conflict.jsonl:1 with a different response" in line

    for policy, rows, left_out in (("keep_first", 105, 1), ("keep_all", 106, 0)):
        out = prepare_dataset(prepare_inputs(raw, heldout, DataConfig(conflicts=policy)), workspace / policy)
        report = json.loads((out / "report.json").read_text())
        assert (report["train_rows"], report["rejected_rows"], report["conflicts_left_out"]) == (rows, 0, left_out)
        assert report["conflicts"] == [{"instruction": STOCK, "places": [f"{raw}/business_finance.jsonl:3", f"{raw}/conflict.jsonl:1"]}]
        [listed] = report["near_duplicates"]
        assert (listed["train"], listed["heldout"]) == (f"{raw}/conflict.jsonl:2", f"{heldout}:12") and 0.7 <= listed["similarity"] < 1


def test_a_file_no_reader_handles_stops_validate_and_run_before_anything_runs(prefect_server, workspace):
    raw = workspace / "data/raw"
    (raw / "pairs.jsonl.zst").write_bytes(b"(\xb5/\xfd compressed with a codec no reader has")

    for result in (_validate_command(workspace), _run_command(workspace)):
        assert result.returncode == 2
        assert _one_line(result) == "finetune: config error:"
        assert f"paths.raw_dir: {raw}: no reader for pairs.jsonl.zst; readable: .jsonl" in result.stderr
        assert "leave it out with data.exclude: ['.*', 'pairs.jsonl.zst']" in result.stderr

    assert _validate_command(workspace, "data.exclude=['.*', '*.zst']").returncode == 0


def test_a_held_out_row_of_several_exchanges_fails_by_place_through_run(prefect_server, workspace):
    heldout = workspace / "data/eval/heldout.jsonl"
    turns = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}] * 2
    heldout.write_text(json.dumps({"messages": turns[:2]}) + "\n" + json.dumps({"messages": turns}) + "\n")

    line = _one_line(_run_command(workspace))

    assert line.startswith(
        f"finetune: stage prepare failed: {heldout}:2: a held-out row is one exchange (evaluation asks one instruction), "
        "this one has 1 earlier exchange(s); keep conversations in the training data"
    )


def test_invisible_text_and_topics_outside_the_list_fail_validate_and_run_on_one_line_naming_the_keys(prefect_server, workspace):
    raw = workspace / "data/raw"
    rows = [
        {"instruction": "\u200b\u2060", "response": "An answer.", "topic": "education"},
        {"instruction": "How long do I boil an egg?", "response": "About nine minutes for a firm yolk.", "topic": "cooking"},
    ]
    (raw / "new.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    topics = "[business_finance, education, environment, health_wellness, science_technology]"
    limits = (f"data.topics={topics}", "data.max_reject_share=0")
    reasons = (
        f"{raw}/new.jsonl:1 (instruction is empty after trimming whitespace and invisible format characters",
        f"{raw}/new.jsonl:2 (topic is missing or not one of data.topics ['business_finance', 'education', 'environment', "
        "'health_wellness', 'science_technology']; data.topics: null accepts any topic)",
    )

    validate = _validate_command(workspace, *limits)
    run = _run_command(workspace, *limits)

    assert validate.returncode == run.returncode == 1
    for line, start in ((_one_line(validate), "finetune: data error: "), (_one_line(run), "finetune: stage prepare failed: ")):
        assert line.startswith(start + "2 of 106 rows rejected, over data.max_reject_share=0.0: ")
        assert all(reason in line for reason in reasons) and "Fix those rows or raise the limit." in line
