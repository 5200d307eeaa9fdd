"""Stage `merge`: adapter + full-precision base -> one standalone safetensors model with its tokenizer.

The base is loaded in `merge.dtype` (16-bit by default), never 4-bit: folding the adapter into
quantized weights would round it away. Before anything is saved, the merge is checked where it is
exact (every adapted layer's weights against W + (alpha/r)*B*A in fp32, within the dtype's rounding)
and where it is behaviour (logits against base+adapter's, within the dtype's own noise measured on the
same tokens); see finetune/training/merge_check.py. A wrong merge fails the stage naming the layer and how.

The saved tokenizer carries a chat template that renders a user turn exactly as training did, and the
generation config stops at the EOS that training taught, so tools that call `apply_chat_template`
prompt the model the way it was trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from finetune.core.config import MergeConfig, TokenizeConfig
from finetune.core.errors import PermanentError
from finetune.core.stage import Hooks, Stage
from finetune.data.template import PromptFormat
from finetune.stages.tokenize import load_tokenizer, set_chat_template


class MergeCheckError(PermanentError, RuntimeError):
    """The merged model is not base + adapter; the merged output is not written."""


@dataclass(frozen=True, kw_only=True)
class MergeInputs:
    train_dir: Path  # output of train: adapter/
    model_dir: Path  # output of resolve_model: the base, loaded in merge.dtype (never 4-bit)
    prepared_dir: Path  # output of prepare: held-out prompts for the parity check
    tokenize: TokenizeConfig
    merge: MergeConfig


def continuation_logits(model, tokenizer, prompts: list[str], continuations: list[list[int]]) -> list:
    """Logits that chose each continuation token, (new_tokens, vocab) per prompt, in float32."""
    import torch

    logits = []
    model.eval()
    for prompt, continuation in zip(prompts, continuations):
        prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        ids = torch.cat([prompt_ids, torch.tensor([continuation])], dim=1).to(model.device)
        with torch.inference_mode():
            # Position t predicts token t+1: the last prompt position predicts the first new token.
            logits.append(model(input_ids=ids).logits[0, prompt_ids.shape[1] - 1 : -1].float().cpu())
    return logits


def _base_with_adapter(inputs: MergeInputs, dtype: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.training.modeling import DTYPES, device_name

    base = AutoModelForCausalLM.from_pretrained(inputs.model_dir, dtype=DTYPES[dtype]).to(device_name())
    return PeftModel.from_pretrained(base, Path(inputs.train_dir) / "adapter")


def _failure(weights: dict, behaviour: dict, dtype: str) -> str:
    if weights["wrong_layers"]:
        listed = "; ".join(weights["wrong_layers"][:3])
        return f"merge check: {len(weights['wrong_layers'])} of {weights['layers']} adapted layers are wrong in {dtype}: {listed}; nothing was saved"
    return (
        f"merge check: the merged model's logits differ from base+adapter's in fp32 by {behaviour['mean_logit_diff']} "
        f"on average (largest per position), over the bar {behaviour['bar']} (three times {dtype}'s own noise on the same "
        f"tokens, {behaviour['dtype_noise_mean']}); nothing was saved"
    )


def _merge(inputs: MergeInputs, key: str, out: Path, hooks: Hooks) -> dict:
    """Write model/ (merged weights + tokenizer with the trained chat template) and merge_check.json."""
    from finetune.training.merge_check import check_behaviour, check_weights
    from finetune.training.modeling import greedy_generate

    dtype = inputs.merge.dtype.value
    tokenizer = load_tokenizer(Path(inputs.model_dir))
    prompt = PromptFormat(inputs.tokenize.template)
    prompts = [prompt.prompt(text) for text in pd.read_parquet(Path(inputs.prepared_dir) / "eval.parquet").instruction]

    model = _base_with_adapter(inputs, dtype)
    answers = greedy_generate(model, tokenizer, prompts, inputs.merge.parity_max_new_tokens, batch_size=len(prompts))
    reference = continuation_logits(model, tokenizer, prompts, answers)
    reference_fp32 = reference if dtype == "float32" else continuation_logits(_base_with_adapter(inputs, "float32"), tokenizer, prompts, answers)
    merged_model = model.merge_and_unload()
    weights = check_weights(merged_model.state_dict(), Path(inputs.model_dir), Path(inputs.train_dir) / "adapter", dtype)
    behaviour = check_behaviour(reference, continuation_logits(merged_model, tokenizer, prompts, answers), reference_fp32)
    check = {"dtype": dtype, "prompts": len(prompts), "weights": weights, "behaviour": behaviour}
    (out / "merge_check.json").write_text(json.dumps(check, indent=2), encoding="utf-8")
    if not (weights["passed"] and behaviour["passed"]):
        raise MergeCheckError(_failure(weights, behaviour, dtype))

    set_chat_template(tokenizer, inputs.tokenize.template)
    merged_model.generation_config.eos_token_id = tokenizer.eos_token_id  # stop where training taught it to
    merged_model.generation_config.pad_token_id = tokenizer.pad_token_id
    merged_model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    hooks.logger.info(
        "merge check passed: weights at %.3g of the rounding bound; logits %s from base+adapter in fp32 (bar %s)",
        weights["error_to_rounding_bound"], behaviour["mean_logit_diff"], behaviour["bar"],
    )  # fmt: skip
    return {"largest_weight_error": weights["largest_weight_error"], "mean_logit_diff": behaviour["mean_logit_diff"]}


merge_adapter = Stage("merge", MergeInputs, _merge, __name__, reached_through=("tokenizers",))
