"""What changed in the data since the champion: rows matched by content, files, rejects by reason, topic
and token-length shifts, between two real prepare and tokenize outputs of edited copies of the data."""

from __future__ import annotations

import json
import shutil

import numpy as np

from finetune.core.config import load_config
from finetune.reporting.data_changes import changes_markdown, data_changes, ks_statistic, reason_kind
from tests.conftest import ROOT, tokenized_data, workspace_overrides


def _data(root, tiny_model_dir, edit) -> tuple:
    shutil.copytree(ROOT / "data" / "raw", root / "data" / "raw")
    shutil.copytree(ROOT / "data" / "eval", root / "data" / "eval")
    edit(root / "data" / "raw")
    config = load_config(ROOT / "configs" / "tiny.yaml", [*workspace_overrides(root), f"model.base={tiny_model_dir}"])
    return tokenized_data(config, tiny_model_dir, root / "out")


def test_rows_files_rejects_topics_and_lengths_since_the_champion(tmp_path, tiny_model_dir):
    def then(raw):
        (raw / "extra.jsonl").write_text('{"instruction": "   ", "response": "x", "topic": "education"}\n')  # one reject

    def now(raw):
        (raw / "environment.jsonl").unlink()  # 21 rows removed with their file
        lines = (raw / "education.jsonl").read_text().splitlines()
        edited = json.loads(lines[4])
        edited["response"] += " Practice it every day for a month."  # one response edited
        moved = lines.pop(7)  # one row moved to another file: unchanged
        (raw / "education.jsonl").write_text("\n".join([*lines[:4], json.dumps(edited), *lines[5:]]) + "\n")
        new = [{"instruction": f"How do I plan a week of study {n}?", "response": "List the subjects, then give each a slot.",
                "topic": "education"} for n in range(3)]  # fmt: skip
        (raw / "new.jsonl").write_text("\n".join([moved, *map(json.dumps, new)]) + "\n")
        (raw / "broken.jsonl").write_text('{"instruction": "What is rain?",\n{"instruction": "What is snow?",\n')  # two rejects

    champion = _data(tmp_path / "then", tiny_model_dir, then)
    current = _data(tmp_path / "now", tiny_model_dir, now)
    changes = data_changes(current, champion, "run-1")

    assert changes["rows"] == {"then": 104, "now": 104 - 21 + 3, "added": 3, "removed": 21, "edited": 1}
    raw_now = tmp_path / "now" / "data" / "raw"
    assert changes["files"] == {"added": ["new.jsonl"], "removed": ["environment.jsonl"], "changed": ["education.jsonl"]}  # broken.jsonl kept no row
    assert changes["examples"]["edited"] == [f"{raw_now / 'education.jsonl'}:5"]
    empty = "instruction is empty after trimming whitespace and invisible format characters (zero-width spaces and joiners, soft hyphens, direction marks)"
    assert changes["rejects"][empty] == {"then": 1, "now": 0}
    assert all(kind.startswith("malformed JSON: ") and kind.endswith("at column N") for kind in changes["rejects"] if kind != empty)
    assert sum(c["now"] for c in changes["rejects"].values()) == 2 and sum(c["then"] for c in changes["rejects"].values()) == 1
    assert changes["topics"]["environment"] == {"then": round(21 / 104, 4), "now": 0.0}
    assert 0.2 < changes["topic_shift"] < 0.3  # mostly environment's fifth leaving
    assert changes["lengths"]["then"]["mean"] > 0 and 0 <= changes["lengths"]["ks"] <= 1

    same = data_changes(champion, champion, "run-1")
    assert same["rows"]["added"] == same["rows"]["removed"] == same["rows"]["edited"] == 0
    assert (same["topic_shift"], same["lengths"]["ks"], same["files"]) == (0.0, 0.0, {"added": [], "removed": [], "changed": []})
    report = changes_markdown(changes)
    assert "**3 added, 21 removed, 1 edited**" in report and "Kolmogorov-Smirnov statistic" in report


def test_the_size_of_a_shift():
    assert ks_statistic(np.array([1, 2, 3]), np.array([1, 2, 3])) == 0.0
    assert ks_statistic(np.array([1, 2]), np.array([3, 4])) == 1.0
    assert ks_statistic(np.array([1, 2, 3, 4]), np.array([3, 4, 5, 6])) == 0.5
    assert reason_kind("same instruction as /data/a.jsonl:3 with a different response; fix one") == "same instruction as <place> with a different response"
