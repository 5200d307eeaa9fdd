"""The merge check trusts correct merges and fails wrong ones, naming the layer and what is wrong."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.core.config import load_config
from finetune.stages.merge import MergeInputs, merge_adapter
from finetune.stages.train import train_adapter
from finetune.training.merge_check import adapter_updates, check_weights
from tests.conftest import ROOT, tokenized_data, train_inputs, workspace_overrides

# Thirty times tiny.yaml's learning rate and four times its alpha: an adapter that moves logits a lot (its largest
# logit shift 1.35 after one epoch of 13 steps, 1.48 after two).
HARD = ["train.epochs=1", "train.learning_rate=3e-2", "lora.alpha=128", "merge.dtype=bfloat16", "train.save_every_steps=100"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    import shutil

    workspace = tmp_path_factory.mktemp("merge")
    shutil.copytree(ROOT / "data" / "raw", workspace / "data" / "raw")
    shutil.copytree(ROOT / "data" / "eval", workspace / "data" / "eval")
    config = load_config(ROOT / "configs" / "tiny.yaml", [*workspace_overrides(workspace), *HARD])
    root = workspace / "out"
    prepared_dir, tokenized_dir = tokenized_data(config, tiny_model_dir, root)
    train_dir = train_adapter(train_inputs(config, tokenized_dir, tiny_model_dir), root)
    inputs = MergeInputs(train_dir=train_dir, model_dir=tiny_model_dir, prepared_dir=prepared_dir, tokenize=config.tokenize, merge=config.merge)
    return inputs, root


def _logit_shift(inputs: MergeInputs) -> float:
    """Largest change the adapter makes to any logit of a held-out prompt."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.stages.tokenize import load_tokenizer

    tokenizer = load_tokenizer(inputs.model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(inputs.model_dir), inputs.train_dir / "adapter").eval()
    ids = tokenizer("### HUMAN:\nWhat is a budget?\n\n### RESPONSE:\n", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    return float((tuned - base).abs().max())


def test_a_correct_merge_of_a_strongly_trained_adapter_passes_in_bf16(trained):
    inputs, root = trained
    assert _logit_shift(inputs) > 1.0  # twice and more the fixed tie margin (0.5) that failed correct merges

    out = merge_adapter(inputs, root)

    check = json.loads((out / "merge_check.json").read_text())
    assert check["dtype"] == "bfloat16" and check["weights"]["passed"] and check["behaviour"]["passed"]
    assert check["weights"]["layers"] == 2 * 4  # 2 layers x q/k/v/o
    assert check["behaviour"]["mean_logit_diff"] <= check["behaviour"]["bar"]
    assert check["weights"]["error_to_rounding_bound"] < 1.0
    assert (out / "model" / "model.safetensors").is_file()


def _corrupted(inputs: MergeInputs, how: str, module: str) -> dict[str, torch.Tensor]:
    """The merged weights as a correct merge makes them, with one layer merged wrongly."""
    from safetensors.torch import load_file

    base = load_file(inputs.model_dir / "model.safetensors")
    updates = adapter_updates(inputs.train_dir / "adapter")
    state = {}
    for name, update in updates.items():
        wrong = {"scale": 2 * update, "missing": 0 * update, "transposed": update.T}[how] if name == module else update
        state[f"{name}.weight"] = (base[f"{name}.weight"].float() + wrong).to(torch.bfloat16)
    return state


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("scale", "the update is scaled 2x (expected alpha/r once)"),
        ("missing", "the update is missing (layer not merged)"),
        ("transposed", "the update is transposed"),
    ],
)
def test_a_wrong_merge_fails_naming_the_layer_and_what_is_wrong(trained, how, message):
    inputs, _ = trained
    module = "model.layers.1.self_attn.q_proj"  # square (64 x 64), so a transposed update fits

    result = check_weights(_corrupted(inputs, how, module), inputs.model_dir, inputs.train_dir / "adapter", "bfloat16")

    assert not result["passed"]
    assert result["wrong_layers"] == [f"{module}: {message}"]


def test_the_same_weights_merged_correctly_pass(trained):
    inputs, _ = trained
    result = check_weights(_corrupted(inputs, "scale", "none"), inputs.model_dir, inputs.train_dir / "adapter", "bfloat16")
    assert result["passed"] and result["error_to_rounding_bound"] <= 1.0


def test_behaviour_beyond_the_dtypes_own_noise_fails():
    from finetune.training.merge_check import check_behaviour

    torch.manual_seed(0)
    exact = [torch.randn(8, 50) for _ in range(3)]
    rounded = [x + 0.01 * torch.randn_like(x) for x in exact]  # the dtype's noise
    assert check_behaviour(rounded, [x + 0.01 * torch.randn_like(x) for x in exact], exact)["passed"]
    wrong = [x + 0.2 * torch.randn_like(x) for x in exact]  # a merged model that computes something else
    result = check_behaviour(rounded, wrong, exact)
    assert not result["passed"] and result["mean_logit_diff"] > result["bar"]


def test_the_fp32_reference_cast_in_place_is_an_fp32_load_and_gives_the_weights_back(trained, tmp_path):
    """A base stored in bf16: the fp32 reference computed by casting the loaded bf16 model up in place equals
    the one from loading the files again in fp32, and the model's weights come back bit for bit."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from finetune.stages.merge import _base_with_adapter, _stored_dtype, continuation_logits, fp32_logits
    from finetune.stages.tokenize import load_tokenizer

    inputs, _ = trained
    bf16_dir = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(inputs.model_dir, dtype=torch.bfloat16).save_pretrained(bf16_dir)
    load_tokenizer(inputs.model_dir).save_pretrained(bf16_dir)
    inputs = replace(inputs, model_dir=bf16_dir)
    assert _stored_dtype(bf16_dir) == "bfloat16" and _stored_dtype(trained[0].model_dir) == "float32"
    tokenizer = load_tokenizer(bf16_dir)
    prompts = ["### HUMAN:\nWhat is a budget?\n\n### RESPONSE:\n", "### HUMAN:\nWhy recycle?\n\n### RESPONSE:\n"]
    answers = [tokenizer("A plan for money.", add_special_tokens=False)["input_ids"], tokenizer("It saves", add_special_tokens=False)["input_ids"]]

    model = _base_with_adapter(inputs, "bfloat16")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    in_place = fp32_logits(inputs, model, "bfloat16", tokenizer, prompts, answers)
    reloaded = continuation_logits(_base_with_adapter(inputs, "float32"), tokenizer, prompts, answers)

    assert all(torch.equal(a, b) for a, b in zip(in_place, reloaded))
    after = model.state_dict()
    assert all(after[name].dtype == tensor.dtype and torch.equal(after[name], tensor) for name, tensor in before.items())
    bf16 = continuation_logits(model, tokenizer, prompts, answers)
    assert max(float((a - b).abs().max()) for a, b in zip(bf16, in_place)) > 0  # the check compares two precisions
