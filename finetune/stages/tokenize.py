"""Stage `tokenize`: prepared splits -> token ids and labels, prompt tokens masked with -100.

Prompt and response are tokenized separately and joined, so the prompt tokens are exactly what the
model sees at generation time, and the loss mask cannot drift across a merged token at the boundary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from finetune.core.config import LossOn, OverLength, TokenizeConfig
from finetune.core.errors import PermanentError
from finetune.core.stage import Hooks, Stage
from finetune.data.readers import DataError
from finetune.data.template import PromptFormat

IGNORE_INDEX = -100  # labels with this value are left out of the loss (PyTorch cross-entropy convention)


@dataclass(frozen=True, kw_only=True)
class TokenizeInputs:
    prepared_dir: Path  # output of prepare
    model_dir: Path  # output of resolve_model: its tokenizer
    tokenize: TokenizeConfig


class TokenizerError(PermanentError, ValueError):
    """The base model's tokenizer cannot be used to train: another base is needed."""


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.eos_token_id is None:
        raise TokenizerError(
            f"{model_dir}: the tokenizer has no EOS token, and training needs one to end answers; set model.base to "
            "a model whose tokenizer defines eos_token"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of the loss; EOS still trains
    return tokenizer


def set_chat_template(tokenizer, template: str) -> None:
    """Give `tokenizer` the chat template of `template` (template.PromptFormat.chat_template): rendered and
    encoded, a user turn with the generation prompt is the training prompt, token for token."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("x", add_special_tokens=True)["input_ids"] == [tokenizer.bos_token_id, *plain]
    tokenizer.chat_template = PromptFormat(template).chat_template(tokenizer.bos_token if adds_bos else None)


def encode_example(
    tokenizer, template: str, instruction: str, response: str, loss_on: LossOn, history: Sequence[str] = ()
) -> dict[str, list[int]]:
    """Token ids and labels of one conversation: the exchanges of `history` (user, assistant, ...), then
    `instruction` and `response`. Each exchange is its prompt (the template around the user turn; masked
    unless loss_on is full) and its response with EOS (trained), one after another, as the saved chat
    template renders them; only the first prompt gets the tokenizer's special tokens (BOS).
    `prompt_length`: the first prompt's tokens; `exchange_ends`: where each exchange ends."""
    prompt = PromptFormat(template)
    texts = [*history, instruction, response]
    input_ids: list[int] = []
    labels: list[int] = []
    ends: list[int] = []
    prompt_length = 0
    for n in range(0, len(texts), 2):
        prompt_ids = tokenizer(prompt.prompt(texts[n]), add_special_tokens=n == 0)["input_ids"]
        response_ids = tokenizer(texts[n + 1], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompt_length = prompt_length or len(prompt_ids)
        labels += (list(prompt_ids) if loss_on == LossOn.full else [IGNORE_INDEX] * len(prompt_ids)) + response_ids
        input_ids += prompt_ids + response_ids
        ends.append(len(input_ids))
    return {"input_ids": input_ids, "labels": labels, "prompt_length": prompt_length, "exchange_ends": ends}


def fit_length(example: dict, max_length: int, overlength: OverLength) -> tuple[dict | None, str | None]:
    """The example within max_length, or the reason it cannot be. Truncation keeps the whole exchanges
    that fit; a first exchange too long on its own has its response cut (never the prompt)."""
    length = len(example["input_ids"])
    if length <= max_length:
        return example, None
    if overlength == OverLength.reject:
        return None, f"{length} tokens, over tokenize.max_length={max_length} (or set tokenize.overlength=truncate)"
    whole = [end for end in example.get("exchange_ends", []) if end <= max_length]
    if whole:  # cut at a turn boundary: the exchanges kept end with their EOS
        return {**example, "input_ids": example["input_ids"][: whole[-1]], "labels": example["labels"][: whole[-1]]}, None
    if example["prompt_length"] >= max_length:
        return None, f"the prompt alone is {example['prompt_length']} tokens, over tokenize.max_length={max_length}"
    # The cut response has no EOS: the model learns to continue, not to stop, on this example.
    return {**example, "input_ids": example["input_ids"][:max_length], "labels": example["labels"][:max_length]}, None


def encode_split(tokenizer, frame: pd.DataFrame, cfg: TokenizeConfig) -> tuple[pd.DataFrame, dict, list[dict]]:
    kept_rows, rejected, lengths, truncated = [], [], [], 0
    for row in frame.itertuples():
        history = list(getattr(row, "history", ()))  # a Parquet list cell reads back as an array
        example = encode_example(tokenizer, cfg.template, row.instruction, row.response, cfg.loss_on, history)
        lengths.append(len(example["input_ids"]))
        fitted, reason = fit_length(example, cfg.max_length, cfg.overlength)
        if fitted is not None and not any(t != IGNORE_INDEX for t in fitted["labels"]):
            fitted, reason = None, "no token left to train on after masking the prompt"
        if fitted is None:
            rejected.append({"source_file": row.source_file, "source_line": int(row.source_line), "reason": reason})
            continue
        truncated += fitted is not example
        kept_rows.append(fitted)
    kept = pd.DataFrame(kept_rows, columns=["input_ids", "labels", "prompt_length"])
    lengths = pd.Series(lengths)
    trained = kept.labels.map(lambda labels: sum(1 for t in labels if t != IGNORE_INDEX))
    stats = {
        "examples": len(kept),
        "rejected": len(rejected),
        "truncated": int(truncated),
        "tokens_total": int(kept.input_ids.str.len().sum()),
        "tokens_trained": int(trained.sum()),
        "length_mean": round(float(lengths.mean()), 1),
        "length_max": int(lengths.max()),
        "length_p95": int(lengths.quantile(0.95)),
    }
    return kept, stats, rejected


def _tokenize(inputs: TokenizeInputs, key: str, out: Path, hooks: Hooks) -> dict:
    """Write train.parquet and eval.parquet with input_ids and labels, rejected.parquet and stats.json."""
    tokenizer = load_tokenizer(Path(inputs.model_dir))
    stats, rejected = {}, []
    for split in ("train", "eval"):
        frame = pd.read_parquet(Path(inputs.prepared_dir) / f"{split}.parquet")
        encoded, stats[split], split_rejects = encode_split(tokenizer, frame, inputs.tokenize)
        rejected += [{**r, "split": split} for r in split_rejects]
        if encoded.empty:
            first = split_rejects[0]
            raise DataError(f"every {split} example was rejected, e.g. {first['source_file']}:{first['source_line']}: {first['reason']}")
        encoded.to_parquet(out / f"{split}.parquet", index=False)
    pd.DataFrame(rejected, columns=["source_file", "source_line", "reason", "split"]).to_parquet(
        out / "rejected.parquet", index=False
    )
    (out / "stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    # The prompt format travels with the tokens: train saves it as the adapter's chat template.
    (out / "format.json").write_text(json.dumps({"template": inputs.tokenize.template}), encoding="utf-8")
    hooks.logger.info("%d training and %d held-out examples, %d rejected", stats["train"]["examples"], stats["eval"]["examples"], len(rejected))
    return {"train_examples": stats["train"]["examples"], "eval_examples": stats["eval"]["examples"]}


tokenize_dataset = Stage("tokenize", TokenizeInputs, _tokenize, __name__, reached_through=("tokenizers",))
