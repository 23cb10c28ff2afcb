"""Optimizer-step planning: which rows each rank trains on, in which micro-batch, for every optimizer step.

One optimizer step covers ``rows_per_step = micro_batch_size * gradient_accumulation_steps * world_size`` rows (the
recipe's ``per_device_train_batch_size x gradient_accumulation_steps x num_processes``). Every rank builds the same
plan from the same seed, so each knows, without communication, ``num_items_in_batch``: the supervised tokens of the
*whole* step (all micro-batches, all ranks), the denominator of the token-normalised loss (``lit_sft/loss.py``).

The rows of a step: a permutation drawn from ``torch.Generator().manual_seed(seed + epoch)`` (or file order with
``shuffle=False``); step ``s`` takes the next ``rows_per_step`` rows. This set alone fixes the step's loss.

Where each row goes within its step (rank, micro-batch) only changes speed, and is chosen for it:

* **ranks** are balanced by estimated compute (:func:`row_cost`: tokens plus attention's ``T^2`` term), longest
  first to the least-loaded rank (LPT); the slowest rank sets the step time. In row mode each rank takes exactly
  ``micro_batch_size * gradient_accumulation_steps`` rows (a micro-batch's memory is budgeted in rows).
* **micro-batches** of a rank: in row mode, ``micro_batch_size`` rows each, similar lengths together when batches
  are padded (less padding), balanced by tokens when they are padding-free (lower peak memory); with a token budget
  (``max_tokens_per_micro_batch``), packed best-fit-decreasing (:mod:`lit_sft.data.packing`) into micro-batches of at
  most that many tokens.
* every rank runs the **same number of micro-batches** in a step (ZeRO-3 gathers parameters collectively in each
  forward): in token-budget mode a rank with fewer splits its largest micro-batch; a rank still short (only in a
  short last step) runs *filler* micro-batches: the step's shortest row with every label masked, which adds exactly
  zero to the loss and the gradient.

Resuming: the plan is a pure function of (seed, epoch), so skipping the first ``k`` steps of an epoch reproduces
the uninterrupted order exactly.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler

from lit_sft.data.packing import best_fit_decreasing

# Row length at which causal attention costs as many training FLOPs as the matrix multiplications:
# ``n_matmul / (num_layers * hidden_size)`` in ``lit_sft.metrics.training_flops``; about 36k tokens for
# Qwen2.5-1.5B (1.54e9 / (28 * 1536)), 65k for Qwen2.5-7B. Only the balance between ranks depends on it.
ATTENTION_TOKENS = 32768


def row_cost(length: int, attention_tokens: int = ATTENTION_TOKENS) -> float:
    """Estimated training compute of a row of ``length`` tokens, in units of one token's matmul FLOPs:
    ``T * (1 + T / attention_tokens)``, proportional to :func:`lit_sft.metrics.training_flops`
    (``6 n_matmul T + 6 L d T^2``)."""
    return length * (1.0 + length / attention_tokens)


@dataclass(frozen=True)
class MicroBatch:
    """The rows of one planned micro-batch.

    Attributes:
        rows: indices into the tokenized (or packed) dataset.
        filler: the micro-batch is one row whose labels are all masked: it keeps a rank in step with the others and
            adds zero to the loss and the gradient.
    """

    rows: tuple[int, ...]
    filler: bool = False


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step.

    Attributes:
        micro_batches: ``micro_batches[rank][j]`` is micro-batch ``j`` of ``rank``; every rank has the same count.
        num_items_in_batch: supervised tokens of the step's rows, over all micro-batches and ranks.
    """

    micro_batches: tuple[tuple[MicroBatch, ...], ...]
    num_items_in_batch: int

    @property
    def rows(self) -> list[int]:
        """The step's rows (fillers excluded), rank by rank."""
        return [r for rank in self.micro_batches for mb in rank if not mb.filler for r in mb.rows]


