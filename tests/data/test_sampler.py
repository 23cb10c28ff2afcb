"""lit_sft.data.sampler: every rank's view of the step plan, checked against facts computed from the rows alone.

The step's set of rows is fixed by ``torch.randperm(seed + epoch)`` cut into ``rows_per_step`` chunks (recomputed
here); within a step the planner may deal rows to ranks and micro-batches as it likes, as long as every rank runs the
same number of micro-batches, row mode keeps ``micro_batch_size`` rows per micro-batch and the ranks' compute is
balanced (:func:`test_ranks_are_balanced_by_compute`).
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict

import pytest
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader, Dataset

import torch

from lit_sft.data.sampler import StepBatchSampler, plan_epoch, row_cost

# (rows, micro_batch_size, gradient_accumulation_steps, world_size): divisible, ragged last step, last step shorter
# than one micro-batch per rank (fillers), a single step, fewer rows than ranks
CASES = [(24, 2, 3, 2), (23, 2, 3, 2), (17, 3, 2, 4), (7, 4, 1, 2), (5, 1, 4, 1), (3, 1, 1, 4), (50, 3, 4, 3)]


def _num_loss_tokens(n: int) -> list[int]:
    rng = random.Random(n)
    return [rng.randint(1, 500) for _ in range(n)]


def _step_rows(n: int, rows_per_step: int, seed: int, epoch: int) -> list[set[int]]:
    """The rows of each step: consecutive chunks of ``torch.randperm(n)`` seeded with ``seed + epoch``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [set(order[i:i + rows_per_step]) for i in range(0, n, rows_per_step)]


def _run(num_loss_tokens, mbs, gas, world, epoch=0, steps_done=0, seed=42, shuffle=True, **kwargs):
    """Every rank's micro-batches for one epoch, as {rank: [[MicroBatchItem, ...], ...]}."""
    out = {}
    for rank in range(world):
        sampler = StepBatchSampler(num_loss_tokens, mbs, gas, world_size=world, rank=rank, seed=seed,
                                   shuffle=shuffle, steps_done=lambda: steps_done, **kwargs)
        sampler.set_epoch(epoch)
        out[rank] = list(sampler)
    return out


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("n, mbs, gas, world", CASES)
def test_one_epoch_across_ranks(n, mbs, gas, world, padded):
    nlt = _num_loss_tokens(n)
    lengths = [t + 7 * (i % 5) for i, t in enumerate(nlt)]
    batches = _run(nlt, mbs, gas, world, lengths=lengths, padded=padded)
    rows_per_step = mbs * gas * world
    steps = math.ceil(n / rows_per_step)

    # every row exactly once per epoch (counting supervised rows over all ranks)
    supervised = [item.row for mbs_ in batches.values() for mb in mbs_ for item in mb if item.supervised]
    assert sorted(supervised) == list(range(n))

    per_step_rows = defaultdict(list)
    per_rank_step_count = {rank: Counter() for rank in batches}
    fillers = Counter()
    for rank, micro_batches in batches.items():
        assert len(micro_batches) == len(StepBatchSampler(nlt, mbs, gas, world, rank, lengths=lengths, padded=padded))
        for j, mb in enumerate(micro_batches):
            assert 1 <= len(mb) <= mbs
            step = mb[0].step
            assert all(item.step == step for item in mb)
            per_rank_step_count[rank][step] += 1
            per_step_rows[step] += [item for item in mb if item.supervised]
            if not mb[0].supervised:  # a filler micro-batch: one fully masked row, only in the last step
                assert len(mb) == 1 and step == steps - 1
                fillers[step] += 1
            # last_in_step marks exactly this rank's last micro-batch of the step
            is_last = j == len(micro_batches) - 1 or micro_batches[j + 1][0].step != step
            assert all(item.last_in_step == is_last for item in mb)

    assert sorted(per_step_rows) == list(range(steps))
    expected_rows = _step_rows(n, rows_per_step, seed=42, epoch=0)
    for step, items in per_step_rows.items():
        # each step covers exactly the rows of its chunk of the seeded permutation, each once
        assert sorted(item.row for item in items) == sorted(expected_rows[step])
        # num_items_in_batch = supervised tokens of the step's supervised rows over all ranks, as every rank sees it
        total = sum(nlt[item.row] for item in items)
        for micro_batches in batches.values():
            assert {item.num_items_in_batch for mb in micro_batches for item in mb if item.step == step} == {total}
        # fillers only where rows are too few to give every micro-batch of every rank one row
        per_rank = counts_of(per_rank_step_count, step)
        assert fillers[step] == max(0, world * per_rank - len(items))
    # all ranks run the same number of micro-batches per step: gradient_accumulation_steps, except in the last step
    counts = list(per_rank_step_count.values())
    assert all(c == counts[0] for c in counts)
    assert all(counts[0][s] == gas for s in range(steps - 1))
    assert 1 <= counts[0][steps - 1] <= gas


