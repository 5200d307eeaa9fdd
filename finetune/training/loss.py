"""The training loss from the model's logits, and the step metrics TRL logs, in place of TRL's fused LM head
where that head is slow or cannot run.

TRL's `SFTTrainer` computes the loss through a chunked LM head (`fused_lm_head`): Triton kernels on a GPU,
which score only the labelled positions and never hold the whole logits. Without Triton (the CPU) it runs a
tile-by-tile torch fallback over the whole vocabulary in fp32: on a 2-core CPU, for one step of 600 tokens
with SmolLM2's 49,152-token vocabulary, 2.2 s against 1.0 s for the logits, cross-entropy and the same
metrics computed here (the same loss to 1e-4), most of a step of the tiny test model. So:

- `token_loss`: (sum of the scored tokens' negative log-likelihood, scored tokens, top-1 hits, entropy sum)
  of a batch, tensors only (the graphed step captures it: finetune/training/graphs.py);
- `LogitsLossSFTTrainer`: TRL's trainer with that loss, the trainer every recipe builds on a CPU;
- `record_step_metrics`: TRL's step metrics (entropy, token accuracy, tokens seen) from those tensors in one
  host synchronization.

The loss is TRL's: labels shifted by one, -100 ignored (padding-free rows have -100 at each example's first
token, so no example predicts the next one's), summed and divided by the Trainer's `num_items_in_batch`
(the scored tokens of the whole optimizer step, on every rank).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from trl import SFTTrainer

IGNORE = -100
# What this module borrows from TRL: it replaces SFTTrainer.compute_loss (called with these parameters), and so
# keeps TRL's private step metrics up to date itself: `_metrics["train"][name]`, which TRL's log() averages and
# clears, and the running token count `_total_train_tokens`. tests/test_borrowed.py runs TRL's own compute_loss
# and checks that it still writes exactly these.
COMPUTE_LOSS_PARAMETERS = ("model", "inputs", "return_outputs", "num_items_in_batch")
TRL_STEP_METRICS = ("entropy", "mean_token_accuracy", "num_tokens")


def token_loss(model, labels: torch.Tensor, only_scored: bool = False, **model_inputs):
    """(loss sum, scored tokens, top-1 hits, entropy sum) of `model` on `model_inputs` against `labels` [rows,
    tokens]: the next-token cross-entropy of the positions whose label is not IGNORE, in fp32.

    `only_scored`: the vocabulary-wide work (fp32 copy, log-softmax, metrics) runs on the scored positions alone
    instead of on every position with the others masked out: the same sums, less work where prompts and padding
    are a large share of the rows. Its shapes depend on the data, so a CUDA graph cannot capture it."""
    logits = model(**model_inputs, use_cache=False).logits[:, :-1]
    targets = labels[:, 1:]
    scored = targets != IGNORE
    if only_scored:
        logits, targets, scored = logits[scored], targets[scored], scored[scored]
    logits = logits.float()
    log_probs = logits.log_softmax(-1)  # once, for the loss and the metrics (cross_entropy would take its own)
    loss_sum = F.nll_loss(log_probs.flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        hits = (logits.argmax(-1) == targets) & scored
        return loss_sum, scored.sum(), hits.sum(), (entropy * scored).sum()


def trl_internals_problems(trainer: SFTTrainer) -> list[str]:
    """What replacing TRL's compute_loss needs of its trainer and does not find; empty when all is there."""
    problems = []
    parameters = tuple(inspect.signature(SFTTrainer.compute_loss).parameters)[1:]  # after self
    if parameters[: len(COMPUTE_LOSS_PARAMETERS)] != COMPUTE_LOSS_PARAMETERS:
        problems.append(f"SFTTrainer.compute_loss takes {parameters}, not {COMPUTE_LOSS_PARAMETERS}")
    metrics = getattr(trainer, "_metrics", None)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("train"), dict):
        problems.append("SFTTrainer._metrics['train'] (the step metrics TRL logs) is gone")
    if not isinstance(getattr(trainer, "_total_train_tokens", None), int):
        problems.append("SFTTrainer._total_train_tokens (the running token count) is gone")
    return problems


def record_step_metrics(trainer: SFTTrainer, inputs: dict, scored, hits, entropy_sum) -> None:
    """Append this micro-batch's entropy and token accuracy to TRL's step metrics and count its real tokens
    (the attention mask's, else the row's), over every rank, as TRL's compute_loss does, in one host
    synchronization."""
    real_tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(inputs["input_ids"].numel())
    counts = torch.stack([scored.float(), hits.float(), entropy_sum.float(), real_tokens.to(scored.device).float()])
    if trainer.accelerator.num_processes > 1:  # every rank's, as TRL gathers them
        counts = trainer.accelerator.gather_for_metrics(counts.unsqueeze(0)).sum(0)
    valid, correct, entropy, tokens = counts.tolist()
    metrics = trainer._metrics["train"]
    metrics["entropy"].append(entropy / valid if valid else 0.0)
    metrics["mean_token_accuracy"].append(correct / valid if valid else 0.0)
    trainer._total_train_tokens += int(tokens)
    metrics["num_tokens"] = [trainer._total_train_tokens]


def scaled_loss(trainer: SFTTrainer, loss_sum, scored, num_items_in_batch):
    """The micro-batch's loss as TRL's: the sum over the step's scored tokens (`num_items_in_batch`, all ranks'),
    times the ranks when the Trainer averages tokens across them (DDP then averages the gradients)."""
    denominator = scored if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=scored.device)
    loss = loss_sum / denominator.clamp(min=1)
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * trainer.accelerator.num_processes
    return loss


class LogitsLossSFTTrainer(SFTTrainer):
    """TRL's `SFTTrainer` whose training loss and step metrics come from the model's logits (`token_loss`), not
    TRL's fused LM head; evaluation, mixture-of-experts auxiliary losses and callers that want the outputs go
    through TRL's compute_loss as before. If TRL changed what this relies on (checked once, when the trainer is
    made), it trains as TRL does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trl_changed = bool(trl_internals_problems(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not model.training or getattr(self, "aux_loss_enabled", False) or self.trl_changed:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        model_inputs = {name: value for name, value in inputs.items() if name != "labels"}
        loss_sum, scored, hits, entropy_sum = token_loss(model, inputs["labels"], only_scored=True, **model_inputs)
        record_step_metrics(self, inputs, scored, hits, entropy_sum)
        return scaled_loss(self, loss_sum, scored, num_items_in_batch)
