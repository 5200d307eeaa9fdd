"""The fast step on a CUDA GPU, replayed from a CUDA graph.

On a GPU the fast step of short examples is bound by the host: the eager step launches thousands of
small kernels (per layer: 4-bit dequantization, LoRA, norms, attention) and the GPU waits for them. A
CUDA graph records the forward and backward once and replays them as one launch each
(`torch.cuda.make_graphed_callables`); the Trainer still runs the rest of the step (clipping, the
optimizer, the scheduler, logging, checkpoints, resume) as before.

A graph needs the same shapes at every replay and no host synchronization inside. So each micro-batch
is right-padded to one static `[rows, length]` (the longest example of the data set, rounded up to 8)
with the padding's labels at -100, and the model runs without an attention mask: under the causal mask
a real token never sees the padding after it, so the loss of the real tokens is the one the packed or
padded eager step computes. The loss is summed here (cross-entropy over the logits) instead of by TRL's
chunked head, which selects the scored positions with a data-dependent shape.

Gradients come out of the graph in static buffers that the next replay overwrites, so graphs are used
with one micro-batch per optimizer step only (the fast step's shape); an out-of-memory retry that
halves the micro-batch trains eagerly.
"""

from __future__ import annotations

import gc
import inspect
import logging

import torch
import torch.nn.functional as F
import trl
from torch.nn.attention import SDPBackend, sdpa_kernel
from trl import SFTTrainer

from finetune.core.errors import InternalError

IGNORE = -100
LENGTH_MULTIPLE = 8  # tensor-core friendly static lengths
# Attention kernels for the fast step. cuDNN's is left out: it builds a plan for every new shape, measured
# on an H200 (7B shape) at 21 ms per layer's backward and 12 ms per forward while capturing (4 s of the
# warm-up and capture), and again at every new packed length of the eager step. Flash and memory-efficient
# attention need no plan. A graph keeps the kernel chosen at capture.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# What the graphed step borrows from TRL: it replaces SFTTrainer.compute_loss (called with these
# parameters), and so keeps TRL's private step metrics up to date itself: `_metrics["train"][name]`, which
# TRL's log() averages and clears, and the running token count `_total_train_tokens`.
# tests/test_borrowed.py runs TRL's own compute_loss and checks that it still writes exactly these.
COMPUTE_LOSS_PARAMETERS = ("model", "inputs", "return_outputs", "num_items_in_batch")
TRL_STEP_METRICS = ("entropy", "mean_token_accuracy", "num_tokens")


def attention_kernels():
    """The context the fast step trains in: SDPA limited to ATTENTION_BACKENDS."""
    return sdpa_kernel(ATTENTION_BACKENDS)


def static_length(lengths: list[int]) -> int:
    """The padded length every graphed micro-batch has: the longest example, rounded up to 8."""
    longest = max(lengths, default=1)
    return -(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE


class TokenLoss(torch.nn.Module):
    """(sum of the response tokens' negative log-likelihood, scored tokens, top-1 hits, entropy sum) of a
    right-padded batch: tensors only, so that the whole computation can be captured."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        logits = self.model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
        targets = labels[:, 1:]
        loss_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        with torch.no_grad():
            scored = targets != IGNORE
            log_probs = logits.log_softmax(-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            hits = (logits.argmax(-1) == targets) & scored
            return loss_sum, scored.sum(), hits.sum(), (entropy * scored).sum()


def pad_to(tensor: torch.Tensor, rows: int, length: int, value: int) -> torch.Tensor:
    """`tensor` [r, n] right-padded with `value` to [rows, length]."""
    r, n = tensor.shape
    if r > rows or n > length:
        raise InternalError(f"a micro-batch of {r} x {n} tokens does not fit the static {rows} x {length}")
    return F.pad(tensor, (0, length - n, 0, rows - r), value=value)


def trl_internals_problems(trainer: SFTTrainer) -> list[str]:
    """What the graphed step needs of TRL's trainer and does not find; empty when all is there."""
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


class GraphedSFTTrainer(SFTTrainer):
    """TRL's `SFTTrainer` whose training forward and backward are replayed from one CUDA graph.

    `static_shape` is (rows, length) of every micro-batch. If capture fails (a model whose forward
    synchronizes with the host, say), the trainer logs why and goes on eagerly through TRL's own loss.
    """

    def __init__(self, *args, static_shape: tuple[int, int], pad_token_id: int, logger: logging.Logger, **kwargs):
        super().__init__(*args, **kwargs)
        self.static_shape = static_shape
        self.pad_token_id = pad_token_id
        self.graph_logger = logger
        self.graphed: TokenLoss | None = None
        self.graph_failed = False
        if problems := trl_internals_problems(self):  # train as TRL does rather than log wrong metrics
            self.graph_failed = True
            logger.warning("train: TRL %s changed what the CUDA graph step relies on (%s); training eagerly", trl.__version__, "; ".join(problems))

    def _graphed_loss(self, model) -> TokenLoss | None:
        if self.graphed is None and not self.graph_failed:
            rows, length = self.static_shape
            device = next(p for p in model.parameters() if p.requires_grad).device
            sample = (
                torch.full((rows, length), self.pad_token_id, dtype=torch.long, device=device),
                torch.full((rows, length), IGNORE, dtype=torch.long, device=device),
            )
            sample[1][:, 1:] = 0  # every position scored while capturing: the warm-up exercises the whole graph
            try:
                with attention_kernels():
                    self.graphed = torch.cuda.make_graphed_callables(TokenLoss(model), sample)
            except RuntimeError as error:
                self.graph_failed = True
                self.graph_logger.warning("train: CUDA graph capture failed (%s); training eagerly", error)
            else:
                self.graph_logger.info("train: forward and backward captured as a CUDA graph of %d x %d tokens", rows, length)
        return self.graphed

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.release_graph()

    def release_graph(self) -> None:
        """Give back the graph's memory now, not when the process ends (a worker trains again and again).

        Its private pool goes with the graph objects, which reference cycles keep until a collection. The
        warm-up and capture also ran on side streams, and cuBLAS keeps a workspace for each stream it ran on
        through PyTorch's allocator: 128 MiB after one capture, measured on an H200, which PyTorch's private
        `_cuda_clearCublasWorkspaces` gives back (recreated on demand)."""
        if self.graphed is not None:
            self.graphed.__dict__.pop("forward", None)  # make_graphed_callables set the replaying forward here
            self.graphed = None
            gc.collect()
            clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear_workspaces is not None:
                clear_workspaces()
            torch.cuda.empty_cache()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        graphed = self._graphed_loss(model) if model.training and not return_outputs else None
        if graphed is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        rows, length = self.static_shape
        input_ids = pad_to(inputs["input_ids"], rows, length, self.pad_token_id)
        labels = pad_to(inputs["labels"], rows, length, IGNORE)
        loss_sum, scored, hits, entropy_sum = graphed(input_ids, labels)
        denominator = scored if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=scored.device)
        loss = loss_sum / denominator.clamp(min=1)
        # The metrics TRL logs for this step, in one host synchronization.
        real_tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(inputs["input_ids"].numel())
        valid, correct, entropy, tokens = torch.stack(
            [scored.float(), hits.float(), entropy_sum.float(), real_tokens.to(scored.device).float()]
        ).tolist()
        metrics = self._metrics["train"]
        metrics["entropy"].append(entropy / valid if valid else 0.0)
        metrics["mean_token_accuracy"].append(correct / valid if valid else 0.0)
        self._total_train_tokens += int(tokens)
        metrics["num_tokens"] = [self._total_train_tokens]
        return loss