@dataclass(frozen=True)
class MicroBatchItem:
    """One row reference inside a planned micro-batch, as :class:`StepBatchSampler` yields it.

    Attributes:
        row: index into the tokenized (or packed) dataset.
        supervised: ``False`` for filler rows, whose labels the collator masks out entirely.
        step: optimizer step index within the epoch (0-based; for inspection, not part of the batch).
        num_items_in_batch: supervised tokens in the whole optimizer step, summed over all micro-batches and ranks.
        last_in_step: whether this micro-batch is this rank's last one of the step (the optimizer steps after it).
    """

    row: int
    supervised: bool
    step: int
    num_items_in_batch: int
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
    padded: bool = True,
    attention_tokens: int = ATTENTION_TOKENS,
) -> list[StepPlan]:
    """Plan every optimizer step of one epoch (see the module docstring for the rules).

    Args:
        num_loss_tokens: supervised tokens of each row, length ``N``.
        micro_batch_size: rows per micro-batch per rank (row mode).
        gradient_accumulation_steps: micro-batches per rank per optimizer step (row mode).
        world_size: number of data-parallel ranks.
        seed, epoch: the row order is drawn from ``seed + epoch``.
        shuffle: draw a permutation (``True``) or keep dataset order.
        lengths: tokens of each row; default ``num_loss_tokens`` (a proxy, for tests).
        max_tokens_per_micro_batch: token budget of a micro-batch: the step's rows (still ``rows_per_step``) are
            packed into micro-batches of at most this many tokens (a longer row goes alone) instead of
            ``micro_batch_size`` rows each.
        padded: row mode only: micro-batches are padded to their longest row, so a rank's rows are grouped by
            length; ``False`` (padding-free) balances a rank's micro-batches by tokens instead.
        attention_tokens: see :data:`ATTENTION_TOKENS` (:func:`row_cost`).

    Returns:
        ``ceil(N / rows_per_step)`` :class:`StepPlan`; every rank has ``gradient_accumulation_steps`` micro-batches
        in a full step of row mode (fewer in a short last step); with a token budget, as many as the busiest needs.

    Raises:
        ValueError: a non-positive size, an empty dataset, or ``lengths`` of the wrong size.
    """
    if min(micro_batch_size, gradient_accumulation_steps, world_size) < 1:
        raise ValueError("micro_batch_size, gradient_accumulation_steps and world_size must all be >= 1")
    n = len(num_loss_tokens)
    if n == 0:
        raise ValueError("the training set is empty after preprocessing")
    lengths = num_loss_tokens if lengths is None else lengths
    if len(lengths) != n:
        raise ValueError(f"{len(lengths)} row lengths for {n} rows")
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(n))
    cost = [row_cost(t, attention_tokens) for t in lengths]
    rows_per_step = micro_batch_size * gradient_accumulation_steps * world_size
    plan = []
    for start in range(0, n, rows_per_step):
        rows = order[start:start + rows_per_step]
        if max_tokens_per_micro_batch is not None:
            ranks = _token_budget_step(rows, lengths, cost, world_size, max_tokens_per_micro_batch)
        else:
            ranks = _row_step(rows, lengths, cost, world_size, micro_batch_size, padded)
        plan.append(StepPlan(tuple(tuple(mbs) for mbs in ranks), sum(num_loss_tokens[r] for r in rows)))
    return plan


def _deal(rows: Sequence[int], cost: Sequence[float], bins: int, capacity: int, minimum: int) -> list[list[int]]:
    """Longest-processing-time-first: rows by decreasing cost, each to the least-loaded of ``bins`` that holds fewer
    than ``capacity`` rows; once the rows left are just enough to bring every bin up to ``minimum`` rows, only bins
    below it take rows. Ties go to the lower bin index. Returns each bin's rows, costliest first."""
    dealt: list[list[int]] = [[] for _ in range(bins)]
    heap = [(0.0, b) for b in range(bins)]  # (load, bin) of the bins that may take the next row
    deficit, short_phase = bins * minimum, False
    for left, row in enumerate(sorted(rows, key=lambda r: (-cost[r], r))):
        if not short_phase and len(rows) - left <= deficit:  # from now on, only bins below the minimum
            short_phase = True
            heap = [(load, b) for load, b in heap if len(dealt[b]) < minimum]
            heapq.heapify(heap)
        load, b = heapq.heappop(heap)
        if len(dealt[b]) < minimum:
            deficit -= 1
        dealt[b].append(row)
        if len(dealt[b]) < (minimum if short_phase else capacity):
            heapq.heappush(heap, (load + cost[row], b))
    return dealt


