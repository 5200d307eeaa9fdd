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
padded eager step computes. The loss comes from the logits (finetune/training/loss.py) instead of TRL's
chunked head, which selects the scored positions with a data-dependent shape.

Gradients come out of the graph in static buffers that the next replay overwrites, so graphs are used
with one micro-batch per optimizer step only (the fast step's shape); an out-of-memory retry that
halves the micro-batch trains eagerly.
"""

from __future__ import annotations

import gc
import logging

import torch
import torch.nn.functional as F
import trl
from torch.nn.attention import SDPBackend, sdpa_kernel
from trl import SFTTrainer

from finetune.core.errors import InternalError
from finetune.training.loss import IGNORE, record_step_metrics, scaled_loss, token_loss, trl_internals_problems

# Attention kernels for the fast step. cuDNN's is left out: it builds a plan for every new shape, measured
# on an H200 (7B shape) at 21 ms per layer's backward and 12 ms per forward while capturing (4 s of the
# warm-up and capture), and again at every new packed length of the eager step. Flash and memory-efficient
# attention need no plan. A graph keeps the kernel chosen at capture.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
LENGTH_MULTIPLE = 8  # tensor-core friendly static lengths


def attention_kernels():
    """The context the fast step trains in: SDPA limited to ATTENTION_BACKENDS."""
    return sdpa_kernel(ATTENTION_BACKENDS)


def static_length(lengths: list[int]) -> int:
    """The padded length every graphed micro-batch has: the longest example, rounded up to 8."""
    longest = max(lengths, default=1)
    return -(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE


class TokenLoss(torch.nn.Module):
    """loss.token_loss of a right-padded batch as a module of tensors in and out, so that the whole computation can
    be captured."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        return token_loss(self.model, labels, input_ids=input_ids)


def pad_to(tensor: torch.Tensor, rows: int, length: int, value: int) -> torch.Tensor:
    """`tensor` [r, n] right-padded with `value` to [rows, length]."""
    r, n = tensor.shape
    if r > rows or n > length:
        raise InternalError(f"a micro-batch of {r} x {n} tokens does not fit the static {rows} x {length}")
    return F.pad(tensor, (0, length - n, 0, rows - r), value=value)


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
        record_step_metrics(self, inputs, scored, hits, entropy_sum)
        return scaled_loss(self, loss_sum, scored, num_items_in_batch)