def counts_of(per_rank_step_count, step):
    counts = {c[step] for c in per_rank_step_count.values()}
    assert len(counts) == 1
    return counts.pop()


def test_fillers_only_when_rows_are_too_few():
    # 18 rows, 2 per micro-batch, 2 micro-batches per rank, 2 ranks: steps of 8, 8, 2 rows; the last step's 2 rows go
    # one to each rank (rank 1 used to get a filler)
    batches = _run(_num_loss_tokens(18), 2, 2, 2)
    last = {rank: [mb for mb in micro_batches if mb[0].step == 2] for rank, micro_batches in batches.items()}
    assert [[[item.supervised for item in mb] for mb in v] for v in last.values()] == [[[True]], [[True]]]
    # 3 rows, 1 per micro-batch, 4 ranks: the 4th rank runs a filler, the step's shortest row with no label
    nlt = [30, 10, 20]
    batches = _run(nlt, 1, 1, 4)
    assert sorted(mb[0].row for v in batches.values() for mb in v if mb[0].supervised) == [0, 1, 2]
    fillers = [mb for v in batches.values() for mb in v if not mb[0].supervised]
    assert [[item.row for item in mb] for mb in fillers] == [[1]]


@pytest.mark.parametrize("n, mbs, gas, world", [(23, 2, 3, 2), (50, 3, 4, 3)])
def test_resume_yields_the_tail(n, mbs, gas, world):
    nlt = _num_loss_tokens(n)
    steps_per_epoch = math.ceil(n / (mbs * gas * world))
    for epoch in (0, 1):
        full = _run(nlt, mbs, gas, world, epoch=epoch)
        for k in range(steps_per_epoch + 1):
            resumed = _run(nlt, mbs, gas, world, epoch=epoch, steps_done=epoch * steps_per_epoch + k)
            for rank in range(world):
                tail = [mb for mb in full[rank] if mb[0].step >= k]
                assert resumed[rank] == tail, (epoch, k, rank)
                assert len(tail) < len(full[rank]) or k == 0


def _order(micro_batches_by_rank) -> list[int]:
    return [item.row for micro_batches in micro_batches_by_rank.values() for mb in micro_batches for item in mb]


def test_set_epoch_changes_order_deterministically():
    nlt = _num_loss_tokens(40)
    epoch0, epoch1 = _run(nlt, 2, 2, 2, epoch=0), _run(nlt, 2, 2, 2, epoch=1)
    assert _order(epoch0) != _order(epoch1)
    assert sorted(_order(epoch0)) == sorted(_order(epoch1)) == list(range(40))
    assert _run(nlt, 2, 2, 2, epoch=1) == epoch1
    assert _order(_run(nlt, 2, 2, 2, epoch=0, seed=7)) != _order(epoch0)
    unshuffled = _run(nlt, 2, 1, 1, shuffle=False)[0]  # steps of 2 rows in file order
    assert [sorted(item.row for item in mb) for mb in unshuffled] == [[i, i + 1] for i in range(0, 40, 2)]


class _RowOf(Dataset):
    def __getitem__(self, item):
        return item.row


def test_lightning_set_epoch_reaches_the_sampler():
    nlt = _num_loss_tokens(12)
    sampler = StepBatchSampler(nlt, 2, 2)
    loader = DataLoader(_RowOf(), batch_sampler=sampler, collate_fn=lambda rows: rows)
    _set_sampler_epoch(loader, 3)  # what Lightning's fit loop calls at each epoch start
    assert sampler.epoch == 3
    fresh = StepBatchSampler(nlt, 2, 2)
    fresh.set_epoch(3)
    assert list(loader) == [[item.row for item in mb] for mb in fresh]
    assert list(loader) != [[item.row for item in mb] for mb in StepBatchSampler(nlt, 2, 2)]


