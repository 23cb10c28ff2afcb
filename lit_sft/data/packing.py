"""Bin packing: best-fit decreasing (BFD) in O(N log C), for packing rows and for token-budget micro-batches.

Both uses put items of known sizes (row lengths in tokens) into bins of a fixed capacity (``max_length`` for
``data.packing``; ``data.max_tokens_per_micro_batch`` for the token-budget planner in
:mod:`lit_sft.data.sampler`), and both go through :func:`best_fit_decreasing`.

The rule is TRL's ``bfd`` packing strategy (``trl.data_utils._pack_bfd``, after "Fewer Truncations Improve Language
Modeling", Ding et al. 2024), tie-breaks included (``tests/data/test_packing.py`` compares the groups with TRL's).
TRL's ``SFTTrainer`` applies it within each ``datasets.map`` batch of 1,000 rows; ``data.packing`` applies it to all
rows at once, which leaves fewer partly filled sequences:

1. items in decreasing size, equal sizes in index order (a stable sort);
2. each item goes to the open bin with the *least* room that still fits it; among bins with that same room, the one
   that reached it first (first in, first out); if no bin fits, a new bin opens.

Rooms are integers in ``[0, capacity]``; a segment tree over room values holds, per node, the largest room present
in its range, so "the least room >= size" is one descent (``log2(capacity)`` levels) and every item costs
O(log C) plus the sort's O(log N): 100k rows of R1-like lengths pack in about a second
(``benchmarks/pack_rows.py``), where a scan over all open bins per item (quadratic) took minutes. For a few items
(the planner packs a rank's rows of one step, a dozen or so, into micro-batches of 64k tokens) scanning the open
bins is cheaper than building a tree of ``2 * capacity`` nodes, so up to :data:`SCAN_ITEMS` items the bins are
scanned; both ways give the same bins.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

# Up to this many items, best_fit_decreasing scans the open bins instead of building the room tree.
SCAN_ITEMS = 64


class _RoomTree:
    """The rooms of the open bins, as a max segment tree over room values ``1..capacity``.

    ``tree[size + r]`` is ``r`` while some open bin has room ``r``, else 0; an inner node holds the maximum of its
    two children, so ``tree[1]`` is the largest room of any open bin.
    """

    def __init__(self, capacity: int) -> None:
        self.size = 1 << max(capacity, 1).bit_length()  # leaves for rooms 0..capacity
        self.tree = [0] * (2 * self.size)

    def set(self, room: int, present: bool) -> None:
        """Mark room ``room`` (``>= 1``) present or absent and update the maxima above it."""
        tree = self.tree
        node = self.size + room
        tree[node] = room if present else 0
        node >>= 1
        while node:
            left, right = tree[2 * node], tree[2 * node + 1]
            best = left if left >= right else right
            if tree[node] == best:  # nothing above changes
                return
            tree[node] = best
            node >>= 1

    def least_room_at_least(self, size: int) -> int:
        """The smallest present room ``>= size``, or 0 when no open bin has that much room."""
        tree = self.tree
        if tree[1] < size:
            return 0
        node = 1
        while node < self.size:
            node *= 2
            if tree[node] < size:  # the left half cannot hold it: go right
                node += 1
        return tree[node]


def best_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items into bins of ``capacity``, best fit decreasing with TRL's tie-breaks (see the module docstring).

    Args:
        sizes: size of each item (tokens), ``N`` ints ``>= 1``.
        capacity: room of a bin (tokens), ``>= 1``.

    Returns:
        Bins as lists of item indices, in the order the bins were opened; within a bin, in the order items were
        placed (decreasing size). Every index appears exactly once and every bin's sizes sum to ``<= capacity``,
        except that an item larger than ``capacity`` gets a bin of its own.

    Raises:
        ValueError: ``capacity < 1``, or an item of size ``< 1``.
    """
    if capacity < 1:
        raise ValueError(f"bin capacity must be >= 1, got {capacity}")
    if len(sizes) and min(sizes) < 1:
        raise ValueError(f"item {list(sizes).index(min(sizes))} has size {min(sizes)}; sizes must be >= 1")
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])  # stable: equal sizes keep index order
    if len(order) <= SCAN_ITEMS:
        return _scan_open_bins(order, sizes, capacity)
    rooms = _RoomTree(capacity)
    bins_with_room: dict[int, deque[int]] = {}  # room -> open bins with exactly this room, first in first out
    bins: list[list[int]] = []
    room_of: list[int] = []
    for item in order:
        size = sizes[item]
        room = rooms.least_room_at_least(size)
        if room:
            queue = bins_with_room[room]
            b = queue.popleft()
            if not queue:
                rooms.set(room, False)
        else:
            b = len(bins)
            bins.append([])
            room_of.append(capacity)
            room = capacity
        bins[b].append(item)
        room = max(room - size, 0)
        room_of[b] = room
        if room:
            queue = bins_with_room.setdefault(room, deque())
            if not queue:
                rooms.set(room, True)
            queue.append(b)
    return bins


