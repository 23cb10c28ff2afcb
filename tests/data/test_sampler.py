"""lit_sft.data.sampler: every rank's view of the step plan, checked against facts computed from the rows alone."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict

import pytest
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader, Dataset

from lit_sft.data.sampler import StepBatchSampler, plan_epoch

# (rows, micro_batch_size, gradient_accumulation_steps, world_size): divisible, ragged last step, last step shorter
# than one micro-batch per rank (fillers), a single step, fewer rows than ranks
CASES = [(24, 2, 3, 2), (23, 2, 3, 2), (17, 3, 2, 4), (7, 4, 1, 2), (5, 1, 4, 1), (3, 1, 1, 4), (50, 3, 4, 3)]


def _num_loss_tokens(n: int) -> list[int]:
    rng = random.Random(n)
    return [rng.randint(1, 500) for _ in range(n)]


def _run(num_loss_tokens, mbs, gas, world, epoch=0, steps_done=0, seed=42, shuffle=True):
    """Every rank's micro-batches for one epoch, as {rank: [[MicroBatchItem, ...], ...]}."""
    out = {}
    for rank in range(world):
        sampler = StepBatchSampler(num_loss_tokens, mbs, gas, world_size=world, rank=rank, seed=seed,
                                   shuffle=shuffle, steps_done=lambda: steps_done)
        sampler.set_epoch(epoch)
        out[rank] = list(sampler)
    return out


@pytest.mark.parametrize("n, mbs, gas, world", CASES)
def test_one_epoch_across_ranks(n, mbs, gas, world):
    nlt = _num_loss_tokens(n)
    batches = _run(nlt, mbs, gas, world)
    rows_per_step = mbs * gas * world
    steps = math.ceil(n / rows_per_step)

    # every row exactly once per epoch (counting supervised rows over all ranks)
    supervised = [item.row for mbs_ in batches.values() for mb in mbs_ for item in mb if item.supervised]
    assert sorted(supervised) == list(range(n))

    per_step_rows = defaultdict(list)
    per_rank_step_count = {rank: Counter() for rank in batches}
    for rank, micro_batches in batches.items():
        assert len(micro_batches) == len(StepBatchSampler(nlt, mbs, gas, world, rank))
        for j, mb in enumerate(micro_batches):
            assert 1 <= len(mb) <= mbs
            step = mb[0].step
            assert all(item.step == step for item in mb)
            per_rank_step_count[rank][step] += 1
            per_step_rows[step] += [item for item in mb if item.supervised]
            if not mb[0].supervised:  # a filler micro-batch: one fully masked row, only in the last step
                assert len(mb) == 1 and step == steps - 1
            # last_in_step marks exactly this rank's last micro-batch of the step
            is_last = j == len(micro_batches) - 1 or micro_batches[j + 1][0].step != step
            assert all(item.last_in_step == is_last for item in mb)

    assert sorted(per_step_rows) == list(range(steps))
    for step, items in per_step_rows.items():
        # each step covers rows_per_step rows (fewer only in the last step)
        assert len(items) == min(rows_per_step, n - step * rows_per_step)
        # step_loss_tokens = supervised tokens of the step's supervised rows over all ranks, as every rank sees it
        total = sum(nlt[item.row] for item in items)
        for micro_batches in batches.values():
            assert {item.step_loss_tokens for mb in micro_batches for item in mb if item.step == step} == {total}
    # all ranks run the same number of micro-batches per step: gradient_accumulation_steps, except in the last step
    counts = list(per_rank_step_count.values())
    assert all(c == counts[0] for c in counts)
    assert all(counts[0][s] == gas for s in range(steps - 1))
    assert 1 <= counts[0][steps - 1] <= gas


def test_fillers_appear_when_the_last_step_is_short():
    # 18 rows, 2 per micro-batch, 2 micro-batches per rank, 2 ranks: steps of 8, 8, 2 rows; the last step has one
    # micro-batch for two ranks, so rank 1 gets a filler
    batches = _run(_num_loss_tokens(18), 2, 2, 2)
    last = {rank: [mb for mb in micro_batches if mb[0].step == 2] for rank, micro_batches in batches.items()}
    assert [len(v) for v in last.values()] == [1, 1]
    assert [[item.supervised for item in v[0]] for v in last.values()] == [[True, True], [False]]
    # 17 rows, 3 per micro-batch, 2 per rank, 4 ranks: one step of 6 chunks for 8 slots; ranks 2 and 3 get a filler
    batches = _run(_num_loss_tokens(17), 3, 2, 4)
    assert [[mb[0].supervised for mb in v] for v in batches.values()] == [[True, True], [True, True], [True, False],
                                                                          [True, False]]


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
    unshuffled = _run(nlt, 2, 1, 1, shuffle=False)[0]
    assert [item.row for mb in unshuffled for item in mb] == list(range(40))


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
