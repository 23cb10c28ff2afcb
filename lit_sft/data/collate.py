"""Micro-batch collation: planned rows -> an :class:`lit_sft.data.batch.SFTBatch`.

Input rows (from the data module's dataset): ``input_ids`` and ``labels`` (lists of ``T_i`` ints); optionally
``seq_lengths`` (a packed item holding several rows back to back) and ``source_ids`` (each of those rows' mixture
source); in training, also the planner's ``supervised`` (``False``: a filler, every label masked),
``num_items_in_batch`` and ``last_in_step`` (see :mod:`lit_sft.data.sampler`), which are the same for every row of
a micro-batch.

Padding is derived from row lengths, never from token ids: with ``pad_token == eos_token`` a real EOS stays
supervised and attended.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from lit_sft.data.batch import SFTBatch
from lit_sft.data.tokenize import IGNORE_INDEX


def _step_fields(rows: list[dict[str, Any]], source_names: Optional[Sequence[str]]) -> dict[str, Any]:
    """The keys of :class:`SFTBatch` that are not tokens: the step's (training only) and the sources'."""
    first, fields = rows[0], {}
    if "num_items_in_batch" in first:
        fields["num_items_in_batch"] = int(first["num_items_in_batch"])
        fields["last_in_step"] = bool(first["last_in_step"])
    if source_names is not None:
        fields["source_ids"] = torch.tensor([s for row in rows for s in row["source_ids"]], dtype=torch.long)
        fields["source_names"] = tuple(source_names)
    return fields


class PaddingCollator:
    """Right-pads a micro-batch to its longest row (optionally rounded up to ``pad_to_multiple_of``).

    Output: an :class:`SFTBatch` with ``input_ids`` ``[B, T]`` (``pad_token_id`` on padding), ``attention_mask``
    ``[B, T]``, ``labels`` ``[B, T]`` (``IGNORE_INDEX`` on padding and on every token of a filler row), the step
    fields in training and, with ``source_names``, ``source_ids`` ``[B]``.

    Args:
        pad_token_id: id written on padding positions (never read back: the mask comes from the lengths).
        pad_to_multiple_of: round ``T`` up to a multiple of this.
        source_names: the mixture's source names (``data.dataset_mixture``); rows then carry ``source_ids``.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None,
                 source_names: Optional[Sequence[str]] = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.source_names = source_names

    def __call__(self, rows: list[dict[str, Any]]) -> SFTBatch:
        longest = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"])
            attention_mask[i, :n] = 1
            if row.get("supervised", True):
                labels[i, :n] = torch.as_tensor(row["labels"])
        return SFTBatch(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                        **_step_fields(rows, self.source_names))


class PaddingFreeCollator:
    """Concatenates a micro-batch's rows into one sequence with no padding (see ``lit_sft/attention.py``).

    A row carrying ``seq_lengths`` (a packed item holding several rows back to back) contributes one sequence per
    entry: positions restart at each.

    Output: an :class:`SFTBatch` of ``R`` sequences of lengths ``T_i`` (``N = sum_i T_i``): ``input_ids``,
    ``labels``, ``position_ids`` ``[1, N]``; ``cu_seq_lens_q/k`` ``[R + 1]`` int32; ``max_length_q/k``; the step
    fields in training and, with ``source_names``, ``source_ids`` ``[R]``.
    Every row's first label is ``IGNORE_INDEX`` (set at tokenization), so no position learns to predict the next
    row's first token.

    Args:
        source_names: as :class:`PaddingCollator`.
    """

    def __init__(self, source_names: Optional[Sequence[str]] = None) -> None:
        self.source_names = source_names

    def __call__(self, rows: list[dict[str, Any]]) -> SFTBatch:
        input_ids, labels, lengths = [], [], []
        for row in rows:
            input_ids.extend(row["input_ids"])
            labels.extend(row["labels"] if row.get("supervised", True) else [IGNORE_INDEX] * len(row["labels"]))
            lengths.extend(row.get("seq_lengths") or [len(row["input_ids"])])
        position_ids = torch.cat([torch.arange(n) for n in lengths])
        cu_seq = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu_seq[1:] = torch.cumsum(torch.tensor(lengths), 0)
        return SFTBatch(input_ids=torch.tensor([input_ids], dtype=torch.long),
                        labels=torch.tensor([labels], dtype=torch.long), position_ids=position_ids.unsqueeze(0),
                        cu_seq_lens_q=cu_seq, cu_seq_lens_k=cu_seq.clone(), max_length_q=max(lengths),
                        max_length_k=max(lengths), **_step_fields(rows, self.source_names))