def _scan_open_bins(order: list[int], sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """:func:`best_fit_decreasing` for a few items: every open bin is looked at for every item."""
    bins: list[list[int]] = []
    rooms: list[int] = []
    since: list[int] = []  # when each bin's room last changed: among equal rooms, the earliest is first in line
    for clock, item in enumerate(order):
        size, best = sizes[item], -1
        for b, room in enumerate(rooms):
            if size <= room and (best < 0 or room < rooms[best] or (room == rooms[best] and since[b] < since[best])):
                best = b
        if best < 0:
            best = len(bins)
            bins.append([])
            rooms.append(capacity)
            since.append(clock)
        bins[best].append(item)
        rooms[best] = max(rooms[best] - size, 0)
        since[best] = clock
    return bins


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """``data.packing``: group rows into sequences of at most ``max_length`` tokens (:func:`best_fit_decreasing`).

    Args:
        lengths: tokens of each row (each ``<= max_length`` after truncation).
        max_length: tokens of a packed sequence.

    Returns:
        Groups of row indices, as :func:`best_fit_decreasing`.
    """
    return best_fit_decreasing(lengths, max_length)


def packed_dataset(rows: Any, max_length: int) -> Any:
    """The packing of a tokenized ``datasets.Dataset``, as a dataset with one row per packed sequence.

    Computed with ``Dataset.map`` (one batch holding every row), so ``datasets`` caches it next to the tokenized data
    under a fingerprint of the tokenized data, ``max_length`` and this module's source: with several processes, local
    rank 0 packs in ``prepare_data`` and the other ranks load the result instead of packing again.

    Args:
        rows: tokenized rows with ``length`` and ``num_loss_tokens`` columns.
        max_length: tokens of a packed sequence.

    Returns:
        A ``datasets.Dataset`` with, per packed sequence: ``rows`` (indices into ``rows``, list of ints), ``length``
        (its tokens) and ``num_loss_tokens`` (its supervised tokens).
    """
    import inspect
    import sys

    from datasets.fingerprint import Hasher

    fingerprint = Hasher.hash((rows._fingerprint, max_length, inspect.getsource(sys.modules[__name__])))
    return rows.map(_pack_columns, batched=True, batch_size=None, input_columns=["length", "num_loss_tokens"],
                    remove_columns=rows.column_names, fn_kwargs={"max_length": max_length},
                    new_fingerprint=fingerprint, desc=f"Packing into sequences of <= {max_length} tokens")


def _pack_columns(lengths: list[int], num_loss_tokens: list[int], max_length: int) -> dict[str, list]:
    groups = pack_rows(lengths, max_length)
    return {"rows": groups, "length": [sum(lengths[r] for r in g) for g in groups],
            "num_loss_tokens": [sum(num_loss_tokens[r] for r in g) for g in groups]}
