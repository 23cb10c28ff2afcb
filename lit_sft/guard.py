"""The non-finite guard: training stops on a NaN/inf loss or gradient norm, and non-finite weights are never written.

``SFTModule`` checks every optimizer step (``model.max_nonfinite_steps`` tolerated steps are skipped, default 0:
strict); the checkpoint callback and the Hugging Face export refuse parameters that are not finite.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss, gradient norm or weight. The message names the step or the tensors."""


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]], limit: int = 5) -> list[str]:
    """Names of up to ``limit`` floating-point tensors in ``named`` holding a NaN or an infinity.

    A ZeRO-3 parameter is checked through its local shard (``ds_tensor``); its own ``data`` is an empty placeholder.
    """
    bad = []
    for name, tensor in named:
        tensor = getattr(tensor, "ds_tensor", tensor)
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


def check_weights(trainer: Any, module: torch.nn.Module, what: str) -> None:
    """Raise :class:`NonFiniteError` on every rank if any rank holds a non-finite parameter (a collective).

    Args:
        what: what was about to be written, for the message (e.g. ``"checkpoint step-000004.ckpt"``).
    """
    bad = nonfinite_tensors(module.named_parameters())
    if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
        raise NonFiniteError(
            f"refusing to write the {what} at optimizer step {trainer.global_step}: parameters are not finite "
            f"({', '.join(bad) or 'on another rank'}); the previous checkpoint is kept. Lower model.learning_rate "
            "or model.max_grad_norm and resume from it.")


def nonfinite_step_message(step: int, loss: float, grad_norm: Optional[float], count: int, tolerated: int,
                           updated: bool) -> str:
    """The error (or, while tolerated, warning) for a non-finite optimizer step."""
    what = f"training loss {loss:.4g}" + ("" if grad_norm is None else f", gradient norm {grad_norm:.4g}")
    state = ("the weights were not updated by this step" if not updated
             else "the optimizer applied this step, the weights in memory may be corrupt")
    return (f"optimizer step {step}: NaN/inf in {what}; {state} ({count} non-finite step(s) so far, "
            f"model.max_nonfinite_steps={tolerated}). No checkpoint or export holds non-finite weights: a rerun "
            "resumes from the newest checkpoint in run.output_dir, if one was written. Lower model.learning_rate, "
            "check the data, or set model.max_nonfinite_steps to skip such steps.")
