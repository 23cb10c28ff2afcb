"""The SFT loss: causal-LM cross-entropy, summed over supervised tokens and normalised over the optimizer step.

The loss of an optimizer step is

    L = (sum of token losses over every micro-batch of the step, on every rank) / (supervised tokens in the step)

(the "global token mean"; transformers' ``num_items_in_batch`` and TRL's ``average_tokens_across_devices`` compute
the same). Each micro-batch back-propagates ``loss_sum * world_size / step_loss_tokens``: gradients then add up over
micro-batches, and the data-parallel reduction (DDP, DeepSpeed ZeRO) *averages* over ``world_size`` ranks, so the
optimizer sees exactly ``grad L``. Nothing else may divide: Lightning's ``accumulate_grad_batches`` stays 1 (the
data module plans accumulation) and DeepSpeed runs with ``managed_gradient_accumulation: false`` (see
``lit_sft/strategy.py``), so neither divides by an accumulation count. A short last step of an epoch is normalised
by the tokens it actually holds.
"""

from __future__ import annotations

from typing import Optional

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


def backward_scale(step_loss_tokens: int, world_size: int) -> float:
    """Factor that turns a micro-batch's ``loss_sum`` into the value to back-propagate: ``world_size / tokens``.

    Args:
        step_loss_tokens: supervised tokens in the whole optimizer step (all micro-batches, all ranks).
        world_size: data-parallel ranks whose gradients the strategy averages.

    Raises:
        ValueError: ``step_loss_tokens`` is not positive (the data module never plans such a step).
    """
    if step_loss_tokens <= 0:
        raise ValueError(f"an optimizer step with {step_loss_tokens} supervised tokens cannot be normalised")
    return world_size / step_loss_tokens


def chunked_token_loss_sum(hidden_states: Tensor, lm_head: torch.nn.Module, labels: Tensor,
                           chunk_size: int = 4096, num_chunks: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
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

    Returns:
        ``(loss_sum, num_tokens, num_correct)`` as :func:`token_loss_sum`.

    Raises:
        ValueError: ``num_chunks`` is smaller than the chunks the supervised positions need.
    """
    from torch.utils.checkpoint import checkpoint

    h = hidden_states[:, :-1].flatten(0, 1)
    targets = labels[:, 1:].flatten()
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(-1)  # unsupervised positions never reach lm_head
    h, targets = h.index_select(0, keep), targets.index_select(0, keep)

    def chunk_loss(h_chunk: Tensor, t_chunk: Tensor) -> tuple[Tensor, Tensor]:
        logits = lm_head(h_chunk).float()
        loss = F.cross_entropy(logits, t_chunk, reduction="sum")
        return loss, (logits.argmax(-1) == t_chunk).sum()

    loss_sum = hidden_states.new_zeros((), dtype=torch.float32)
    num_correct = torch.zeros((), dtype=torch.long, device=hidden_states.device)
    needed = max(1, -(-h.shape[0] // chunk_size))
    if num_chunks is not None and num_chunks < needed:
        raise ValueError(f"num_chunks={num_chunks} cannot hold {h.shape[0]} positions in chunks of {chunk_size}")
    for start in range(0, (num_chunks or needed) * chunk_size, chunk_size):
        loss, correct = checkpoint(chunk_loss, h[start:start + chunk_size], targets[start:start + chunk_size],
                                   use_reentrant=False)
        loss_sum = loss_sum + loss
        num_correct = num_correct + correct
    return loss_sum, torch.as_tensor(keep.numel(), device=hidden_states.device), num_correct
