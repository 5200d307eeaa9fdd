import json

import pytest

from finetune.config import DataConfig, LoraConfig
from finetune.outputs import build_output, fingerprint, is_complete, stage_key


def test_key_depends_on_config_inputs_and_nothing_else(tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text("one\n")
    key = stage_key("s", ["finetune.outputs"], [LoraConfig()], [data])
    assert key == stage_key("s", ["finetune.outputs"], [LoraConfig()], [data])
    assert key != stage_key("s", ["finetune.outputs"], [LoraConfig(r=16)], [data])
    assert key != stage_key("t", ["finetune.outputs"], [LoraConfig()], [data])
    assert key != stage_key("s", ["finetune.prepare"], [LoraConfig()], [data])
    data.write_text("two\n")
    assert key != stage_key("s", ["finetune.outputs"], [LoraConfig()], [data])
    # The path itself is not part of the key: the same bytes elsewhere give the same key.
    moved = tmp_path / "b.jsonl"
    moved.write_text("one\n")
    assert key == stage_key("s", ["finetune.outputs"], [LoraConfig()], [moved])


def test_upstream_outputs_enter_keys_by_their_own_key(tmp_path):
    out = build_output(tmp_path, "up", "k1", lambda d: (d / "big.bin").write_bytes(b"x" * 10) and None)
    assert fingerprint(out) == "output:up:k1"


def test_build_output_writes_manifest_last_and_reuses(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        (out / "result.txt").write_text("done")
        return {"rows": 3}

    out = build_output(tmp_path, "stage", "abc", build)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["key"] == "abc" and manifest["rows"] == 3 and manifest["files"] == ["result.txt"]
    assert build_output(tmp_path, "stage", "abc", build) == out
    assert len(calls) == 1


def test_failed_build_leaves_nothing_that_looks_finished(tmp_path):
    def build(out):
        (out / "half.txt").write_text("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        build_output(tmp_path, "stage", "abc", build)
    assert not (tmp_path / "stage" / "abc").exists()
    assert [p.name for p in (tmp_path / "stage").iterdir() if not p.name.endswith(".lock")] == []


def test_folder_without_manifest_is_rebuilt(tmp_path):
    leftover = tmp_path / "stage" / "abc"
    leftover.mkdir(parents=True)
    (leftover / "stale.txt").write_text("stale")
    assert not is_complete(leftover)
    out = build_output(tmp_path, "stage", "abc", lambda d: (d / "fresh.txt").write_text("ok") and None)
    assert sorted(p.name for p in out.iterdir()) == ["fresh.txt", "manifest.json"]


def test_data_config_section_is_part_of_key(tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text("x\n")
    assert stage_key("p", ["finetune.prepare"], [DataConfig()], [data]) != stage_key(
        "p", ["finetune.prepare"], [DataConfig(max_chars=10)], [data]
    )
