"""The micro-batch that ``SFTModule`` trains on: every key, its shape and meaning, defined here and only here.

How one optimizer step flows through lit_sft:

1. :func:`lit_sft.data.sampler.plan_epoch` picks the step's rows (``per_device_train_batch_size x
   gradient_accumulation_steps x world_size`` of them), deals them to ranks and micro-batches, and counts
   ``num_items_in_batch``, the step's supervised tokens over every micro-batch and rank.
2. :class:`lit_sft.data.sampler.StepBatchSampler` yields this rank's micro-batches of that plan.
3. The data module's dataset looks each row's tokens up (``lit_sft/data/datamodule.py``), and
   :mod:`lit_sft.data.collate` turns a micro-batch into an :class:`SFTBatch`.
4. ``SFTModule.training_step`` (``lit_sft/module.py``) computes the micro-batch's summed token loss, back-propagates
   ``loss_sum * world_size / num_items_in_batch`` (``lit_sft/loss.py``), and steps the optimizer after the
   micro-batch marked ``last_in_step``.

A data module of your own can train ``SFTModule`` if its training batches carry the keys of :class:`SFTBatch`
(:data:`TRAINING_KEYS` at least); :func:`check_training_batch` names any that are missing.
"""

from __future__ import annotations

from typing import Any, Mapping, TypedDict

from torch import Tensor

try:  # Python >= 3.11
    from typing import NotRequired
except ImportError:  # Python 3.10
    from typing_extensions import NotRequired

# Keys every training batch needs.
TRAINING_KEYS = ("input_ids", "labels", "num_items_in_batch", "last_in_step")
# Keys of a padding-free batch that the model's attention takes (``lit_sft/attention.py``).
PADDING_FREE_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class SFTBatch(TypedDict):
    """One micro-batch, padded (``B`` rows of ``T`` slots) or padding-free (``R`` rows concatenated into ``N``
    tokens). ``R`` below is the number of rows: ``B`` padded, ``len(cu_seq_lens_q) - 1`` padding-free.

    Attributes:
        input_ids: ``[B, T]`` (padded) or ``[1, N]`` (padding-free) long token ids.
        labels: same shape, long; the target of position ``t`` is ``labels[..., t + 1]``; ``-100`` (``IGNORE_INDEX``)
            where a position is not supervised: prompts, padding, every row's first token, filler rows.
        num_items_in_batch: int, supervised tokens (labels ``!= -100``, shifted) of the whole optimizer step, summed
            over every micro-batch and every rank: the step loss's denominator (transformers' and TRL's name for
            it). Training batches only.
        last_in_step: bool, whether this is this rank's last micro-batch of the step (the optimizer steps after it).
            Training batches only.
        attention_mask: padded batches: ``[B, T]`` long, 1 on real tokens, 0 on padding.
        position_ids: padding-free: ``[1, N]`` long, restarting at 0 for every row.
        cu_seq_lens_q, cu_seq_lens_k: padding-free: ``[R + 1]`` int32 cumulative row lengths ``[0, T_1, ..., N]``.
        max_length_q, max_length_k: padding-free: int, the longest row.
        source_ids: with ``data.dataset_mixture``: ``[R]`` long, each row's source, an index into ``source_names``
            (for ``train/loss/<source>``).
        source_names: with ``data.dataset_mixture``: tuple of str, the sources' names, the same in every batch.
    """

    input_ids: Tensor
    labels: Tensor
    num_items_in_batch: NotRequired[int]
    last_in_step: NotRequired[bool]
    attention_mask: NotRequired[Tensor]
    position_ids: NotRequired[Tensor]
    cu_seq_lens_q: NotRequired[Tensor]
    cu_seq_lens_k: NotRequired[Tensor]
    max_length_q: NotRequired[int]
    max_length_k: NotRequired[int]
    source_ids: NotRequired[Tensor]
    source_names: NotRequired[tuple[str, ...]]


def check_training_batch(batch: Mapping[str, Any]) -> None:
    """Raise a clear error if a training batch lacks a key :class:`SFTBatch` requires.

    Raises:
        KeyError: names the missing keys, what each means, and where lit_sft produces them.
    """
    missing = [k for k in TRAINING_KEYS if k not in batch]
    if "source_ids" in batch and "source_names" not in batch:
        missing.append("source_names")
    if not missing:
        return
    raise KeyError(
        f"SFTModule.training_step: the batch lacks {missing} (it has {sorted(batch)}). SFTModule trains on "
        "lit_sft.data.batch.SFTBatch micro-batches: 'num_items_in_batch' = supervised tokens of the whole optimizer "
        "step over every micro-batch and rank (the loss denominator), 'last_in_step' = whether the optimizer steps "
        "after this micro-batch. SFTDataModule's batches carry them; a data module of your own must plan whole "
        "optimizer steps and add them (see lit_sft.data.sampler.StepBatchSampler and lit_sft.data.collate)."
    )
