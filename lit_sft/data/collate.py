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
