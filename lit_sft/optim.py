"""AdamW and the learning-rate schedule, as transformers' ``Trainer`` builds them.

The schedule is transformers' own (``transformers.get_scheduler``); this module only computes its arguments.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from lit_sft.validation import InputError


def adamw(model: torch.nn.Module, learning_rate: float, weight_decay: float, betas: tuple[float, float],
          eps: float) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with weight decay on matrices only (biases and norm weights, the 1-D parameters,
    get none, as in transformers' ``Trainer`` for Qwen2/Llama-style models). Defaults of the callers follow
    ``TrainingArguments``: betas (0.9, 0.999), eps 1e-8, weight decay 0.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas, eps=eps)


def warmup_steps(num_training_steps: int, warmup_ratio: float) -> int:
    """``ceil(num_training_steps * warmup_ratio)``, as ``TrainingArguments.get_warmup_steps`` rounds a ratio."""
    return math.ceil(num_training_steps * warmup_ratio)


def check_scheduler(lr_scheduler_type: str, lr_scheduler_kwargs: Optional[dict[str, Any]]) -> None:
    """Fail before training on an unknown scheduler name or an argument its transformers function does not take.

    Raises:
        InputError: naming ``model.lr_scheduler_type`` or ``model.lr_scheduler_kwargs`` (a ``ValueError``).
    """
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    try:
        function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(lr_scheduler_type)]
    except ValueError:
        names = sorted(t.value for t in SchedulerType)
        raise InputError(f"model.lr_scheduler_type={lr_scheduler_type!r} is not one of {names}") from None
    allowed = set(inspect.signature(function).parameters) - {"optimizer", "num_warmup_steps", "num_training_steps"}
    unknown = sorted(set(lr_scheduler_kwargs or {}) - allowed)
    if unknown:
        raise InputError(f"model.lr_scheduler_kwargs: {unknown} not accepted by {lr_scheduler_type!r} "
                         f"(it takes {sorted(allowed)}): set model.lr_scheduler_kwargs to match it, e.g. null")


def lr_scheduler(optimizer: torch.optim.Optimizer, lr_scheduler_type: str, num_training_steps: int,
                 warmup_ratio: float, lr_scheduler_kwargs: Optional[dict[str, Any]] = None) -> Any:
    """transformers' scheduler ``lr_scheduler_type`` (e.g. ``cosine_with_min_lr`` with ``{"min_lr_rate": 0.1}``),
    stepped once per optimizer step.

    Raises:
        ValueError: an unknown ``lr_scheduler_type`` (transformers lists the valid names).
    """
    from transformers import get_scheduler

    return get_scheduler(lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps(num_training_steps, warmup_ratio),
                         num_training_steps=num_training_steps, scheduler_specific_kwargs=lr_scheduler_kwargs or {})
