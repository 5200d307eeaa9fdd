"""Stage `evaluate`: base vs tuned on the held-out split, with the same weights and the same decoding.

The tuned model is the base with the adapter; the base is the same model inside
`disable_adapter()`, so both sides share the 4-bit weights, dtype and batching exactly.
Metrics: loss and perplexity on response tokens, and format adherence of greedy answers (the answer
ends with EOS before `eval.max_new_tokens` and does not open a new turn of `tokenize.template`).

Stage `score`: the same metrics for one standalone model folder (a merged model), with its own
tokenizer, in the precision it was saved in. The promotion gate scores the candidate and the champion
this way on the same held-out set; a model's score is cached by its key like any stage output.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from finetune.config import EvalConfig, QuantConfig, TokenizeConfig
from finetune.stage import Hooks, Stage
from finetune.template import PromptFormat
from finetune.tokenization import IGNORE_INDEX, encode_split, load_tokenizer


@dataclass(frozen=True, kw_only=True)
class EvaluateInputs:
    train_dir: Path  # output of train: adapter/
    model_dir: Path  # output of resolve_model
    prepared_dir: Path  # output of prepare: the held-out instructions and references
    tokenized_dir: Path  # output of tokenize: the held-out token ids and labels
    quant: QuantConfig
    tokenize: TokenizeConfig
    eval: EvalConfig


def response_loss(model, examples: pd.DataFrame, pad_token_id: int, batch_size: int) -> float:
    """Mean cross-entropy per response token (labels != -100) over all examples."""
    import torch

    total_loss, total_tokens = 0.0, 0
    model.eval()
    for start in range(0, len(examples), batch_size):
        rows = examples.iloc[start : start + batch_size]
        width = max(len(ids) for ids in rows.input_ids)
        ids = torch.full((len(rows), width), pad_token_id)
        labels = torch.full((len(rows), width), IGNORE_INDEX)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row_ids, row_labels) in enumerate(zip(rows.input_ids, rows.labels)):
            ids[i, : len(row_ids)] = torch.tensor(list(row_ids))
            labels[i, : len(row_labels)] = torch.tensor(list(row_labels))
            mask[i, : len(row_ids)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        # Token t predicts token t+1: (B, T-1, V) against (B, T-1).
        shifted = labels[:, 1:].to(model.device)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total_loss += loss.item()
        total_tokens += int((shifted != IGNORE_INDEX).sum())
    return total_loss / total_tokens


def follows_format(new_ids: list[int], tokenizer, prompt: PromptFormat) -> bool:
    """The answer ended with EOS and did not write the template's turn opener (special tokens count)."""
    if not new_ids or new_ids[-1] != tokenizer.eos_token_id:
        return False
    return prompt.turn_start is None or prompt.turn_start not in tokenizer.decode(new_ids, skip_special_tokens=False)


def _side(model, tokenizer, eval_tokens: pd.DataFrame, prompt: PromptFormat, instructions: list[str], cfg: EvalConfig) -> tuple[dict, list[str]]:
    from finetune.modeling import greedy_generate

    loss = response_loss(model, eval_tokens, tokenizer.pad_token_id, cfg.batch_size)
    prompts = [prompt.prompt(text) for text in instructions]
    generated = greedy_generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size)
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated]
    adherent = [follows_format(ids, tokenizer, prompt) for ids in generated]
    metrics = {
        "loss": round(loss, 4),
        "perplexity": round(math.exp(loss), 3),
        "format_adherence": round(sum(adherent) / len(adherent), 4),
        "mean_new_tokens": round(sum(len(ids) for ids in generated) / len(generated), 1),
    }
    return metrics, texts