def test_plan_epoch_rejects_bad_sizes():
    with pytest.raises(ValueError, match="micro_batch_size"):
        plan_epoch([1, 2], 0, 1, 1, seed=0, epoch=0)
    with pytest.raises(ValueError, match="empty"):
        plan_epoch([], 1, 1, 1, seed=0, epoch=0)


def _lognormal_lengths(n: int, median: int, max_length: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(max(int(rng.lognormvariate(math.log(median), 1.0)), 16), max_length) for _ in range(n)]


def _imbalance(loads: list[float]) -> float:
    return max(loads) / (sum(loads) / len(loads))


def _round_robin_loads(rows: list[int], values, mbs: int, world: int) -> list[float]:
    """Each rank's load when micro-batch chunks of the step's rows are dealt round-robin (the plan before balancing,
    and accelerate's ``DataLoaderShard``)."""
    chunks = [rows[i:i + mbs] for i in range(0, len(rows), mbs)]
    return [sum(values[r] for c in chunks[rank::world] for r in c) for rank in range(world)]


@pytest.mark.parametrize("budget", [None, 4096], ids=["rows", "token-budget"])
def test_ranks_are_balanced_by_compute(budget):
    """Skewed lengths (lognormal, median 500, up to 4096 tokens), 4 ranks x 2 rows x 4 micro-batches: every rank's
    estimated compute (``row_cost``) is within a few percent of the mean; dealt round-robin it is not."""
    n, mbs, gas, world = 512, 2, 4, 4
    lengths = _lognormal_lengths(n, 500, 4096)
    cost = [row_cost(t) for t in lengths]
    plan = plan_epoch([t - 1 for t in lengths], mbs, gas, world, seed=1, epoch=0, lengths=lengths,
                      max_tokens_per_micro_batch=budget)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    balanced, naive = [], []
    for s, step in enumerate(plan):
        counts = {len(rank) for rank in step.micro_batches}
        assert len(counts) == 1  # every rank runs the same number of micro-batches
        for rank in step.micro_batches:
            for mb in rank:
                assert not mb.filler
                if budget is None:
                    assert len(mb.rows) == mbs  # full steps: micro_batch_size rows each, as today
                else:
                    assert len(mb.rows) == 1 or sum(lengths[r] for r in mb.rows) <= budget
        rows = order[s * 32:(s + 1) * 32]
        assert sorted(step.rows) == sorted(rows)  # the step's rows are today's
        balanced.append(_imbalance([sum(cost[r] for mb in rank for r in mb.rows) for rank in step.micro_batches]))
        naive.append(_imbalance(_round_robin_loads(rows, cost, mbs, world)))
    mean_balanced, mean_naive = sum(balanced) / len(balanced), sum(naive) / len(naive)
    print(f"{'rows' if budget is None else 'token budget'}: max/mean rank compute: balanced {mean_balanced:.3f} "
          f"(worst {max(balanced):.3f}), round-robin {mean_naive:.3f} (worst {max(naive):.3f})")
    assert mean_balanced < 1.03 and max(balanced) < 1.1
    assert mean_naive > 1.2


def test_padded_micro_batches_group_similar_lengths_and_padding_free_ones_balance_tokens():
    """Within a rank, padded micro-batches take rows of similar length (less padding); padding-free ones balance
    tokens (lower peak memory). Either way the rank's rows are the same."""
    lengths = _lognormal_lengths(64, 500, 4096, seed=3)
    padded = plan_epoch(lengths, 4, 4, 2, seed=0, epoch=0, lengths=lengths, padded=True)
    free = plan_epoch(lengths, 4, 4, 2, seed=0, epoch=0, lengths=lengths, padded=False)
    for p, f in zip(padded, free):
        for rank_p, rank_f in zip(p.micro_batches, f.micro_batches):
            assert sorted(r for mb in rank_p for r in mb.rows) == sorted(r for mb in rank_f for r in mb.rows)
            slots = lambda rank: sum(len(mb.rows) * max(lengths[r] for r in mb.rows) for mb in rank)  # noqa: E731
            tokens = lambda rank: [sum(lengths[r] for r in mb.rows) for mb in rank]  # noqa: E731
            assert slots(rank_p) <= slots(rank_f)
            assert max(tokens(rank_f)) <= max(tokens(rank_p))
            # padded: consecutive runs of the rank's rows sorted longest first
            ordered = [r for mb in rank_p for r in mb.rows]
            assert [lengths[r] for r in ordered] == sorted((lengths[r] for r in ordered), reverse=True)
