"""Stage `merge`: adapter + full-precision base -> one standalone safetensors model with its tokenizer.

The base is loaded in `merge.dtype` (16-bit by default), never 4-bit: folding the adapter into
quantized weights would round it away.

Parity check: base+adapter decodes the held-out prompts greedily; the merged model, in the same
precision, is fed the same tokens and must pick the same next token at every position. In 16-bit,
`W x + B A x` and `(W + B A) x` round differently: on the default run the logits differed by up to 0.9
in bf16 and flipped the top token only where the two best logits were within 0.25. So a disagreement
counts as a numerical tie when the reference's top-2 margin is under TIE_MARGIN for the dtype, and
anything else (a wrong scale, an adapter not merged) fails the stage before the model is saved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from finetune.config import MergeConfig, TokenizeConfig
from finetune.errors import PermanentError
from finetune.stage import Hooks, Stage
from finetune.template import PromptFormat
from finetune.tokenization import load_tokenizer

# Logit margin under which a top-1 disagreement is rounding, per dtype: about twice the largest tie
# flipped on the default run (bf16 0.25, fp16 0.016), and a fp32 floor.
TIE_MARGIN = {"bfloat16": 0.5, "float16": 0.05, "float32": 0.01}


class MergeParityError(PermanentError, RuntimeError):
    """The merged model does not reproduce base+adapter; the merged output is not written."""


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


def compare_logits(reference: list, merged: list, tie_margin: float) -> dict:
    positions = disagreements = beyond_ties = 0
    max_diff = 0.0
    for ref, mer in zip(reference, merged):
        top2 = ref.topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
        differ = ref.argmax(-1) != mer.argmax(-1)
        positions += len(ref)
        disagreements += int(differ.sum())
        beyond_ties += int((differ & (margin >= tie_margin)).sum())
        max_diff = max(max_diff, float((ref - mer).abs().max()))
    return {
        "positions": positions,
        "top1_disagreements": disagreements,
        "disagreements_beyond_ties": beyond_ties,
        "tie_margin": tie_margin,
        "max_logit_diff": round(max_diff, 4),
        "passed": beyond_ties == 0,
    }


def _merge(inputs: MergeInputs, key: str, out: Path, hooks: Hooks) -> dict:
    """Write model/ (merged weights + tokenizer, loadable with AutoModelForCausalLM) and parity.json."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.modeling import DTYPES, device_name, greedy_generate

    cfg = inputs.merge
    tokenizer = load_tokenizer(Path(inputs.model_dir))
    base = AutoModelForCausalLM.from_pretrained(inputs.model_dir, dtype=DTYPES[cfg.dtype.value]).to(device_name())
    model = PeftModel.from_pretrained(base, Path(inputs.train_dir) / "adapter")
    prompt = PromptFormat(inputs.tokenize.template)
    prompts = [prompt.prompt(text) for text in pd.read_parquet(Path(inputs.prepared_dir) / "eval.parquet").instruction]

    reference = greedy_generate(model, tokenizer, prompts, cfg.parity_max_new_tokens, batch_size=len(prompts))
    reference_logits = continuation_logits(model, tokenizer, prompts, reference)
    merged_model = model.merge_and_unload()
    merged_logits = continuation_logits(merged_model, tokenizer, prompts, reference)
    merged = greedy_generate(merged_model, tokenizer, prompts, cfg.parity_max_new_tokens, batch_size=len(prompts))
    parity = compare_logits(reference_logits, merged_logits, TIE_MARGIN[cfg.dtype.value])
    parity.update(
        dtype=cfg.dtype.value,
        prompts=len(prompts),
        max_new_tokens=cfg.parity_max_new_tokens,
        identical_greedy=sum(r == m for r, m in zip(reference, merged)),
    )
    (out / "parity.json").write_text(json.dumps(parity, indent=2), encoding="utf-8")
    if not parity["passed"]:
        raise MergeParityError(
            f"merged model picks another token than base+adapter at {parity['disagreements_beyond_ties']} of "
            f"{parity['positions']} positions where base+adapter was sure (top-2 margin >= {parity['tie_margin']}) "
            f"in {cfg.dtype.value}; the merge is wrong, nothing was saved"
        )
    merged_model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    hooks.logger.info("merged model: %d of %d greedy answers identical to base+adapter", parity["identical_greedy"], len(prompts))
    return {"parity_passed": True, "parity_identical_greedy": parity["identical_greedy"]}


merge_adapter = Stage("merge", MergeInputs, _merge, __name__)
