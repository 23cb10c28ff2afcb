"""Per-optimizer-step training metrics (loss, tokens, tokens/s, padding ratio, MFU), reduced over micro-batches and
data-parallel ranks.

Lightning's own ``self.log`` cadence counts batches, and here a batch is a micro-batch; the step metrics are
therefore summed locally over the step's micro-batches, all-reduced once at the optimizer step, and written to the
loggers with ``step = trainer.global_step`` (optimizer steps), every ``trainer.log_every_n_steps`` steps.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor

# Order of the fields in the all-reduced vector (``num_slots`` is summed on the host and appended at the step's end).
_FIELDS = ("loss_sum", "num_loss_tokens", "num_correct", "num_tokens", "flops", "num_slots")

# Dense bf16 tensor-core peak by device name, TFLOP/s (vendor datasheets, SXM parts, no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1,
                    "B200": 2250.0, "GB200": 2500.0}


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matrix multiplications: the weights of every ``nn.Linear`` (the attention and
    MLP projections and ``lm_head``; the embedding lookup is not a matmul). Under ZeRO-3 the full sizes
    (``ds_numel``) are counted, not the local shards."""
    return sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in model.modules()
               if isinstance(m, torch.nn.Linear))


def training_flops(seq_lens: Tensor, n_matmul: int, num_layers: int, hidden_size: int) -> Tensor:
    """Training FLOPs (forward + backward) of a micro-batch of independent sequences.

    Per token of a sequence of length ``T``: ``6 * n_matmul + 6 * num_layers * hidden_size * T`` (the matmul term
    of Kaplan et al. 2020 plus causal attention, PaLM appendix B's ``12 L d T`` halved by the causal mask).
    Recomputation by gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).

    Args:
        seq_lens: ``[B]`` lengths of the sequences actually attended (no padding).

    Returns:
        float64 scalar tensor: ``sum_i T_i * (6 n_matmul + 6 L d T_i)``.
    """
    t = seq_lens.double()
    return 6.0 * n_matmul * t.sum() + 6.0 * num_layers * hidden_size * (t * t).sum()


def device_peak_flops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak in FLOP/s from :data:`PEAK_BF16_TFLOPS`, or ``None`` (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return tflops * 1e12
    return None


class StepMetrics:
    """Accumulates one optimizer step's sums on this rank; :meth:`reduce` returns the global step metrics.

    Returned keys (all Python floats):
        ``train/loss``: summed token loss / supervised tokens, over the whole step and every rank (nats/token);
        ``train/num_loss_tokens``: supervised tokens in the step; ``train/token_accuracy``: share of supervised
        tokens whose argmax prediction is right (``nan`` when the loss path computes no logits, e.g. Liger's fused
        cross-entropy); ``train/num_tokens``: non-padding tokens in the step; ``train/tokens_seen``: cumulative
        non-padding tokens since the start of training; ``train/tokens_per_s``: non-padding tokens of the step
        divided by the wall-clock seconds since the previous step ended (all ranks together);
        ``train/padding_ratio``: share of the token slots that were padding; ``train/mfu``: model FLOPs
        (:func:`training_flops`) per second over ``world_size x peak_flops`` (``nan`` without a known peak).

    Args:
        peak_flops: one device's peak FLOP/s for MFU, or ``None``.
        world_size: devices whose FLOPs are summed.
    """

    def __init__(self, peak_flops: Optional[float] = None, world_size: int = 1) -> None:
        self.peak_flops, self.world_size = peak_flops, world_size
        self._sums: Optional[Tensor] = None
        self._slots = 0.0
        self._has_accuracy = True
        self.tokens_seen = 0
        self._last_time: Optional[float] = None

    def add(self, loss_sum: Tensor, num_loss_tokens: Tensor, num_correct: Optional[Tensor], num_tokens: Tensor,
            num_slots: int = 0, flops: Optional[Tensor] = None) -> None:
        """Add one micro-batch's sums (scalars; ``num_correct`` is ``None`` when no logits were computed;
        ``num_slots`` counts token positions including padding; ``flops`` from :func:`training_flops`)."""
        device = loss_sum.device  # everything stays on the device: no host synchronisation per micro-batch
        zero = torch.zeros((), dtype=torch.float64, device=device)
        if num_correct is None:
            self._has_accuracy = False
        values = torch.stack([loss_sum.detach().double(), num_loss_tokens.double().to(device),
                              zero if num_correct is None else num_correct.double().to(device),
                              num_tokens.double().to(device), zero if flops is None else flops.double().to(device)])
        self._sums = values if self._sums is None else self._sums + values
        self._slots += float(num_slots)

    def start_clock(self) -> None:
        """Mark the start of the first timed step (later steps are timed from the previous step's end)."""
        if self._last_time is None:
            self._last_time = time.perf_counter()

    def reduce(self, all_reduce_sum: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """All-reduce the step's sums (a collective: every rank must call it), reset, and return the metrics."""
        if self._sums is None:
            raise RuntimeError("StepMetrics.reduce() called before any micro-batch was added")
        sums = all_reduce_sum(torch.cat([self._sums, self._sums.new_tensor([self._slots])])).tolist()
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
            "train/padding_ratio": 1.0 - values["num_tokens"] / values["num_slots"] if values["num_slots"] else 0.0,
            "train/mfu": (values["flops"] / elapsed / (self.peak_flops * self.world_size)
                          if self.peak_flops and elapsed > 0 else float("nan")),
        }
        if torch.cuda.is_available():
            metrics["train/peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self._sums, self._has_accuracy, self._slots = None, True, 0.0
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens_seen = int(state.get("tokens_seen", 0))
