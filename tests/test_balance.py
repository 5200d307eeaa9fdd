"""Data-parallel ranks get even shares of each step's tokens, and the steps stay those of one process:
the sampler read through accelerate's own sharding, as a rank's dataloader reads it."""

from __future__ import annotations

import random

from accelerate.data_loader import BatchSamplerShard, SeedableRandomSampler
from torch.utils.data import BatchSampler

from finetune.balance import RankBalancedSampler, deal


def _rank_steps(new_sampler, ranks: int, batch_size: int, grad_accum: int, epoch: int = 0) -> list[list[list[int]]]:
    """steps[s][r]: the examples rank r trains on in step s of `epoch` (its grad_accum micro-batches);
    each rank has a sampler of its own (`new_sampler()`), as each rank process does."""
    per_rank = []
    for rank in range(ranks):
        sampler = new_sampler()
        sampler.set_epoch(epoch)
        batches = list(BatchSamplerShard(BatchSampler(sampler, batch_size, drop_last=False), num_processes=ranks, process_index=rank))
        per_rank.append([sum(batches[i : i + grad_accum], []) for i in range(0, len(batches), grad_accum)])
    return [list(step) for step in zip(*per_rank)]


def _one_process_steps(n: int, seed: int, epoch: int, step_size: int) -> list[list[int]]:
    order = SeedableRandomSampler(data_source=range(n), data_seed=seed)
    order.set_epoch(epoch)
    indices = list(order)
    return [indices[i : i + step_size] for i in range(0, len(indices), step_size)]


def test_two_ranks_train_each_step_of_one_process_with_the_tokens_split_evenly():
    lengths = [random.Random(i).randint(256, 2048) for i in range(400)]
    ranks, batch_size, grad_accum = 2, 1, 2
    for epoch in (0, 1):
        balanced = _rank_steps(
            lambda: RankBalancedSampler(range(len(lengths)), lengths, ranks, batch_size, grad_accum, data_seed=7), ranks, batch_size, grad_accum, epoch
        )  # fmt: skip
        reference = _one_process_steps(len(lengths), 7, epoch, ranks * batch_size * grad_accum)
        assert [sorted(sum(step, [])) for step in balanced] == [sorted(step) for step in reference]
        for step, plain in zip(balanced, reference):
            # accelerate alone: micro-batches in turn, rank 0 gets positions 0 and 2
            alone = max(lengths[plain[0]] + lengths[plain[2]], lengths[plain[1]] + lengths[plain[3]])
            assert max(sum(lengths[i] for i in share) for share in step) <= alone
    assert _one_process_steps(len(lengths), 7, 0, 4) != _one_process_steps(len(lengths), 7, 1, 4)  # epochs reshuffle


def test_the_busiest_rank_carries_less_than_with_turns_alone():
    lengths = [random.Random(i).randint(16, 4096) for i in range(960)]
    ranks, batch_size, grad_accum = 4, 2, 3
    busiest = {}
    for name, new_sampler in {
        "balanced": lambda: RankBalancedSampler(range(len(lengths)), lengths, ranks, batch_size, grad_accum, data_seed=0),
        "turns": lambda: SeedableRandomSampler(data_source=range(len(lengths)), data_seed=0),
    }.items():
        steps = _rank_steps(new_sampler, ranks, batch_size, grad_accum)
        assert all(len(share) == batch_size * grad_accum for step in steps for share in step)
        busiest[name] = sum(max(sum(lengths[i] for i in share) for share in step) / (sum(lengths[i] for i in sum(step, [])) / ranks) for step in steps) / len(steps)
    assert busiest["balanced"] < 1.05 < busiest["turns"]


def test_a_step_is_dealt_longest_first_to_the_rank_with_fewest_tokens():
    lengths = {10: 100, 11: 900, 12: 120, 13: 880, 14: 500, 15: 510, 16: 90, 17: 905}
    order = deal(list(lengths), lengths, ranks=2, batch_size=2)
    # micro-batches in turn: rank 0 [905, 510], rank 1 [900, 880], rank 0 [500, 90], rank 1 [120, 100]:
    # 2,005 tokens against 2,000, and inside each rank the longest examples share a micro-batch
    assert [lengths[i] for i in order] == [905, 510, 900, 880, 500, 90, 120, 100]
