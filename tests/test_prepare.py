import hashlib
import json
import shutil

import pandas as pd
import pytest

from finetune.core.config import DataConfig
from finetune.core.errors import MissingInputError
from finetune.stages.prepare import DataError, prepare_dataset
from tests.conftest import ROOT, prepare_inputs

TOPICS = ["science_technology", "health_wellness", "business_finance", "environment", "education"]


def _tree_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _row(instruction, response="A helpful answer of a few words.", topic="education"):
    return json.dumps({"instruction": instruction, "response": response, "topic": topic})


def test_default_data_passes_with_zero_rejects_and_raw_is_untouched(workspace):
    raw, heldout = workspace / "data/raw", workspace / "data/eval/heldout.jsonl"
    before = _tree_digest(raw)

    out = prepare_dataset(prepare_inputs(raw, heldout, DataConfig(topics=TOPICS)), workspace / "processed")

    report = json.loads((out / "report.json").read_text())
    assert (report["train_rows"], report["eval_rows"], report["rejected_rows"]) == (104, 25, 0)
    assert set(report["topics_train"]) == set(TOPICS)
    assert all(count >= 20 for count in report["topics_train"].values())
    assert all(count >= 5 for count in report["topics_eval"].values())
    train = pd.read_parquet(out / "train.parquet")
    assert list(train.columns) == ["instruction", "response", "history", "topic", "source_file", "source_line"]
    assert _tree_digest(raw) == before


def test_bad_rows_are_rejected_with_file_line_and_reason(workspace):
    raw = workspace / "data/raw"
    bad = raw / "extra.jsonl"
    bad.write_text(
        "\n".join([
            _row("   ", "An answer."),                           # line 1: blank instruction
            "{not json",                                         # line 2
            _row("Explain ### RESPONSE: markers"),               # line 3: template marker
            json.dumps({"prompt": "wrong field names"}),         # line 4
            _row("What is an unknown topic?", topic="cooking"),  # line 5
        ]) + "\n"
    )  # fmt: skip
    config = DataConfig(topics=TOPICS, max_reject_share=0.5)

    out = prepare_dataset(prepare_inputs(raw, workspace / "data/eval/heldout.jsonl", config), workspace / "processed")

    rejected = pd.read_parquet(out / "rejected.parquet")
    reasons = {int(r.source_line): r.reason for r in rejected.itertuples() if r.source_file == str(bad)}
    assert set(reasons) == {1, 2, 3, 4, 5}
    assert reasons[1].startswith("instruction is empty after trimming whitespace")
    assert "malformed JSON" in reasons[2]
    assert reasons[3].startswith("instruction contains a template marker")
    assert "missing field(s) ['instruction', 'response']" in reasons[4]
    assert reasons[5].startswith("topic is missing or not one of data.topics")
    assert len(pd.read_parquet(out / "train.parquet")) == 104


def test_duplicates_collapse_and_heldout_leaks_are_rejected(workspace):
    raw = workspace / "data/raw"
    first = json.loads((raw / "education.jsonl").read_text().splitlines()[0])
    leaked = json.loads((workspace / "data/eval/heldout.jsonl").read_text().splitlines()[0])
    (raw / "more.jsonl").write_text(
        json.dumps({**first, "instruction": "  " + first["instruction"].upper() + " "}) + "\n" + json.dumps(leaked) + "\n"
    )

    out = prepare_dataset(prepare_inputs(raw, workspace / "data/eval/heldout.jsonl", DataConfig()), workspace / "processed")

    report = json.loads((out / "report.json").read_text())
    assert report["duplicates_collapsed"] == 1
    assert report["rejected_rows"] == 1
    assert report["rejected_examples"][0]["reason"] == "instruction is in the held-out set"
    assert report["train_rows"] == 104


def test_too_many_rejects_fail_with_the_offending_lines(workspace):
    raw = workspace / "data/raw"
    (raw / "broken.jsonl").write_text("".join("{broken\n" for _ in range(10)))

    with pytest.raises(DataError, match=r"10 of 114 rows rejected.*broken.jsonl:1 \(malformed JSON"):
        prepare_dataset(prepare_inputs(raw, workspace / "data/eval/heldout.jsonl", DataConfig()), workspace / "processed")
    assert not (workspace / "processed" / "prepare").exists() or not any(
        p.name[0] != "." for p in (workspace / "processed" / "prepare").iterdir()
    )


def test_missing_inputs_are_clear_errors(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(MissingInputError, match="prepare: heldout_path .*h.jsonl does not exist"):
        prepare_dataset(prepare_inputs(tmp_path / "raw", tmp_path / "h.jsonl", DataConfig()), tmp_path / "out")
    with pytest.raises(DataError, match="no data files"):
        prepare_dataset(prepare_inputs(tmp_path / "raw", ROOT / "data/eval/heldout.jsonl", DataConfig()), tmp_path / "out")
    shutil.copy(ROOT / "data/raw/education.jsonl", tmp_path / "raw")
    (tmp_path / "bad.jsonl").write_bytes(b'{"instruction": "caf\xe9"}\n')
    shutil.copy(tmp_path / "bad.jsonl", tmp_path / "raw")
    out = prepare_dataset(prepare_inputs(tmp_path / "raw", ROOT / "data/eval/heldout.jsonl", DataConfig()), tmp_path / "out")
    rejected = pd.read_parquet(out / "rejected.parquet")
    assert rejected.reason.tolist() == ["not valid UTF-8 (byte 0xe9 at column 21)"]


def test_key_changes_with_data_and_config_only(workspace):
    raw, heldout = workspace / "data/raw", workspace / "data/eval/heldout.jsonl"
    key = prepare_dataset.key(prepare_inputs(raw, heldout, DataConfig()))
    assert key == prepare_dataset.key(prepare_inputs(raw, heldout, DataConfig()))
    assert key != prepare_dataset.key(prepare_inputs(raw, heldout, DataConfig(max_chars=100)))
    with (raw / "education.jsonl").open("a") as handle:
        handle.write(_row("A new question?") + "\n")
    assert key != prepare_dataset.key(prepare_inputs(raw, heldout, DataConfig()))


def test_an_empty_file_is_listed_with_no_rows_and_a_folder_of_empty_files_stops_prepare(workspace):
    """An upstream export with nothing new today is an empty file: listed with 0 rows, the night's run goes
    on. When every file is empty there is nothing to train on, and prepare says so."""
    raw, heldout = workspace / "data/raw", workspace / "data/eval/heldout.jsonl"
    (raw / "2026-12-02.jsonl").write_text("")

    out = prepare_dataset(prepare_inputs(raw, heldout), workspace / "processed")

    report = json.loads((out / "report.json").read_text())
    assert report["train_rows"] == 104
    assert {"file": str(raw / "2026-12-02.jsonl"), "rows": 0, "rejected": 0} in report["files"]
    assert "| 2026-12-02.jsonl | 0 | 0 |" in (out / "report.md").read_text()

    for path in raw.iterdir():
        path.write_text("")
    with pytest.raises(DataError, match=r"data/raw: no rows in any data file \(each is empty\); add pairs, or check the job"):
        prepare_dataset(prepare_inputs(raw, heldout), workspace / "processed")
