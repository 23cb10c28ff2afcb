"""Per-optimizer-step training metrics (loss, tokens, tokens/s, padding ratio, MFU), reduced over micro-batches and
data-parallel ranks, and the names they are logged under (:data:`METRICS`, the one list).

Lightning's own ``self.log`` cadence counts batches, and here a batch is a micro-batch; the step metrics are
therefore summed locally over the step's micro-batches, all-reduced once at the optimizer step, and written to the
loggers with ``step = trainer.global_step`` (optimizer steps), every ``trainer.log_every_n_steps`` steps.

Names: where TRL's ``SFTTrainer`` (1.16) logs the same quantity, the name is the one its runs show in wandb
(transformers' ``WandbCallback`` writes the Trainer's ``loss`` as ``train/loss`` and ``eval_loss`` as ``eval/loss``),
so the two compare side by side: ``train/loss``, ``train/grad_norm``, ``train/learning_rate``, ``train/epoch``,
``train/mean_token_accuracy``, ``train/num_tokens`` (cumulative, as TRL's) and ``eval/loss``. Differences in how
they are computed: TRL's ``loss`` is the mean of the per-step losses since the previous log line and its
``mean_token_accuracy`` the mean of per-micro-batch accuracies, where lit_sft logs the logged step's exact token
means; TRL also logs ``entropy``, which lit_sft does not compute. The other names are lit_sft's own.

| name | unit | what |
|---|---|---|
| ``train/loss`` | nats per supervised token | token loss sum / supervised tokens of the optimizer step, all ranks |
| ``train/grad_norm`` | L2 norm | global gradient norm before clipping (``model.max_grad_norm``) |
| ``train/learning_rate`` | learning rate | the rate of the step's update |
| ``train/epoch`` | epochs (fractional) | optimizer steps done / optimizer steps per epoch |
| ``train/mean_token_accuracy`` | fraction (0-1) | supervised tokens predicted right (argmax); ``nan`` if none |
| ``train/num_tokens`` | tokens | non-padding tokens since the start of training, all ranks (cumulative, as TRL's) |
| ``train/step_tokens`` | tokens | non-padding tokens in this optimizer step, all ranks |
| ``train/step_loss_tokens`` | tokens | supervised tokens in this optimizer step, all ranks (``num_items_in_batch``) |
| ``train/tokens_per_s`` | tokens/s | ``train/step_tokens`` / wall-clock seconds since the previous step ended |
| ``train/padding_ratio`` | fraction (0-1) | share of the token slots that were padding |
| ``train/mfu`` | fraction (0-1) | model FLOPs/s (:func:`training_flops`) / (ranks x peak) |
| ``train/rank_token_imbalance`` | ratio (>= 1) | busiest rank's non-padding tokens / mean rank's (1.0: balanced) |
| ``train/rank_flops_imbalance`` | ratio (>= 1) | busiest rank's model FLOPs / mean rank's |
| ``train/peak_mem_gib`` | GiB | peak allocated CUDA memory of this process (GPUs only) |
| ``train/loss/<source>`` | nats per supervised token | token-mean loss of each mixture source's rows in the step |
| ``eval/loss`` | nats per supervised token | token mean over the whole evaluation split, every rank |
| ``eval/loss_tokens`` | tokens | supervised tokens of the evaluation split |
| ``eval/mean_token_accuracy`` | fraction (0-1) | share of the evaluation split's supervised tokens the argmax predicts |
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from lit_sft.loss import LossSums

LOSS = "train/loss"
GRAD_NORM = "train/grad_norm"
LEARNING_RATE = "train/learning_rate"
EPOCH = "train/epoch"
MEAN_TOKEN_ACCURACY = "train/mean_token_accuracy"
NUM_TOKENS = "train/num_tokens"
STEP_TOKENS = "train/step_tokens"
STEP_LOSS_TOKENS = "train/step_loss_tokens"
TOKENS_PER_S = "train/tokens_per_s"
PADDING_RATIO = "train/padding_ratio"
MFU = "train/mfu"
RANK_TOKEN_IMBALANCE = "train/rank_token_imbalance"
RANK_FLOPS_IMBALANCE = "train/rank_flops_imbalance"
PEAK_MEM_GIB = "train/peak_mem_gib"
SOURCE_LOSS = "train/loss/{source}"
EVAL_LOSS = "eval/loss"
EVAL_LOSS_TOKENS = "eval/loss_tokens"
EVAL_MEAN_TOKEN_ACCURACY = "eval/mean_token_accuracy"

METRICS: dict[str, str] = {
    LOSS: "nats per supervised token", GRAD_NORM: "L2 norm", LEARNING_RATE: "learning rate",
    EPOCH: "epochs (fractional)", MEAN_TOKEN_ACCURACY: "fraction (0-1)", NUM_TOKENS: "tokens", STEP_TOKENS: "tokens",
    STEP_LOSS_TOKENS: "tokens", TOKENS_PER_S: "tokens/s", PADDING_RATIO: "fraction (0-1)", MFU: "fraction (0-1)",
    RANK_TOKEN_IMBALANCE: "ratio (>= 1)", RANK_FLOPS_IMBALANCE: "ratio (>= 1)", PEAK_MEM_GIB: "GiB",
    SOURCE_LOSS.format(source="<source>"): "nats per supervised token", EVAL_LOSS: "nats per supervised token",
    EVAL_LOSS_TOKENS: "tokens", EVAL_MEAN_TOKEN_ACCURACY: "fraction (0-1)",
}
"""Every logged metric name and its unit (the module docstring's table says what each is)."""

# Order of the fields at the head of the all-reduced vector (``num_slots`` is summed on the host and appended at the
# step's end); then each rank's tokens and FLOPs (``world_size`` each), then, with mixture sources, each source's loss
# sum and supervised tokens (``K`` each).
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


def _max_over_mean(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else float("nan")


class StepMetrics:
    """Accumulates one optimizer step's sums on this rank; :meth:`reduce` returns the global step metrics.

    Returned keys (all Python floats; names and units in :data:`METRICS` and the module docstring):
        ``train/loss``, ``train/step_loss_tokens``, ``train/mean_token_accuracy`` (``nan`` when the loss path
        computes no logits, e.g. Liger's fused cross-entropy), ``train/step_tokens``, ``train/num_tokens``
        (cumulative), ``train/tokens_per_s``, ``train/padding_ratio``, ``train/mfu``,
        ``train/rank_token_imbalance`` and ``train/rank_flops_imbalance`` (the planner balances FLOPs, so with rows
        of very different lengths the token ratio stays above 1: long rows cost more per token),
        ``train/loss/<source>`` with mixture sources (present for the sources the step holds), and
        ``train/peak_mem_gib`` on GPUs.

    Args:
        peak_flops: one device's peak FLOP/s for MFU, or ``None``.
        world_size, rank: the data-parallel ranks, and this process's.
    """

    def __init__(self, peak_flops: Optional[float] = None, world_size: int = 1, rank: int = 0) -> None:
        self.peak_flops, self.world_size, self.rank = peak_flops, world_size, rank
        self._sums: Optional[Tensor] = None
        self._source_sums: Optional[Tensor] = None  # [2, K]: loss sums, supervised tokens
        self._source_names: Optional[tuple[str, ...]] = None
        self._slots = 0.0
        self._has_accuracy = True
        self.tokens_seen = 0
        self._last_time: Optional[float] = None

    def add(self, sums: LossSums, num_tokens: Tensor, num_slots: int = 0, flops: Optional[Tensor] = None,
            source_names: Optional[Sequence[str]] = None) -> None:
        """Add one micro-batch's sums: :class:`lit_sft.loss.LossSums` (``num_correct`` ``None`` when no logits were
        computed; per-source sums, if any, named by ``source_names``), ``num_tokens`` non-padding tokens,
        ``num_slots`` token positions including padding, ``flops`` from :func:`training_flops`. Everything stays on
        the device: no host synchronisation per micro-batch."""
        device = sums.loss_sum.device
        zero = torch.zeros((), dtype=torch.float64, device=device)
        if sums.num_correct is None:
            self._has_accuracy = False
        values = torch.stack([sums.loss_sum.detach().double(), sums.num_loss_tokens.double().to(device),
                              zero if sums.num_correct is None else sums.num_correct.double().to(device),
                              num_tokens.double().to(device), zero if flops is None else flops.double().to(device)])
        self._sums = values if self._sums is None else self._sums + values
        self._slots += float(num_slots)
        if sums.source_loss_sums is not None and source_names is not None:
            per_source = torch.stack([sums.source_loss_sums.double(), sums.source_loss_tokens.double().to(device)])
            self._source_sums = per_source if self._source_sums is None else self._source_sums + per_source
            self._source_names = tuple(source_names)

    def start_clock(self) -> None:
        """Mark the start of the first timed step (later steps are timed from the previous step's end)."""
        if self._last_time is None:
            self._last_time = time.perf_counter()

    def reduce(self, all_reduce_sum: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """All-reduce the step's sums (a collective: every rank must call it), reset, and return the metrics."""
        if self._sums is None:
            raise RuntimeError("StepMetrics.reduce() called before any micro-batch was added")
        # One all-reduce for everything: this rank's tokens and FLOPs go to its own slots, zeros elsewhere.
        ranks = torch.zeros(2, self.world_size, dtype=torch.float64, device=self._sums.device)
        ranks[0, self.rank] = self._sums[_FIELDS.index("num_tokens")]
        ranks[1, self.rank] = self._sums[_FIELDS.index("flops")]
        parts = [self._sums, self._sums.new_tensor([self._slots]), ranks.flatten()]
        if self._source_sums is not None:
            parts.append(self._source_sums.flatten())
        reduced = all_reduce_sum(torch.cat(parts)).tolist()
        values = dict(zip(_FIELDS, reduced))
        w, head = self.world_size, len(_FIELDS)
        rank_tokens, rank_flops = reduced[head:head + w], reduced[head + w:head + 2 * w]
        now = time.perf_counter()
        elapsed = now - self._last_time if self._last_time is not None else float("nan")
        self._last_time = now
        self.tokens_seen += int(values["num_tokens"])
        tokens = max(values["num_loss_tokens"], 1.0)
        metrics = {
            LOSS: values["loss_sum"] / tokens,
            STEP_LOSS_TOKENS: values["num_loss_tokens"],
            MEAN_TOKEN_ACCURACY: values["num_correct"] / tokens if self._has_accuracy else float("nan"),
            STEP_TOKENS: values["num_tokens"],
            NUM_TOKENS: float(self.tokens_seen),
            TOKENS_PER_S: values["num_tokens"] / elapsed if elapsed > 0 else float("nan"),
            PADDING_RATIO: 1.0 - values["num_tokens"] / values["num_slots"] if values["num_slots"] else 0.0,
            MFU: (values["flops"] / elapsed / (self.peak_flops * self.world_size)
                  if self.peak_flops and elapsed > 0 else float("nan")),
        }
        metrics[RANK_TOKEN_IMBALANCE] = _max_over_mean(rank_tokens)
        metrics[RANK_FLOPS_IMBALANCE] = _max_over_mean(rank_flops)
        if self._source_sums is not None:
            k = len(self._source_names)
            source_loss, source_tokens = reduced[-2 * k:-k], reduced[-k:]
            for name, loss_sum, n in zip(self._source_names, source_loss, source_tokens):
                if n > 0:
                    metrics[SOURCE_LOSS.format(source=name)] = loss_sum / n
        if torch.cuda.is_available():
            metrics[PEAK_MEM_GIB] = torch.cuda.max_memory_allocated() / 2**30
        self._sums, self._source_sums, self._has_accuracy, self._slots = None, None, True, 0.0
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens_seen = int(state.get("tokens_seen", 0))
