"""Per-optimizer-step training metrics, reduced over micro-batches and data-parallel ranks.

Lightning's own ``self.log`` cadence counts batches, and here a batch is a micro-batch; the step metrics are
therefore summed locally over the step's micro-batches, all-reduced once at the optimizer step, and written to the
loggers with ``step = trainer.global_step`` (optimizer steps), every ``trainer.log_every_n_steps`` steps.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor

# Order of the fields in the all-reduced vector.
_FIELDS = ("loss_sum", "num_loss_tokens", "num_correct", "num_tokens")


class StepMetrics:
    """Accumulates one optimizer step's sums on this rank; :meth:`reduce` returns the global step metrics.

    Returned keys (all Python floats):
        ``train/loss``: summed token loss / supervised tokens, over the whole step and every rank (nats/token);
        ``train/num_loss_tokens``: supervised tokens in the step; ``train/token_accuracy``: share of supervised
        tokens whose argmax prediction is right (``nan`` when the loss path computes no logits, e.g. Liger's fused
        cross-entropy); ``train/num_tokens``: non-padding tokens in the step; ``train/tokens_seen``: cumulative
        non-padding tokens since the start of training; ``train/tokens_per_s``: non-padding tokens of the step
        divided by the wall-clock seconds since the previous step ended (all ranks together).
    """

    def __init__(self) -> None:
        self._sums: Optional[Tensor] = None
        self._has_accuracy = True
        self.tokens_seen = 0
        self._last_time: Optional[float] = None

    def add(self, loss_sum: Tensor, num_loss_tokens: Tensor, num_correct: Optional[Tensor], num_tokens: Tensor) -> None:
        """Add one micro-batch's sums (scalars; ``num_correct`` is ``None`` when no logits were computed)."""
        if num_correct is None:
            self._has_accuracy = False
            num_correct = torch.zeros((), device=loss_sum.device)
        values = torch.stack([loss_sum.detach().double(), num_loss_tokens.double(), num_correct.double(),
                              num_tokens.double().to(loss_sum.device)])
        self._sums = values if self._sums is None else self._sums + values

    def start_clock(self) -> None:
        """Mark the start of the first timed step (later steps are timed from the previous step's end)."""
        if self._last_time is None:
            self._last_time = time.perf_counter()

    def reduce(self, all_reduce_sum: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """All-reduce the step's sums (a collective: every rank must call it), reset, and return the metrics."""
        if self._sums is None:
            raise RuntimeError("StepMetrics.reduce() called before any micro-batch was added")
        sums = all_reduce_sum(self._sums).tolist()
        values = dict(zip(_FIELDS, sums))
        now = time.perf_counter()
        elapsed = now - self._last_time if self._last_time is not None else float("nan")
        self._last_time = now
        self.tokens_seen += int(values["num_tokens"])
        tokens = max(values["num_loss_tokens"], 1.0)
        metrics = {
            "train/loss": values["loss_sum"] / tokens,
            "train/num_loss_tokens": values["num_loss_tokens"],
            "train/token_accuracy": values["num_correct"] / tokens if self._has_accuracy else float("nan"),
            "train/num_tokens": values["num_tokens"],
            "train/tokens_seen": float(self.tokens_seen),
            "train/tokens_per_s": values["num_tokens"] / elapsed if elapsed > 0 else float("nan"),
        }
        self._sums, self._has_accuracy = None, True
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens_seen = int(state.get("tokens_seen", 0))
