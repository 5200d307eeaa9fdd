import pytest

from finetune.core.config import ModelConfig
from finetune.stages.resolve import (
    HubUnreachableError,
    ModelResolutionError,
    ResolveInputs,
    resolve_model,
)


def test_builtin_model_resolves_to_safetensors_and_generates(builtin_resolution):
    """The embedded SmolLM2-135M-Instruct, converted from GGUF, answers a question coherently. transformers
    reads the file three times (tokenizer, config, weights) and parses it once (gguf_files.one_gguf_parse)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, parsed = builtin_resolution  # resolve_model(ResolveInputs.of(ModelConfig()), <a session folder>)
    assert parsed == ["SmolLM2-135M-Instruct.Q4_1.gguf"], f"transformers {transformers.__version__} parsed the GGUF file {len(parsed)} times"

    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert "quantization_config" not in (out / "config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, tied embeddings
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt")
    answer = tokenizer.decode(model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1]:])
    assert "Paris" in answer
    assert resolve_model(ResolveInputs.of(ModelConfig()), out.parent.parent) == out  # again: the finished output


def test_local_folder_is_linked_not_copied(tmp_path, tiny_model_dir):
    out = resolve_model(ResolveInputs.of(ModelConfig(base=str(tiny_model_dir))), tmp_path)
    assert (out / "config.json").is_symlink()
    assert (out / "model.safetensors").resolve() == (tiny_model_dir / "model.safetensors").resolve()


def test_unreachable_hub_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match="meta-llama/Llama-2-7b-chat-hf: the hub is not reachable"):
        resolve_model(ResolveInputs.of(ModelConfig(base="meta-llama/Llama-2-7b-chat-hf")), tmp_path)
    assert not any(p.name[0] != "." for p in (tmp_path / "resolve_model").iterdir())


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ("builtin:gpt-5", "unknown builtin model builtin:gpt-5"),
        ("./no/such/folder", "no such folder, and not a hub id"),
        ("just-a-name", "no such folder, and not a hub id"),
    ],
)
def test_bad_base_names_the_key(base, message, tmp_path):
    with pytest.raises(ModelResolutionError, match=message):
        resolve_model(ResolveInputs.of(ModelConfig(base=base)), tmp_path)
