"""GGUF export of a finished run: the files llama.cpp's converter writes are read back by transformers
and must give the merged model's answers; the Modelfile renders the trained format in Ollama's own
template language; `finetune push` stops with a clear error when no hub is reachable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from finetune.core.config import ExportConfig, load_config
from finetune.stages.export import (
    ExportError,
    ExportInputs,
    export_gguf,
    gguf_metadata,
    ollama_modelfile,
)
from finetune.stages.tokenize import load_tokenizer
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
TINY = ROOT / "configs" / "tiny.yaml"


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], cwd=ROOT, env={**environment, **(env or {})},
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def _stages(record: dict) -> tuple[Path, Path]:
    return Path(record["stages"]["merge"]["output_dir"]), Path(record["stages"]["prepare"]["output_dir"])


def test_finetune_export_writes_bf16_and_q8_0_files_that_read_back_as_the_merged_model(tiny_flow_run):
    record, overrides, _ = tiny_flow_run
    sets = [arg for item in [*overrides, "export.gguf=[bf16, q8_0]"] for arg in ("--set", item)]

    result = _cli("export", "--config", str(TINY), "--run", record["run_name"], *sets)

    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip().splitlines()[-1].split(" -f ")[1]).parent
    check = json.loads((folder / "export_check.json").read_text())
    assert [f["file"] for f in check["files"]] == ["model-bf16.gguf", "model-q8_0.gguf"]
    tokenizer = load_tokenizer(_stages(record)[0] / "model")
    for entry in check["files"]:
        assert entry["passed"] and entry["chat_template_is_trained"] and entry["eos_is_trained"]
        assert entry["bar"] == 0.95 and entry["token_agreement"] >= 0.95  # the tiny merge is float32: both types round
        assert gguf_metadata(folder / entry["file"]) == {"chat_template": tokenizer.chat_template, "eos_token_id": tokenizer.eos_token_id}
        assert f"{folder / entry['file']}  {entry['bytes'] / 1e6:.1f} MB" in result.stdout
    assert (folder / "Modelfile").read_text().startswith("FROM ./model-bf16.gguf\n")


def test_a_file_that_does_not_read_back_as_the_merged_model_fails_the_stage_and_leaves_nothing(tiny_flow_run, tmp_path, monkeypatch):
    import gguf

    record, overrides, _ = tiny_flow_run
    merged_dir, prepared_dir = _stages(record)
    config = load_config(TINY, overrides)
    exact = ExportInputs(merged_dir=merged_dir, prepared_dir=prepared_dir, template=config.tokenize.template, export=ExportConfig(gguf=["f32"]))
    parsed = []  # the GGUF files transformers' loader parsed (gguf_files.one_gguf_parse: once each, not for config and weights)

    class CountedReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            parsed.append(Path(path).name)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountedReader)

    f32 = json.loads((export_gguf(exact, tmp_path / "ok") / "export_check.json").read_text())["files"][0]
    assert (f32["bar"], f32["token_agreement"], f32["same_answers"]) == (1.0, 1.0, f32["answers"])  # f32 holds a float32 merge as is
    assert parsed == ["model-f32.gguf"], f"transformers {transformers.__version__} parsed the GGUF file {len(parsed)} times (gguf_files.one_gguf_parse)"

    untemplated = tmp_path / "merged-elsewhere"  # a merged folder saved without the trained chat template
    shutil.copytree(merged_dir / "model", untemplated / "model")
    (untemplated / "model" / "chat_template.jinja").unlink()
    tokenizer_config = json.loads((untemplated / "model" / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (untemplated / "model" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    inputs = ExportInputs(merged_dir=untemplated, prepared_dir=prepared_dir, template=config.tokenize.template, export=ExportConfig(gguf=["q8_0"]))
    with pytest.raises(ExportError, match=r"model-q8_0.gguf: the GGUF metadata does not hold the trained chat template and EOS; nothing was exported"):
        export_gguf(inputs, tmp_path / "failed")
    assert parsed == ["model-f32.gguf"]  # the metadata failed the file before its weights were read
    assert [p.name for p in (tmp_path / "failed").rglob("*") if not p.name.startswith(".")] == ["export"]  # no finished folder


CHAT = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "What is rain?"},
    {"role": "assistant", "content": "Water falling from clouds."},
    {"role": "user", "content": "Why does it fall?"},
]
GO_RENDER = """package main

import ("encoding/json"; "os"; "text/template")

type Message struct { Role string `json:"role"`; Content string `json:"content"` }

