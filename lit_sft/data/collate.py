"""Micro-batch collation: rows -> padded tensors, with the step bookkeeping the loss needs.

Padding is derived from row lengths, never from token ids: with ``pad_token == eos_token`` a real EOS stays
supervised and attended.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from lit_sft.data.tokenize import IGNORE_INDEX


class PaddingCollator:
    """Right-pads a micro-batch to its longest row (optionally rounded up to ``pad_to_multiple_of``).

    Input: a list of dicts with ``input_ids`` and ``labels`` (lists of ``T_i`` ints) and the planner's
    ``supervised``, ``step``, ``step_loss_tokens`` and ``last_in_step`` (see ``lit_sft.data.sampler``).

    Output (``B`` rows, ``T = max_i T_i`` rounded up):
        ``input_ids`` ``[B, T]`` long, ``pad_token_id`` on padding;
        ``attention_mask`` ``[B, T]`` long, 1 on real tokens;
        ``labels`` ``[B, T]`` long, ``IGNORE_INDEX`` on padding and on every token of a filler row;
        ``num_loss_tokens`` scalar long, supervised tokens in this micro-batch;
        ``step_loss_tokens`` int, supervised tokens in the whole optimizer step (all micro-batches, ranks);
        ``last_in_step`` bool, whether the optimizer steps after this micro-batch;
        ``step`` int, the optimizer step index within the epoch.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
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
        first = rows[0]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "num_loss_tokens": (labels != IGNORE_INDEX).sum(),
            "step_loss_tokens": int(first.get("step_loss_tokens", 0)),
            "last_in_step": bool(first.get("last_in_step", True)),
            "step": int(first.get("step", 0)),
        }


class PaddingFreeCollator:
    """Concatenates a micro-batch's rows into one sequence with no padding (see ``lit_sft/attention.py``).

    Input rows as for :class:`PaddingCollator`; a row may also carry ``seq_lengths`` (a packed item holding several
    documents back to back), in which case positions restart at each document.

    Output (``B`` documents of lengths ``T_i``, ``N = sum_i T_i``):
        ``input_ids``, ``labels``, ``position_ids``: ``[1, N]`` long; positions restart at 0 for every document;
        ``cu_seq_lens_q``, ``cu_seq_lens_k``: ``[B + 1]`` int32 cumulative lengths ``[0, T_1, T_1 + T_2, ..., N]``;
        ``max_length_q``, ``max_length_k``: int, ``max_i T_i``;
        plus ``num_loss_tokens``, ``step_loss_tokens``, ``last_in_step``, ``step`` as :class:`PaddingCollator`.
    Every document's first label is ``IGNORE_INDEX`` (set at tokenization), so no position learns to predict the
    next document's first token.
    """

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, labels, lengths = [], [], []
        for row in rows:
            input_ids.extend(row["input_ids"])
            labels.extend(row["labels"] if row.get("supervised", True) else [IGNORE_INDEX] * len(row["labels"]))
            lengths.extend(row.get("seq_lengths") or [len(row["input_ids"])])
        position_ids = torch.cat([torch.arange(n) for n in lengths])
        cu_seq = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu_seq[1:] = torch.cumsum(torch.tensor(lengths), 0)
        labels_t = torch.tensor([labels], dtype=torch.long)
        first = rows[0]
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": labels_t,
            "position_ids": position_ids.unsqueeze(0),
            "cu_seq_lens_q": cu_seq,
            "cu_seq_lens_k": cu_seq.clone(),
            "max_length_q": max(lengths),
            "max_length_k": max(lengths),
            "num_loss_tokens": (labels_t != IGNORE_INDEX).sum(),
            "step_loss_tokens": int(first.get("step_loss_tokens", 0)),
            "last_in_step": bool(first.get("last_in_step", True)),
            "step": int(first.get("step", 0)),
        }
