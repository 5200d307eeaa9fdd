"""Stage `tokenize`: prepared splits -> token ids and labels, prompt tokens masked with -100.

Prompt and response are tokenized separately and joined, so the prompt tokens are exactly what the
model sees at generation time, and the loss mask cannot drift across a merged token at the boundary.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from finetune.config import LossOn, TokenizeConfig
from finetune.outputs import build_output, stage_key

STAGE = "tokenize"
IGNORE_INDEX = -100  # labels with this value are left out of the loss (PyTorch cross-entropy convention)


def format_prompt(template: str, instruction: str) -> str:
    return template.replace("{instruction}", instruction)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{model_dir}: tokenizer has no EOS token; the template needs one to end answers")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of the loss; EOS still trains
    return tokenizer


def encode_example(tokenizer, template: str, instruction: str, response: str, loss_on: LossOn) -> dict[str, list[int]]:
    prompt_ids = tokenizer(format_prompt(template, instruction), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = prompt_ids + response_ids
    if loss_on == LossOn.full:
        labels = list(input_ids)
    else:
        labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return {"input_ids": input_ids, "labels": labels, "prompt_length": len(prompt_ids)}


def _encode_split(tokenizer, frame: pd.DataFrame, cfg: TokenizeConfig) -> tuple[pd.DataFrame, dict]:
    encoded = pd.DataFrame(
        [encode_example(tokenizer, cfg.template, row.instruction, row.response, cfg.loss_on) for row in frame.itertuples()]
    )
    lengths = encoded.input_ids.str.len()
    over = lengths > cfg.max_length
    kept = encoded[~over].reset_index(drop=True)
    trained = kept.labels.map(lambda labels: sum(1 for t in labels if t != IGNORE_INDEX))
    stats = {
        "examples": len(kept),
        "dropped_over_max_length": int(over.sum()),
        "tokens_total": int(kept.input_ids.str.len().sum()),
        "tokens_trained": int(trained.sum()),
        "length_mean": round(float(lengths.mean()), 1),
        "length_max": int(lengths.max()),
        "length_p95": int(lengths.quantile(0.95)),
    }
    return kept, stats


def tokenize_key(prepared_dir: Path, model_dir: Path, cfg: TokenizeConfig) -> str:
    return stage_key(STAGE, [__name__], [cfg], [Path(prepared_dir), Path(model_dir)])


def tokenize_dataset(prepared_dir: Path, model_dir: Path, cfg: TokenizeConfig, root: Path) -> Path:
    """Write train.parquet and eval.parquet with input_ids and labels, and stats.json."""

    def build(out: Path) -> dict:
        tokenizer = load_tokenizer(Path(model_dir))
        stats = {}
        for split in ("train", "eval"):
            frame = pd.read_parquet(Path(prepared_dir) / f"{split}.parquet")
            encoded, stats[split] = _encode_split(tokenizer, frame, cfg)
            if encoded.empty:
                raise ValueError(
                    f"tokenize.max_length={cfg.max_length}: every {split} example is longer; raise it"
                )
            encoded.to_parquet(out / f"{split}.parquet", index=False)
        (out / "stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
        return {"train_examples": stats["train"]["examples"], "eval_examples": stats["eval"]["examples"]}

    return build_output(root, STAGE, tokenize_key(prepared_dir, model_dir, cfg), build)
