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

import numpy as np
import pandas as pd

from finetune.core.config import EvalConfig, QuantConfig, TokenizeConfig
from finetune.core.measure import Laps
from finetune.core.stage import Hooks, Stage
from finetune.data.template import PromptFormat
from finetune.reporting.stats import LABELS, format_difference, paired_difference, paired_proportion_difference
from finetune.stages.tokenize import IGNORE_INDEX, encode_split, load_tokenizer


@dataclass(frozen=True, kw_only=True)
class EvaluateInputs:
    train_dir: Path  # output of train: adapter/
    model_dir: Path  # output of quantize_base (the 4-bit base), or of resolve_model without quant.load_in_4bit
    prepared_dir: Path  # output of prepare: the held-out instructions and references
    tokenized_dir: Path  # output of tokenize: the held-out token ids and labels
    quant: QuantConfig
    tokenize: TokenizeConfig
    eval: EvalConfig


CONFIDENCE = 0.95
METRICS = ("loss", "rouge_l", "format_adherence", "new_tokens")  # per example; loss is weighted by response tokens


def example_losses(model, examples: pd.DataFrame, pad_token_id: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean cross-entropy per response token, number of response tokens) of each example (labels != -100)."""
    import torch

    from finetune.training.modeling import inference_attention

    losses, counts = [], []
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
        with torch.inference_mode(), inference_attention():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        # Token t predicts token t+1, scored where its label is a response token: the log-softmax over the
        # vocabulary runs on those positions only, in rows (a [B, V, T] layout took 2.5x as long on a CPU).
        shifted = labels[:, 1:].to(model.device)
        scored = shifted != IGNORE_INDEX
        per_token = torch.zeros(shifted.shape, dtype=logits.dtype, device=logits.device)
        per_token[scored] = torch.nn.functional.cross_entropy(logits[:, :-1][scored], shifted[scored], reduction="none")
        tokens = scored.sum(dim=1)
        losses += (per_token.sum(dim=1) / tokens.clamp(min=1)).tolist()
        counts += tokens.tolist()
    return np.array(losses), np.array(counts)


def follows_format(new_ids: list[int], tokenizer, prompt: PromptFormat) -> bool:
    """The answer ended with EOS and did not write the template's turn opener (special tokens count)."""
    if not new_ids or new_ids[-1] != tokenizer.eos_token_id:
        return False
    return prompt.turn_start is None or prompt.turn_start not in tokenizer.decode(new_ids, skip_special_tokens=False)


def rouge_l(references: list[str], answers: list[str]) -> np.ndarray:
    """ROUGE-L F-measure of each answer against its reference (Google's rouge-score, Porter stemming)."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(ref, answer)["rougeL"].fmeasure for ref, answer in zip(references, answers)])


def answer_examples(
    model, tokenizer, eval_tokens: pd.DataFrame, eval_rows: pd.DataFrame, prompt: PromptFormat, cfg: EvalConfig,
    laps: Laps | None = None, name: str = "model",
) -> pd.DataFrame:  # fmt: skip
    """One row per held-out example: loss and tokens (teacher-forced on the reference), the greedy
    answer, its ROUGE-L against the reference, whether it kept the format, and its length."""
    from finetune.training.modeling import eval_batch_size, greedy_generate

    laps = laps or Laps()
    longest = max(len(ids) for ids in eval_tokens.input_ids) + cfg.max_new_tokens
    batch_size = eval_batch_size(cfg.batch_size, model, longest)
    loss, tokens = example_losses(model, eval_tokens, tokenizer.pad_token_id, batch_size)
    laps.lap(f"{name}_loss")
    prompts = [prompt.prompt(text) for text in eval_rows.instruction]
    generated = greedy_generate(model, tokenizer, prompts, cfg.max_new_tokens, batch_size)
    laps.lap(f"{name}_generate")
    answers = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated]
    return pd.DataFrame({
        "loss": loss, "tokens": tokens, "answer": answers,
        "rouge_l": rouge_l(list(eval_rows.response), answers),
        "format_adherence": [float(follows_format(ids, tokenizer, prompt)) for ids in generated],
        "new_tokens": [len(ids) for ids in generated],
    })  # fmt: skip


def summary(examples: pd.DataFrame) -> dict:
    """Whole-set figures of one model: loss per response token (and its perplexity) and means of the rest."""
    loss = float((examples.loss * examples.tokens).sum() / examples.tokens.sum())
    return {
        "loss": round(loss, 4),
        "perplexity": round(math.exp(loss), 3),
        "rouge_l": round(float(examples.rouge_l.mean()), 4),
        "format_adherence": round(float(examples.format_adherence.mean()), 4),
        "mean_new_tokens": round(float(examples.new_tokens.mean()), 1),
    }


def differences(base: pd.DataFrame, tuned: pd.DataFrame, cfg: EvalConfig) -> dict[str, dict]:
    """tuned - base of every metric with its paired interval: bootstrap for means (same draws for each),
    Newcombe's interval for format adherence (a proportion: honest at small n and at 0 and 1)."""
    found = {}
    for name in METRICS:
        if name == "format_adherence":
            difference = paired_proportion_difference(base[name].to_numpy(), tuned[name].to_numpy(), CONFIDENCE)
        else:
            difference = paired_difference(
                base[name].to_numpy(), tuned[name].to_numpy(), weights=base.tokens.to_numpy() if name == "loss" else None,
                samples=cfg.bootstrap_samples, seed=cfg.seed, confidence=CONFIDENCE,
            )  # fmt: skip
        found[name] = difference.as_dict()
    return found


