import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from finetune.core.config import DataConfig, LoraConfig
from finetune.core.errors import InternalError, MissingInputError
from finetune.core.outputs import build_output, fingerprint, is_complete, stage_key


@dataclass(frozen=True, kw_only=True)
class Inputs:
    data_path: Path
    lora: LoraConfig


def test_key_depends_on_config_inputs_and_nothing_else(tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text("one\n")
    key = stage_key("s", "code", Inputs(data_path=data, lora=LoraConfig()))
    assert key == stage_key("s", "code", Inputs(data_path=data, lora=LoraConfig()))
    assert key != stage_key("s", "code", Inputs(data_path=data, lora=LoraConfig(r=16)))
    assert key != stage_key("t", "code", Inputs(data_path=data, lora=LoraConfig()))
    assert key != stage_key("s", "other code", Inputs(data_path=data, lora=LoraConfig()))
    data.write_text("two\n")
    assert key != stage_key("s", "code", Inputs(data_path=data, lora=LoraConfig()))
    # The path itself is not part of the key: the same bytes elsewhere give the same key.
    moved = tmp_path / "b.jsonl"
    moved.write_text("one\n")
    assert key == stage_key("s", "code", Inputs(data_path=moved, lora=LoraConfig()))


def test_a_missing_input_names_the_field(tmp_path):
    with pytest.raises(MissingInputError, match="s: data_path .*missing.jsonl does not exist"):
        stage_key("s", "code", Inputs(data_path=tmp_path / "missing.jsonl", lora=LoraConfig()))


def test_an_input_that_cannot_be_hashed_is_an_error():
    @dataclass(frozen=True)
    class Odd:
        thing: object

    with pytest.raises(InternalError, match="object cannot enter a key"):
        stage_key("s", "code", Odd(thing=object()))


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
    @dataclass(frozen=True)
    class PrepareLike:
        data: DataConfig

    assert stage_key("p", "code", PrepareLike(DataConfig())) != stage_key("p", "code", PrepareLike(DataConfig(max_chars=10)))


def _bytes_read() -> int:
    """Bytes this process has read through read() calls, page cache included (Linux /proc/self/io)."""
    return int(next(line.split()[1] for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar:")))


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io to count reads")
def test_a_large_unchanged_file_is_hashed_once_and_a_rewritten_one_again(tmp_path, monkeypatch):
    from finetune.core.outputs import DIGEST_CACHE_MIN_BYTES, fingerprint

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "digests"))
    weights = tmp_path / "model" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(os.urandom(DIGEST_CACHE_MIN_BYTES + 1))
    first = fingerprint(weights.parent)

    before = _bytes_read()
    assert fingerprint(weights.parent) == first
    assert _bytes_read() - before < DIGEST_CACHE_MIN_BYTES // 100  # the digest came from the cache

    with weights.open("r+b") as handle:  # same size, same folder, one byte changed
        handle.write(b"\x00" if handle.read(1) != b"\x00" else b"\x01")
    assert fingerprint(weights.parent) != first