def _report_markdown(metrics: dict, samples: list[dict]) -> str:
    base, tuned = metrics["base"], metrics["tuned"]
    lines = [
        "# Evaluation: base vs tuned",
        "",
        f"Held-out prompts: {metrics['examples']}; greedy decoding, at most {metrics['max_new_tokens']} new tokens.",
        "",
        "| metric | base | tuned |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {base[name]} | {tuned[name]} |" for name in ("loss", "perplexity", "format_adherence", "mean_new_tokens")]
    lines += ["", "## Samples", ""]
    for sample in samples[:5]:
        lines += [f"**{sample['instruction']}**", "", f"- base: {sample['base']!r}", f"- tuned: {sample['tuned']!r}", ""]
    return "\n".join(lines)


def _evaluate(inputs: EvaluateInputs, key: str, out: Path, hooks: Hooks) -> dict:
    """Write metrics.json (base, tuned), samples.jsonl and report.md."""
    from peft import PeftModel

    from finetune.modeling import load_base

    tokenizer = load_tokenizer(Path(inputs.model_dir))
    eval_rows = pd.read_parquet(Path(inputs.prepared_dir) / "eval.parquet")
    eval_tokens = pd.read_parquet(Path(inputs.tokenized_dir) / "eval.parquet")
    prompt, instructions = PromptFormat(inputs.tokenize.template), list(eval_rows.instruction)

    model = PeftModel.from_pretrained(load_base(Path(inputs.model_dir), inputs.quant), Path(inputs.train_dir) / "adapter")
    tuned, tuned_texts = _side(model, tokenizer, eval_tokens, prompt, instructions, inputs.eval)
    with model.disable_adapter():
        base, base_texts = _side(model, tokenizer, eval_tokens, prompt, instructions, inputs.eval)

    metrics = {"examples": len(instructions), "max_new_tokens": inputs.eval.max_new_tokens, "base": base, "tuned": tuned}
    samples = [
        {"instruction": ins, "reference": ref, "base": b, "tuned": t}
        for ins, ref, b, t in zip(eval_rows.instruction, eval_rows.response, base_texts, tuned_texts)
    ]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples), encoding="utf-8")
    (out / "report.md").write_text(_report_markdown(metrics, samples), encoding="utf-8")
    hooks.logger.info("held-out loss %s -> %s", base["loss"], tuned["loss"])
    return {"eval_loss_base": base["loss"], "eval_loss_tuned": tuned["loss"]}


evaluate_adapter = Stage("evaluate", EvaluateInputs, _evaluate, __name__)


@dataclass(frozen=True, kw_only=True)
class ScoreInputs:
    model_dir: Path  # a standalone model folder with its tokenizer: merge's model/, or the champion
    prepared_dir: Path  # output of prepare: the held-out pairs
    tokenize: TokenizeConfig  # template, max_length and loss_on, applied with the model's own tokenizer
    eval: EvalConfig


def _score(inputs: ScoreInputs, key: str, out: Path, hooks: Hooks) -> dict:
    """Write metrics.json (loss, perplexity, format adherence, mean new tokens) and samples.jsonl."""
    from transformers import AutoModelForCausalLM

    from finetune.modeling import device_name

    tokenizer = load_tokenizer(Path(inputs.model_dir))
    eval_rows = pd.read_parquet(Path(inputs.prepared_dir) / "eval.parquet")
    eval_tokens, _, _ = encode_split(tokenizer, eval_rows, inputs.tokenize)
    model = AutoModelForCausalLM.from_pretrained(inputs.model_dir, dtype="auto").to(device_name())
    metrics, texts = _side(model, tokenizer, eval_tokens, PromptFormat(inputs.tokenize.template), list(eval_rows.instruction), inputs.eval)
    metrics["examples"] = len(eval_rows)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    samples = [{"instruction": i, "reference": r, "answer": t} for i, r, t in zip(eval_rows.instruction, eval_rows.response, texts)]
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples), encoding="utf-8")
    hooks.logger.info("held-out loss %s, format adherence %s", metrics["loss"], metrics["format_adherence"])
    return {"loss": metrics["loss"], "format_adherence": metrics["format_adherence"]}


score_model = Stage("score", ScoreInputs, _score, __name__)
