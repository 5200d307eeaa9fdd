"""Stage `tokenize`: prepared splits -> token ids and labels, prompt tokens masked with -100.

Prompt and response are tokenized separately and joined, so the prompt tokens are exactly what the
model sees at generation time, and the loss mask cannot drift across a merged token at the boundary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa

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
    return encode_rows(tokenizer, template, [instruction], [response], loss_on, [history])[0]


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


def batch_ids(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of each text, as `tokenizer(texts)` gives them. A fast tokenizer's Rust backend is called
    directly when it gives the tokenizer's own ids for the first text: transformers' per-text wrapping of
    its results took as long as the encoding itself."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ids = [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=special)]
        if ids[0] == tokenizer(texts[0], add_special_tokens=special)["input_ids"]:
            return ids
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def encode_rows(
    tokenizer, template: str, instructions: Sequence[str], responses: Sequence[str], loss_on: LossOn,
    histories: Sequence[Sequence[str]] | None = None,
) -> list[dict[str, list[int]]]:  # fmt: skip
    """`encode_example` of every row, with the tokenizer called once for all first prompts, once for all
    later prompts and once for all responses (its batch call encodes on every core); the same token ids."""
    prompt = PromptFormat(template)
    histories = histories if histories is not None else [()] * len(instructions)
    rows = [[*history, instruction, response] for history, instruction, response in zip(histories, instructions, responses)]
    firsts = [prompt.prompt(texts[0]) for texts in rows]
    laters = [prompt.prompt(texts[n]) for texts in rows for n in range(2, len(texts), 2)]
    answers = [texts[n] for texts in rows for n in range(1, len(texts), 2)]
    first_ids = batch_ids(tokenizer, firsts, True)
    later_ids = iter(batch_ids(tokenizer, laters, False))
    answer_ids = iter(batch_ids(tokenizer, answers, False))
    eos = tokenizer.eos_token_id
    encoded = []
    for texts, first in zip(rows, first_ids):
        input_ids: list[int] = []
        labels: list[int] = []
        ends: list[int] = []
        for n in range(0, len(texts), 2):
            prompt_ids = list(first) if n == 0 else next(later_ids)
            response_ids = [*next(answer_ids), eos]
            labels += (list(prompt_ids) if loss_on == LossOn.full else [IGNORE_INDEX] * len(prompt_ids)) + response_ids
            input_ids += prompt_ids + response_ids
            ends.append(len(input_ids))
        encoded.append({"input_ids": input_ids, "labels": labels, "prompt_length": len(first), "exchange_ends": ends})
    return encoded


@dataclass
class SplitStats:
    """Figures of a split encoded in chunks, summed as they come."""

    examples: int = 0
    rejected: int = 0
    truncated: int = 0
    tokens_total: int = 0
    tokens_trained: int = 0
    lengths: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        lengths = pd.Series(self.lengths, dtype="int64")
        return {
            "examples": self.examples, "rejected": self.rejected, "truncated": self.truncated,
            "tokens_total": self.tokens_total, "tokens_trained": self.tokens_trained,
            "length_mean": round(float(lengths.mean()), 1), "length_max": int(lengths.max()),
            "length_p95": int(lengths.quantile(0.95)),
        }  # fmt: skip


def encode_chunk(tokenizer, frame: pd.DataFrame, cfg: TokenizeConfig, stats: SplitStats) -> tuple[pd.DataFrame, list[dict]]:
    """Token ids and labels of the rows of `frame` that fit (and their rejects), counted into `stats`."""
    histories = [list(h) for h in frame["history"]] if "history" in frame else None  # a Parquet list cell reads back as an array
    examples = encode_rows(tokenizer, cfg.template, list(frame.instruction), list(frame.response), cfg.loss_on, histories)
    kept_rows, rejected = [], []
    for example, source_file, source_line in zip(examples, frame.source_file, frame.source_line):
        stats.lengths.append(len(example["input_ids"]))
        fitted, reason = fit_length(example, cfg.max_length, cfg.overlength)
        trained = len(fitted["labels"]) - fitted["labels"].count(IGNORE_INDEX) if fitted is not None else 0
        if fitted is not None and not trained:
            fitted, reason = None, "no token left to train on after masking the prompt"
        if fitted is None:
            rejected.append({"source_file": source_file, "source_line": int(source_line), "reason": reason})
            continue
        stats.truncated += fitted is not example
        stats.tokens_total += len(fitted["input_ids"])
        stats.tokens_trained += trained
        kept_rows.append({"input_ids": fitted["input_ids"], "labels": fitted["labels"], "prompt_length": fitted["prompt_length"]})
    stats.examples += len(kept_rows)
    stats.rejected += len(rejected)
    return pd.DataFrame(kept_rows, columns=["input_ids", "labels", "prompt_length"]), rejected


def encode_split(tokenizer, frame: pd.DataFrame, cfg: TokenizeConfig) -> tuple[pd.DataFrame, dict, list[dict]]:
    """A whole split in memory (the held-out set): its encoded rows, stats and rejects."""
    stats = SplitStats()
    kept, rejected = encode_chunk(tokenizer, frame, cfg, stats)
    return kept, stats.as_dict(), rejected


CHUNK_ROWS = 50_000  # rows read, encoded and written at a time: memory stays flat as the data grows
TOKENS_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int64())), ("labels", pa.list_(pa.int64())), ("prompt_length", pa.int64())])


def encode_file(tokenizer, source: Path, target: Path, cfg: TokenizeConfig) -> tuple[dict, list[dict]]:
    """Encode the prepared split `source` into `target` chunk by chunk; (stats, rejects)."""
    import pyarrow.parquet as pq

    stats, rejected = SplitStats(), []
    with pq.ParquetWriter(target, TOKENS_SCHEMA) as writer:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=CHUNK_ROWS):
            kept, chunk_rejects = encode_chunk(tokenizer, batch.to_pandas(), cfg, stats)
            writer.write_table(pa.Table.from_pandas(kept, schema=TOKENS_SCHEMA, preserve_index=False))
            rejected += chunk_rejects
    if not stats.lengths:
        raise DataError(f"{source}: no rows to tokenize")
    return stats.as_dict(), rejected


def _tokenize(inputs: TokenizeInputs, key: str, out: Path, hooks: Hooks) -> dict:
    """Write train.parquet and eval.parquet with input_ids and labels, rejected.parquet and stats.json."""
    tokenizer = load_tokenizer(Path(inputs.model_dir))
    stats, rejected = {}, []
    for split in ("train", "eval"):
        stats[split], split_rejects = encode_file(tokenizer, Path(inputs.prepared_dir) / f"{split}.parquet", out / f"{split}.parquet", inputs.tokenize)
        rejected += [{**r, "split": split} for r in split_rejects]
        if not stats[split]["examples"]:
            first = split_rejects[0]
            raise DataError(f"every {split} example was rejected, e.g. {first['source_file']}:{first['source_line']}: {first['reason']}")
    pd.DataFrame(rejected, columns=["source_file", "source_line", "reason", "split"]).to_parquet(
        out / "rejected.parquet", index=False
    )
    (out / "stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    # The prompt format travels with the tokens: train saves it as the adapter's chat template.
    (out / "format.json").write_text(json.dumps({"template": inputs.tokenize.template}), encoding="utf-8")
    hooks.logger.info("%d training and %d held-out examples, %d rejected", stats["train"]["examples"], stats["eval"]["examples"], len(rejected))
    return {"train_examples": stats["train"]["examples"], "eval_examples": stats["eval"]["examples"]}


tokenize_dataset = Stage("tokenize", TokenizeInputs, _tokenize, __name__, reached_through=("tokenizers",))