def by_topic(base: pd.DataFrame, tuned: pd.DataFrame, topics: pd.Series, cfg: EvalConfig) -> list[dict]:
    """Per-topic rows (topics present in the held-out set): examples, and loss and ROUGE-L differences."""
    rows = []
    for topic in sorted(topics.dropna().unique()):
        where = (topics == topic).to_numpy()
        found = differences(base[where].reset_index(drop=True), tuned[where].reset_index(drop=True), cfg)
        rows.append({"topic": str(topic), "examples": int(where.sum()), **{name: found[name] for name in ("loss", "rouge_l", "format_adherence")}})
    return rows


def _number(value: float, name: str = "") -> str:
    return f"{value:.1f}" if name == "new_tokens" or abs(value) >= 100 else f"{value:.3f}"


def _report_markdown(metrics: dict, samples: pd.DataFrame) -> str:
    found = metrics["differences"]
    lines = [
        "# Evaluation: base vs tuned",
        "",
        f"Held-out prompts: {metrics['examples']}; greedy decoding, at most {metrics['max_new_tokens']} new tokens. "
        f"Intervals: {metrics['confidence']:.0%}, paired bootstrap of {metrics['bootstrap_samples']:,} draws (seed "
        f"{metrics['seed']}); format adherence: Newcombe's interval for paired proportions. * marks a difference "
        "whose interval excludes 0.",
        "",
        "| metric | base | tuned | tuned - base [95% interval] |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {LABELS[name]} | {_number(d['base'], name)} | {_number(d['tuned'], name)} | {format_difference(d)} |" for name, d in found.items()]
    if metrics["topics"]:
        lines += ["", "## By topic", "", "| topic | examples | loss base -> tuned | loss difference | ROUGE-L difference | format adherence difference |", "|---|---:|---:|---:|---:|---:|"]
        lines += [
            f"| {t['topic']} | {t['examples']} | {_number(t['loss']['base'])} -> {_number(t['loss']['tuned'])} | {format_difference(t['loss'])} "
            f"| {format_difference(t['rouge_l'])} | {format_difference(t['format_adherence'])} |"
            for t in metrics["topics"]
        ]
    lines += ["", "## Samples", ""]
    for sample in samples.itertuples():
        lines += [f"**{sample.instruction}**", "", f"- base: {sample.base_answer!r}", f"- tuned: {sample.tuned_answer!r}", ""]
    return "\n".join(lines)


