"""The SFT loss: causal-LM cross-entropy, summed over supervised tokens and normalised over the optimizer step.

The loss of an optimizer step is

    L = (sum of token losses over every micro-batch of the step, on every rank) / (supervised tokens in the step)

(the "global token mean"). The denominator is the batch's ``num_items_in_batch``
(:class:`lit_sft.data.batch.SFTBatch`), the name transformers' ``Trainer`` and TRL give the same count (they gather
it from every rank each step; lit_sft's planner knows it without communication). Each micro-batch back-propagates
``loss_sum * world_size / num_items_in_batch``, as transformers' ``compute_loss`` does with
``average_tokens_across_devices``: gradients then add up over micro-batches, and the data-parallel reduction (DDP,
DeepSpeed ZeRO) *averages* over ``world_size`` ranks, so the optimizer sees exactly ``grad L``. Nothing else may
divide: Lightning's ``accumulate_grad_batches`` stays 1 (the data module plans accumulation) and DeepSpeed runs
with ``managed_gradient_accumulation: false`` (see ``lit_sft/strategy.py``), so neither divides by an accumulation
count. A short last step of an epoch is normalised by the tokens it actually holds.

Per-source losses (``data.dataset_mixture``): the same sums restricted to each source's tokens, divided by that
source's supervised tokens in the step (``lit_sft/metrics.py``), so ``train/loss/<source>`` is exact in the same
way. They need per-token losses, which :func:`chunked_token_loss_sum` has; Liger's fused cross-entropy returns only
the total, so with it no per-source loss is computed (``SFTModule`` says so once; nothing wrong is logged).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_sft.data.tokenize import IGNORE_INDEX


def token_loss_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Summed next-token cross-entropy over supervised positions, computed in float32, from full logits.

    The plain reference: training uses :func:`chunked_token_loss_sum` or Liger's fused kernel, which never hold the
    ``[B, T, V]`` logits, and the tests compare both against this.

    Args:
        logits: ``[B, T, V]`` (any float dtype).
        labels: ``[B, T]`` long; ``IGNORE_INDEX`` (-100) where unsupervised. Position ``t`` predicts ``labels[t+1]``.

    Returns:
        ``(loss_sum, num_tokens, num_correct)``: the summed loss in nats (float32 scalar), the number of supervised
        targets, and how many of them the argmax predicts (both long scalars).
    """
    shift_logits = logits[:, :-1].flatten(0, 1).float()
    shift_labels = labels[:, 1:].flatten()
    loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    mask = shift_labels != IGNORE_INDEX
    with torch.no_grad():
        num_correct = ((shift_logits.argmax(-1) == shift_labels) & mask).sum()
    return loss_sum, mask.sum(), num_correct


class LossSums(NamedTuple):
    """A micro-batch's summed loss and counts (all scalars unless said; ``K`` = number of mixture sources).

    Attributes:
        loss_sum: float32, summed token loss in nats (in the autograd graph).
        num_loss_tokens: long, supervised targets.
        num_correct: long, targets the argmax predicts; ``None`` when the loss path computes no logits (Liger).
        source_loss_sums: ``[K]`` float32 (detached), ``loss_sum`` split by the source of each token's row; ``None``
            without sources or without per-token losses (Liger).
        source_loss_tokens: ``[K]`` long, ``num_loss_tokens`` split the same way; ``None`` with ``source_loss_sums``.
    """

    loss_sum: Tensor
    num_loss_tokens: Tensor
    num_correct: Optional[Tensor]
    source_loss_sums: Optional[Tensor] = None
    source_loss_tokens: Optional[Tensor] = None


def backward_scale(num_items_in_batch: int, world_size: int) -> float:
    """Factor that turns a micro-batch's ``loss_sum`` into the value to back-propagate:
    ``world_size / num_items_in_batch``.

    Args:
        num_items_in_batch: supervised tokens in the whole optimizer step (all micro-batches, all ranks).
        world_size: data-parallel ranks whose gradients the strategy averages.

    Raises:
        ValueError: ``num_items_in_batch`` is not positive (the data module never plans such a step).
    """
    if num_items_in_batch <= 0:
        raise ValueError(f"an optimizer step with num_items_in_batch={num_items_in_batch} supervised tokens cannot "
                         "be normalised")
    return world_size / num_items_in_batch


