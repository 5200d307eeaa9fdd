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
from finetune.core.measure import Laps
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


CHECK_PROMPTS = 32  # held-out prompts the merge and export checks answer: a wrong layer moves every position


def check_prompts(prepared_dir: Path, template: str) -> list[str]:
    """The first CHECK_PROMPTS held-out instructions in the training prompt format: the checks stay seconds
    long when the held-out set has thousands of prompts."""
    rows = pd.read_parquet(Path(prepared_dir) / "eval.parquet").instruction.head(CHECK_PROMPTS)
    return [PromptFormat(template).prompt(text) for text in rows]


def continuation_logits(model, tokenizer, prompts: list[str], continuations: list[list[int]]) -> list:
    """Logits that chose each continuation token, (new_tokens, vocab) per prompt, in float32."""
    import torch

    from finetune.training.modeling import inference_attention

    logits = []
    model.eval()
    for prompt, continuation in zip(prompts, continuations):
        prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        ids = torch.cat([prompt_ids, torch.tensor([continuation])], dim=1).to(model.device)
        with torch.inference_mode(), inference_attention():
            # Position t predicts token t+1: the last prompt position predicts the first new token.
            logits.append(model(input_ids=ids).logits[0, prompt_ids.shape[1] - 1 : -1].float().cpu())
    return logits


def _base_with_adapter(inputs: MergeInputs, dtype: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.training.modeling import DTYPES, device_name

    # Placed while loading: no whole copy in host memory first.
    base = AutoModelForCausalLM.from_pretrained(inputs.model_dir, dtype=DTYPES[dtype], device_map={"": device_name()})
    return PeftModel.from_pretrained(base, Path(inputs.train_dir) / "adapter")


def _stored_dtype(model_dir: Path) -> str | None:
    """The dtype the base's weights are saved in (float32, bfloat16, float16), from its first safetensors file."""
    from safetensors import safe_open

    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                if name.endswith("_proj.weight"):
                    return names.get(handle.get_slice(name).get_dtype())
    return None


def fp32_logits(inputs: MergeInputs, model, dtype: str, tokenizer, prompts: list[str], answers: list[list[int]]) -> list:
    """Base+adapter's logits in fp32. When the base is stored in the merge dtype, the loaded model is cast
    to fp32 in place and back: 16-bit values are exact in fp32, so it computes what an fp32 load of the same
    files would, and the round trip returns the very same weights (no second copy of the model is loaded).
    A base stored in more precision than the merge dtype is loaded again in fp32 and freed after use."""
    if _stored_dtype(Path(inputs.model_dir)) != dtype:
        return continuation_logits(_base_with_adapter(inputs, "float32"), tokenizer, prompts, answers)
    import torch

    held = [*model.parameters(), *model.buffers()]
    dtypes = [tensor.dtype for tensor in held]
    try:
        for tensor in held:
            tensor.data = tensor.data.float()
        return continuation_logits(model, tokenizer, prompts, answers)
    finally:
        for tensor, original in zip(held, dtypes):
            tensor.data = tensor.data.to(original)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2), encoding="utf-8")


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

    laps = Laps()
    dtype = inputs.merge.dtype.value
    tokenizer = load_tokenizer(Path(inputs.model_dir))
    prompts = check_prompts(Path(inputs.prepared_dir), inputs.tokenize.template)

    model = _base_with_adapter(inputs, dtype)
    laps.lap("load")
    answers = greedy_generate(model, tokenizer, prompts, inputs.merge.parity_max_new_tokens, batch_size=len(prompts))
    laps.lap("generate")
    reference = continuation_logits(model, tokenizer, prompts, answers)
    laps.lap("logits")
    reference_fp32 = reference if dtype == "float32" else fp32_logits(inputs, model, dtype, tokenizer, prompts, answers)
    laps.lap("logits_fp32")
    merged_model = model.merge_and_unload()
    laps.lap("merge")
    weights = check_weights(merged_model.state_dict(), Path(inputs.model_dir), Path(inputs.train_dir) / "adapter", dtype)
    laps.lap("check_weights")
    behaviour = check_behaviour(reference, continuation_logits(merged_model, tokenizer, prompts, answers), reference_fp32)
    laps.lap("check_behaviour")
    check = {"dtype": dtype, "prompts": len(prompts), "weights": weights, "behaviour": behaviour, "seconds": laps.seconds}
    write_json(out / "merge_check.json", check)
    if not (weights["passed"] and behaviour["passed"]):
        raise MergeCheckError(_failure(weights, behaviour, dtype))

    set_chat_template(tokenizer, inputs.tokenize.template)
    merged_model.generation_config.eos_token_id = tokenizer.eos_token_id  # stop where training taught it to
    merged_model.generation_config.pad_token_id = tokenizer.pad_token_id
    merged_model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    laps.lap("save")
    write_json(out / "merge_check.json", check)
    hooks.logger.info(
        "merge check passed: weights at %.3g of the rounding bound; logits %s from base+adapter in fp32 (bar %s)",
        weights["error_to_rounding_bound"], behaviour["mean_logit_diff"], behaviour["bar"],
    )  # fmt: skip
    return {"largest_weight_error": weights["largest_weight_error"], "mean_logit_diff": behaviour["mean_logit_diff"]}


merge_adapter = Stage("merge", MergeInputs, _merge, __name__, reached_through=("tokenizers",))