def _evaluate(inputs: EvaluateInputs, key: str, out: Path, hooks: Hooks) -> dict:
    """Write metrics.json (base, tuned, differences with intervals, topics), samples.jsonl and report.md."""
    from peft import PeftModel

    from finetune.training.modeling import load_base

    tokenizer = load_tokenizer(Path(inputs.model_dir))
    eval_rows = pd.read_parquet(Path(inputs.prepared_dir) / "eval.parquet")
    eval_tokens = pd.read_parquet(Path(inputs.tokenized_dir) / "eval.parquet")
    prompt, cfg = PromptFormat(inputs.tokenize.template), inputs.eval

    laps = Laps()
    model = PeftModel.from_pretrained(load_base(Path(inputs.model_dir), inputs.quant), Path(inputs.train_dir) / "adapter")
    laps.lap("load")
    tuned = answer_examples(model, tokenizer, eval_tokens, eval_rows, prompt, cfg, laps, "tuned")
    with model.disable_adapter():
        base = answer_examples(model, tokenizer, eval_tokens, eval_rows, prompt, cfg, laps, "base")

    metrics = {
        "examples": len(eval_rows), "max_new_tokens": cfg.max_new_tokens,
        "confidence": CONFIDENCE, "bootstrap_samples": cfg.bootstrap_samples, "seed": cfg.seed,
        "base": summary(base), "tuned": summary(tuned), "differences": differences(base, tuned, cfg),
        "topics": by_topic(base, tuned, eval_rows.topic, cfg) if "topic" in eval_rows else [],
    }  # fmt: skip
    laps.lap("intervals")
    metrics["seconds"] = laps.seconds
    columns = [name for name in ("instruction", "response", "topic") if name in eval_rows]
    samples = pd.concat(
        [eval_rows[columns].rename(columns={"response": "reference"}).reset_index(drop=True), base.add_prefix("base_"), tuned.add_prefix("tuned_")],
        axis=1,
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    samples.to_json(out / "samples.jsonl", orient="records", lines=True, force_ascii=False)
    (out / "report.md").write_text(_report_markdown(metrics, samples.head(5)), encoding="utf-8")
    loss = metrics["differences"]["loss"]
    hooks.logger.info("held-out loss %.4f -> %.4f (difference %s)", loss["base"], loss["tuned"], format_difference(loss))
    return {"eval_loss_base": metrics["base"]["loss"], "eval_loss_tuned": metrics["tuned"]["loss"]}


evaluate_adapter = Stage("evaluate", EvaluateInputs, _evaluate, __name__, reached_through=("bitsandbytes", "tokenizers"))


@dataclass(frozen=True, kw_only=True)
class ScoreInputs:
    model_dir: Path  # a standalone model folder with its tokenizer: merge's model/, or the champion
    prepared_dir: Path  # output of prepare: the held-out pairs
    tokenize: TokenizeConfig  # template, max_length and loss_on, applied with the model's own tokenizer
    eval: EvalConfig


def _score(inputs: ScoreInputs, key: str, out: Path, hooks: Hooks) -> dict:
    """Write metrics.json (the summary of `summary`) and samples.jsonl (per-example figures and answers)."""
    from transformers import AutoModelForCausalLM

    from finetune.training.modeling import device_name

    tokenizer = load_tokenizer(Path(inputs.model_dir))
    eval_rows = pd.read_parquet(Path(inputs.prepared_dir) / "eval.parquet")
    eval_tokens, _, _ = encode_split(tokenizer, eval_rows, inputs.tokenize)
    laps = Laps()
    model = AutoModelForCausalLM.from_pretrained(inputs.model_dir, dtype="auto").to(device_name())
    laps.lap("load")
    examples = answer_examples(model, tokenizer, eval_tokens, eval_rows, PromptFormat(inputs.tokenize.template), inputs.eval, laps)
    metrics = {**summary(examples), "examples": len(eval_rows), "seconds": laps.seconds}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    examples.insert(0, "instruction", list(eval_rows.instruction))
    examples.insert(1, "reference", list(eval_rows.response))
    examples.to_json(out / "samples.jsonl", orient="records", lines=True, force_ascii=False)
    hooks.logger.info("held-out loss %s, format adherence %s", metrics["loss"], metrics["format_adherence"])
    return {"loss": metrics["loss"], "format_adherence": metrics["format_adherence"]}


score_model = Stage("score", ScoreInputs, _score, __name__, reached_through=("tokenizers",))