def chunked_token_loss_sum(hidden_states: Tensor, lm_head: torch.nn.Module, labels: Tensor,
                           chunk_size: int = 4096, num_chunks: Optional[int] = None,
                           token_sources: Optional[Tensor] = None, num_sources: int = 0,
                           reentrant: bool = False) -> LossSums:
    """:func:`token_loss_sum` without materialising the ``[B, T, V]`` logits.

    The shifted positions are processed ``chunk_size`` tokens at a time; each chunk's projection + cross-entropy is
    wrapped in ``torch.utils.checkpoint``, so the backward pass recomputes that chunk's logits instead of keeping
    them: peak logits memory is ``chunk_size x V`` instead of ``B x T x V``. Calling ``lm_head`` as a module keeps
    ZeRO-3's parameter gathering working. Used when Liger's fused kernel is not (CPU, ``use_liger_kernel: false``).

    Args:
        hidden_states: ``[B, T, H]`` final hidden states (after the last norm).
        lm_head: the output projection ``H -> V``.
        labels: ``[B, T]`` long, ``IGNORE_INDEX`` where unsupervised.
        chunk_size: positions per chunk.
        num_chunks: how many times to call ``lm_head`` (chunks past the supervised positions are empty). Under
            ZeRO-3 each call gathers ``lm_head``'s weight collectively, so every rank must make the same number of
            calls: the caller passes the maximum over ranks. Default: as many as this micro-batch needs, and at least
            one, so that a micro-batch without supervised tokens (a planner's filler) still returns a zero loss
            inside the autograd graph (DDP and DeepSpeed back-propagate it like any other).
        token_sources: ``[B, T]`` long, the mixture source of each position's row (:func:`token_sources`); the
            per-token losses are then also summed per source (``scatter_add``) into ``source_loss_sums``.
        num_sources: ``K``, the number of sources.
        reentrant: recompute each chunk with PyTorch's reentrant checkpoint. Needed when ``lm_head`` is frozen and
            partitioned by ZeRO-3 (LoRA): non-reentrant recomputation keeps a reference to a frozen weight, which
            ZeRO-3 re-partitions right after the recomputed forward, and fails with ``CheckpointError`` (shape
            ``[0]``; deepspeedai/DeepSpeed#4332); the reentrant one recomputes inside the chunk's own backward, where
            ZeRO-3's hooks gather the weight. Same values either way. ``hidden_states`` must require grad.

    Returns:
        :class:`LossSums`: ``(loss_sum, num_tokens, num_correct)`` as :func:`token_loss_sum`, plus the per-source
        sums with ``token_sources``.

    Raises:
        ValueError: ``num_chunks`` is smaller than the chunks the supervised positions need.
    """
    from torch.utils.checkpoint import checkpoint

    h = hidden_states[:, :-1].flatten(0, 1)
    targets = labels[:, 1:].flatten()
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(-1)  # unsupervised positions never reach lm_head
    h, targets = h.index_select(0, keep), targets.index_select(0, keep)
    sources = token_sources[:, 1:].flatten().index_select(0, keep) if token_sources is not None else None

    def chunk_loss(h_chunk: Tensor, t_chunk: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = lm_head(h_chunk).float()
        losses = F.cross_entropy(logits, t_chunk, reduction="none")
        return losses.sum(), (logits.argmax(-1) == t_chunk).sum(), losses.detach()

    device = hidden_states.device
    loss_sum = hidden_states.new_zeros((), dtype=torch.float32)
    num_correct = torch.zeros((), dtype=torch.long, device=device)
    source_sums = torch.zeros(num_sources, dtype=torch.float32, device=device) if sources is not None else None
    needed = max(1, -(-h.shape[0] // chunk_size))
    if num_chunks is not None and num_chunks < needed:
        raise ValueError(f"num_chunks={num_chunks} cannot hold {h.shape[0]} positions in chunks of {chunk_size}")
    for start in range(0, (num_chunks or needed) * chunk_size, chunk_size):
        chunk = slice(start, start + chunk_size)
        loss, correct, losses = checkpoint(chunk_loss, h[chunk], targets[chunk], use_reentrant=reentrant)
        loss_sum = loss_sum + loss
        num_correct = num_correct + correct
        if source_sums is not None:
            source_sums.scatter_add_(0, sources[chunk], losses)
    source_tokens = None
    if sources is not None:  # scatter_add, not bincount: no device-to-host sync
        source_tokens = torch.zeros(num_sources, dtype=torch.long, device=device).scatter_add_(
            0, sources, torch.ones_like(sources))
    return LossSums(loss_sum, torch.as_tensor(keep.numel(), device=device), num_correct, source_sums, source_tokens)


def token_sources(source_ids: Tensor, shape: torch.Size, seq_lens: Optional[Tensor] = None) -> Tensor:
    """Each position's mixture source, from each row's.

    Args:
        source_ids: ``[R]`` long, the source of each row (``SFTBatch["source_ids"]``).
        shape: ``labels.shape``: ``[R, T]`` padded, or ``[1, N]`` padding-free.
        seq_lens: padding-free only: ``[R]`` lengths of the concatenated rows (``sum = N``).

    Returns:
        ``[*shape]`` long: padded, row ``i`` is ``source_ids[i]`` at every position; padding-free, the ``i``-th
        run of ``seq_lens[i]`` positions is ``source_ids[i]``.
    """
    if seq_lens is None:
        return source_ids[:, None].expand(shape)
    repeated = torch.repeat_interleave(source_ids, seq_lens.to(source_ids.device), output_size=shape.numel())
    return repeated.reshape(shape)  # output_size: no device-to-host sync for the length
