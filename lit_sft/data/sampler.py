"""Optimizer-step planning: which rows each rank trains on, in which micro-batch, for every optimizer step.

One optimizer step covers ``rows_per_step = micro_batch_size * gradient_accumulation_steps * world_size`` rows (the
recipe's ``per_device_train_batch_size x gradient_accumulation_steps x num_processes``). Every rank builds the same
plan from the same seed, so each knows, without communication, the number of supervised tokens in the *whole*
step (all micro-batches, all ranks): the denominator of the token-normalised loss (see ``lit_sft/loss.py``).

Row order: a permutation drawn from ``torch.Generator().manual_seed(seed + epoch)`` (or file order with
``shuffle=False``). Step ``s`` takes the next ``rows_per_step`` rows; within it, micro-batch chunks of
``micro_batch_size`` rows are dealt round-robin to ranks, as accelerate's ``DataLoaderShard`` does.
The last step of an epoch may hold fewer rows; ranks left with fewer micro-batches than others get *filler*
micro-batches (a real row with every label masked), so every rank runs the same number of forward/backward passes
(ZeRO-3 gathers parameters collectively in each forward) and the filler adds exactly zero to loss and gradient.

Resuming: the plan is a pure function of (seed, epoch), so skipping the first ``k`` steps of an epoch reproduces
the uninterrupted order exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler


@dataclass(frozen=True)
class MicroBatchItem:
    """One row reference inside a planned micro-batch.

    Attributes:
        row: index into the tokenized dataset.
        supervised: ``False`` for filler rows, whose labels the collator masks out entirely.
        step: optimizer step index within the epoch (0-based).
        step_loss_tokens: supervised tokens in the whole optimizer step, summed over all micro-batches and ranks.
        last_in_step: whether this micro-batch is this rank's last one of the step (the optimizer steps after it).
    """

    row: int
    supervised: bool
    step: int
    step_loss_tokens: int
    last_in_step: bool


def plan_epoch(
    num_loss_tokens: Sequence[int],
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    lengths: Optional[Sequence[int]] = None,
    max_tokens_per_micro_batch: Optional[int] = None,
) -> list[list[list[tuple[int, bool]]]]:
    """Plan every optimizer step of one epoch.

    Args:
        num_loss_tokens: supervised tokens of each row, length ``N``.
        micro_batch_size: rows per micro-batch per rank.
        gradient_accumulation_steps: micro-batches per rank per optimizer step.
        world_size: number of data-parallel ranks.
        seed, epoch: the row order is drawn from ``seed + epoch``.
        shuffle: draw a permutation (``True``) or keep dataset order.
        lengths: tokens of each row; needed with ``max_tokens_per_micro_batch``.
        max_tokens_per_micro_batch: token budget of a micro-batch. The step's rows (still ``rows_per_step``) are
            then dealt to ranks by tokens (longest first, to the least-loaded rank) and packed first-fit-decreasing
            into micro-batches of at most this many tokens, instead of ``micro_batch_size`` rows each.

    Returns:
        ``plan[step][rank * G + j]`` is micro-batch ``j`` of ``rank`` as ``[(row, supervised), ...]``, with
        ``G`` micro-batches per rank for that step (``gradient_accumulation_steps`` in row mode, except possibly in
        the last step; with a token budget, as many as the busiest rank needs). Steps hold
        ``ceil(N / rows_per_step)`` entries.

    Raises:
        ValueError: a non-positive size, or an empty dataset.
    """
    if min(micro_batch_size, gradient_accumulation_steps, world_size) < 1:
        raise ValueError("micro_batch_size, gradient_accumulation_steps and world_size must all be >= 1")
    n = len(num_loss_tokens)
    if n == 0:
        raise ValueError("the training set is empty after preprocessing")
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(n))
    rows_per_step = micro_batch_size * gradient_accumulation_steps * world_size
    if max_tokens_per_micro_batch is not None:
        if lengths is None or len(lengths) != n:
            raise ValueError("a token budget needs the length of every row")
        return [_token_budget_step(order[start:start + rows_per_step], lengths, world_size,
                                   max_tokens_per_micro_batch) for start in range(0, n, rows_per_step)]
    plan = []
    for start in range(0, n, rows_per_step):
        rows = order[start:start + rows_per_step]
        chunks = [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
        per_rank = math.ceil(len(chunks) / world_size)
        step = []
        for rank in range(world_size):
            for j in range(per_rank):
                c = j * world_size + rank
                if c < len(chunks):
                    step.append([(row, True) for row in chunks[c]])
                else:  # filler: the step's first row, fully masked, so this rank keeps pace
                    step.append([(rows[0], False)])
        plan.append(step)
    return plan


def _token_budget_step(rows: list[int], lengths: Sequence[int], world_size: int,
                       budget: int) -> list[list[tuple[int, bool]]]:
    """One step's micro-batches under a token budget: ``world_size x G`` lists of ``(row, supervised)``.

    Ranks get rows longest-first to the least-loaded rank (balanced tokens, not counts); each rank packs its rows
    first-fit-decreasing into micro-batches of at most ``budget`` tokens (a longer row goes alone). Ranks then
    equalise their micro-batch count ``G``: first by splitting their largest multi-row micro-batch, else with a
    filler (the step's shortest row, fully masked).
    """
    by_length = sorted(rows, key=lambda r: (-lengths[r], r))
    per_rank: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for row in by_length:
        rank = min(range(world_size), key=lambda k: (load[k], k))
        per_rank[rank].append(row)
        load[rank] += lengths[row]
    packed = []
    for rank_rows in per_rank:
        bins: list[list[int]] = []
        room: list[int] = []
        for row in rank_rows:  # already longest first
            for b, free in enumerate(room):
                if lengths[row] <= free:
                    bins[b].append(row)
                    room[b] -= lengths[row]
                    break
            else:
                bins.append([row])
                room.append(budget - lengths[row])
        packed.append(bins)
    g = max(len(bins) for bins in packed)
    filler = min(rows, key=lambda r: (lengths[r], r))
    step = []
    for bins in packed:
        while len(bins) < g and any(len(b) > 1 for b in bins):
            big = max((b for b in bins if len(b) > 1), key=lambda b: sum(lengths[r] for r in b))
            bins.remove(big)
            bins += [big[0::2], big[1::2]]
        step += [[(row, True) for row in b] for b in bins]
        step += [[(filler, False)] for _ in range(g - len(bins))]
    return step


class StepBatchSampler(Sampler[list[MicroBatchItem]]):
    """Yields this rank's micro-batches, one optimizer step after another, as lists of :class:`MicroBatchItem`.

    Use it as a ``DataLoader`` ``batch_sampler``. ``steps_done`` (a callable, usually reading the trainer's
    ``global_step``) is read at the start of every epoch so that a resumed run skips the steps it already took.
    """

    def __init__(
        self,
        num_loss_tokens: Sequence[int],
        micro_batch_size: int,
        gradient_accumulation_steps: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 42,
        shuffle: bool = True,
        steps_done: Optional[Callable[[], int]] = None,
        lengths: Optional[Sequence[int]] = None,
        max_tokens_per_micro_batch: Optional[int] = None,
    ) -> None:
        self.num_loss_tokens = list(num_loss_tokens)
        self.micro_batch_size = micro_batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.world_size, self.rank = world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.steps_done = steps_done or (lambda: 0)
        self.lengths = list(lengths) if lengths is not None else None
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.epoch = 0
        # Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``, not on the batch sampler itself.
        self.sampler = self
        self.steps_per_epoch = math.ceil(
            len(self.num_loss_tokens) / (micro_batch_size * gradient_accumulation_steps * world_size)
        )

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start; selects the epoch's row order."""
        self.epoch = epoch

    def _plan(self) -> list[list[list[tuple[int, bool]]]]:
        return plan_epoch(self.num_loss_tokens, self.micro_batch_size, self.gradient_accumulation_steps,
                          self.world_size, self.seed, self.epoch, self.shuffle, self.lengths,
                          self.max_tokens_per_micro_batch)

    def __iter__(self) -> Iterator[list[MicroBatchItem]]:
        """This rank's micro-batches of epoch ``self.epoch``, after the steps of it already taken.

        Raises:
            RuntimeError: ``steps_done()`` lies past the end of this epoch: the sampler was asked for an epoch the
                run has already finished (it would yield nothing, and the run would silently train nothing).
        """
        done = self.steps_done()
        skip = max(0, done - self.epoch * self.steps_per_epoch)
        if skip > self.steps_per_epoch:
            raise RuntimeError(
                f"StepBatchSampler: asked for epoch {self.epoch} at optimizer step {done}, which lies past its end "
                f"({self.steps_per_epoch} steps per epoch); set_epoch() must be called before the loader is iterated")
        for s, step in enumerate(self._plan()):
            if s < skip:
                continue
            loss_tokens = sum(self.num_loss_tokens[r] for mb in step for r, sup in mb if sup)
            per_rank = len(step) // self.world_size
            mine = step[self.rank * per_rank:(self.rank + 1) * per_rank]
            for j, micro_batch in enumerate(mine):
                yield [MicroBatchItem(r, sup, s, loss_tokens, j == per_rank - 1) for r, sup in micro_batch]

    def __len__(self) -> int:
        """Micro-batches this rank yields in a full epoch."""
        return sum(len(step) // self.world_size for step in self._plan())
