"""Stage `merge`: adapter + full-precision base -> one standalone safetensors model with its tokenizer.

The base is loaded in `merge.dtype` (16-bit by default), never 4-bit: folding the adapter into
quantized weights would round it away. The parity check compares greedy outputs of the merged model
with base+adapter in the same precision on the held-out prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from finetune.config import MergeConfig, TokenizeConfig
from finetune.outputs import build_output, stage_key
from finetune.tokenization import format_prompt

STAGE = "merge"
MODULES = [__name__, "finetune.modeling"]


class MergeParityError(RuntimeError):
    """The merged model does not reproduce base+adapter; the merged output is not written."""


def merge_key(adapter_dir: Path, model_dir: Path, prepared_dir: Path, tokenize: TokenizeConfig, cfg: MergeConfig) -> str:
    return stage_key(STAGE, MODULES, [tokenize, cfg], [Path(adapter_dir), Path(model_dir), Path(prepared_dir)])


def merge_adapter(
    adapter_dir: Path, model_dir: Path, prepared_dir: Path, tokenize: TokenizeConfig, cfg: MergeConfig, root: Path
) -> Path:
    """Write model/ (merged weights + tokenizer, loadable with AutoModelForCausalLM) and parity.json."""

    def build(out: Path) -> dict:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from finetune.modeling import DTYPES, device_name, greedy_generate

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[cfg.dtype.value]).to(device_name())
        model = PeftModel.from_pretrained(base, Path(adapter_dir) / "adapter")
        instructions = pd.read_parquet(Path(prepared_dir) / "eval.parquet").instruction
        prompts = [format_prompt(tokenize.template, text) for text in instructions]

        unmerged = greedy_generate(model, tokenizer, prompts, cfg.parity_max_new_tokens, batch_size=len(prompts))
        merged_model = model.merge_and_unload()
        merged = greedy_generate(merged_model, tokenizer, prompts, cfg.parity_max_new_tokens, batch_size=len(prompts))

        # Tokens agreeing before the first difference, per prompt.
        agree = [next((i for i, (a, b) in enumerate(zip(u, m)) if a != b), min(len(u), len(m))) for u, m in zip(unmerged, merged)]
        identical = sum(u == m for u, m in zip(unmerged, merged))
        parity = {
            "dtype": cfg.dtype.value,
            "prompts": len(prompts),
            "identical": identical,
            "max_new_tokens": cfg.parity_max_new_tokens,
            "min_agreeing_tokens": min(agree),
            "passed": identical == len(prompts),
        }
        (out / "parity.json").write_text(json.dumps(parity, indent=2), encoding="utf-8")
        if not parity["passed"]:
            raise MergeParityError(
                f"merged model differs from base+adapter on {len(prompts) - identical} of {len(prompts)} prompts "
                f"(first difference after {min(agree)} tokens) in {cfg.dtype.value}; try merge.dtype=float32"
            )
        merged_model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        return {"parity_identical": identical, "parity_prompts": len(prompts)}

    return build_output(root, STAGE, merge_key(adapter_dir, model_dir, prepared_dir, tokenize, cfg), build)