def _row_step(rows: list[int], lengths: Sequence[int], cost: Sequence[float], world_size: int,
              micro_batch_size: int, padded: bool) -> list[list[MicroBatch]]:
    """Row mode: ``world_size`` lists of the same number of micro-batches of at most ``micro_batch_size`` rows."""
    per_rank = math.ceil(math.ceil(len(rows) / micro_batch_size) / world_size)  # gradient_accumulation_steps if full
    filler = MicroBatch((min(rows, key=lambda r: (lengths[r], r)),), filler=True)
    ranks = []
    for rank_rows in _deal(rows, cost, world_size, per_rank * micro_batch_size, per_rank):
        if padded:  # consecutive runs of a longest-first order: rows of similar length share a micro-batch
            ordered = sorted(rank_rows, key=lambda r: (-lengths[r], r))
            q, extra = divmod(len(ordered), per_rank)
            sizes = [q + 1] * extra + [q] * (per_rank - extra)
            groups = [ordered[sum(sizes[:j]):sum(sizes[:j + 1])] for j in range(per_rank)]
        else:
            groups = _deal(rank_rows, lengths, per_rank, micro_batch_size, 1)
        ranks.append([MicroBatch(tuple(g)) if g else filler for g in groups])
    return ranks


def _token_budget_step(rows: list[int], lengths: Sequence[int], cost: Sequence[float], world_size: int,
                       budget: int) -> list[list[MicroBatch]]:
    """Token-budget mode: rows dealt to ranks by cost, each rank's rows packed best-fit-decreasing into micro-batches
    of ``<= budget`` tokens; ranks then equalise their micro-batch count, first by halving their largest multi-row
    micro-batch (alternate rows of its longest-first order), else with fillers."""
    packed = []
    for rank_rows in _deal(rows, cost, world_size, len(rows), 1):
        bins = best_fit_decreasing([lengths[r] for r in rank_rows], budget)
        packed.append([[rank_rows[i] for i in b] for b in bins])
    per_rank = max(len(bins) for bins in packed)
    filler = MicroBatch((min(rows, key=lambda r: (lengths[r], r)),), filler=True)
    ranks = []
    for bins in packed:
        while len(bins) < per_rank and any(len(b) > 1 for b in bins):
            big = max((b for b in bins if len(b) > 1), key=lambda b: sum(lengths[r] for r in b))
            bins.remove(big)
            bins += [big[0::2], big[1::2]]
        ranks.append([MicroBatch(tuple(b)) for b in bins] + [filler] * (per_rank - len(bins)))
    return ranks


class StepBatchSampler(Sampler[list[MicroBatchItem]]):
    """Yields this rank's micro-batches, one optimizer step after another, as lists of :class:`MicroBatchItem`.

    Arguments as :func:`plan_epoch`, plus ``rank`` (this process's) and ``steps_done``.

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
        padded: bool = True,
    ) -> None:
        self.num_loss_tokens = list(num_loss_tokens)
        self.micro_batch_size = micro_batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.world_size, self.rank = world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.steps_done = steps_done or (lambda: 0)
        self.lengths = list(lengths) if lengths is not None else None
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.padded = padded
        self._planned: Optional[tuple[int, list[StepPlan]]] = None  # (epoch, plan)
        self.epoch = 0
        # Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``, not on the batch sampler itself.
        self.sampler = self
        self.steps_per_epoch = math.ceil(
            len(self.num_loss_tokens) / (micro_batch_size * gradient_accumulation_steps * world_size)
        )

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start; selects the epoch's row order."""
        self.epoch = epoch

    def _plan(self) -> list[StepPlan]:
        """The current epoch's plan (:func:`plan_epoch`), computed once per epoch."""
        if self._planned is None or self._planned[0] != self.epoch:
            self._planned = (self.epoch, plan_epoch(
                self.num_loss_tokens, self.micro_batch_size, self.gradient_accumulation_steps, self.world_size,
                self.seed, self.epoch, self.shuffle, self.lengths, self.max_tokens_per_micro_batch, self.padded))
        return self._planned[1]

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
            mine = step.micro_batches[self.rank]
            for j, micro_batch in enumerate(mine):
                yield [MicroBatchItem(r, not micro_batch.filler, s, step.num_items_in_batch, j == len(mine) - 1)
                       for r in micro_batch.rows]

    def __len__(self) -> int:
        """Micro-batches this rank yields in a full epoch."""
        return sum(len(step.micro_batches[self.rank]) for step in self._plan())