func main() {
    var messages []Message
    if err := json.Unmarshal([]byte(os.Args[2]), &messages); err != nil { panic(err) }
    t := template.Must(template.New("modelfile").Parse(os.Args[1]))
    if err := t.Execute(os.Stdout, map[string]any{"Messages": messages}); err != nil { panic(err) }
}
"""


@pytest.mark.parametrize("template", ["### HUMAN:\n{instruction}\n\n### RESPONSE:\n", "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"])
def test_the_modelfile_template_renders_in_go_what_the_saved_chat_template_renders(tiny_model_dir, tmp_path, template):
    from finetune.stages.tokenize import set_chat_template

    if shutil.which("go") is None:
        if os.environ.get("FINETUNE_REQUIRE_GO"):
            pytest.fail("FINETUNE_REQUIRE_GO is set but Go is not installed (apt-get install golang-go)")
        pytest.skip("Go renders Ollama's templates; not installed here")
    tokenizer = load_tokenizer(tiny_model_dir)
    set_chat_template(tokenizer, template)
    modelfile = ollama_modelfile("model-q8_0.gguf", template, tokenizer.eos_token)
    go_template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    (tmp_path / "render.go").write_text(GO_RENDER)

    rendered = subprocess.run(["go", "run", str(tmp_path / "render.go"), go_template, json.dumps(CHAT)], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOFLAGS": "-mod=mod"})  # fmt: skip

    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout == tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert f"PARAMETER stop {json.dumps(tokenizer.eos_token)}" in modelfile


def test_push_names_the_hub_it_could_not_reach_and_never_the_token(tiny_flow_run, tmp_path):
    record, overrides, _ = tiny_flow_run
    sets = [arg for item in overrides for arg in ("--set", item)]
    secret = "hf_NotARealToken0123456789"

    unreachable = _cli("push", "--config", str(TINY), "--run", record["run_name"], "--repo", "someone/tiny", *sets,
                       env={"HF_TOKEN": secret, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"})  # fmt: skip
    no_token = _cli("push", "--config", str(TINY), "--run", record["run_name"], "--repo", "someone/tiny", *sets, env={"HF_TOKEN": ""})

    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("finetune: push failed: someone/tiny at http://127.0.0.1:9: ConnectError: ")
    assert "nothing was uploaded" in unreachable.stderr
    assert secret not in unreachable.stdout + unreachable.stderr
    assert (no_token.returncode, no_token.stderr.strip()) == (1, "finetune: push failed: no hub token: set HF_TOKEN to a token with write "
                                                              "access, or model.token_secret to a Prefect Secret block holding one")  # fmt: skip


def test_a_run_with_export_gguf_exports_after_merge_and_its_run_card_lists_the_files(tiny_flow_run):
    from flows.finetune_flow import finetune

    _, overrides, _ = tiny_flow_run

    record = finetune(str(TINY), [*overrides, "export.gguf=[bf16, q8_0]"])  # the files `finetune export` made above, if it ran

    assert record["status"] == "completed"
    assert [name for name in record["stages"]][-3:] == ["merge", "export", "score"]
    assert all(record["stages"][name]["state"] == "cached" for name in ("prepare", "tokenize", "train", "evaluate", "merge"))
    folder = Path(record["stages"]["export"]["output_dir"])
    assert [entry["file"] for entry in record["metrics"]["exported"]] == ["model-bf16.gguf", "model-q8_0.gguf"]
    card = (Path(record["run_dir"]) / "run_card.md").read_text()
    assert f"GGUF export (`{folder}`, with a Modelfile for `ollama create`):" in card
    for entry in record["metrics"]["exported"]:
        assert f"| {entry['file']} | {entry['bytes'] / 1e6:.1f} MB | {100 * entry['token_agreement']:.1f}% | " in card
    assert card.count("passed (bar 95%)") == 2


def test_gguf_metadata_reads_the_header_as_the_gguf_package_does(tmp_path):
    """gguf_metadata reads the chat template and EOS id from a GGUF header without building every field: on a file
    written by the gguf package, with a vocabulary of strings, a numeric array, an array of arrays and scalars of
    other types before the keys, it finds what the package's own reader finds; None where a key is absent, and a
    clear error for a file that is not GGUF."""
    from gguf import GGUFReader, GGUFWriter

    def write(path: Path, with_template: bool) -> Path:
        writer = GGUFWriter(str(path), "llama")
        writer.add_uint64("test.big", 2**40)
        writer.add_float32("test.float", 0.5)
        writer.add_bool("test.flag", True)
        writer.add_array("test.nested", [[1, 2], [3]])
        writer.add_token_list([f"tok{i}" for i in range(300)] + ["ünï", ""])
        writer.add_token_scores([float(i) for i in range(302)])
        writer.add_eos_token_id(301)
        if with_template:
            writer.add_chat_template("{% for m in messages %}### HUMAN:\n{{ m['content'] }}{% endfor %}")
        writer.add_string("general.after", "x" * 10)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    full = write(tmp_path / "full.gguf", with_template=True)
    fields = GGUFReader(full).fields
    template = fields["tokenizer.chat_template"]
    eos = fields["tokenizer.ggml.eos_token_id"]
    assert gguf_metadata(full) == {
        "chat_template": bytes(template.parts[template.data[0]]).decode("utf-8"),
        "eos_token_id": int(eos.parts[eos.data[0]][0]),
    } == {"chat_template": "{% for m in messages %}### HUMAN:\n{{ m['content'] }}{% endfor %}", "eos_token_id": 301}
    assert gguf_metadata(write(tmp_path / "bare.gguf", with_template=False)) == {"chat_template": None, "eos_token_id": 301}
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(ExportError, match=r"^not.gguf is not a GGUF file of version 2 or later"):
        gguf_metadata(tmp_path / "not.gguf")
