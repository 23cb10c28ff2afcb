"""Test harness for the LoRA tests (fp32, CPU): the independent plain-PyTorch + peft reference and adapter helpers.

:func:`reference_lora` is the reference optimizer step: the tiny Qwen2 loaded with plain transformers, wrapped with
``peft.get_peft_model`` and the same ``LoraConfig``, given the adapter weights lit_sft started from (copied, so the
same init), then for each step ``torch.optim.AdamW`` over the adapter parameters on the step's global token mean
(``tests/sft_harness.py``: transformers' own ``labels=`` loss, one unpadded row at a time). ``adam_epsilon`` is large
(see ``sft_harness``) so that comparing parameters after the step compares gradients.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import lightning as L
import torch

from sft_harness import EPS, LR, global_token_mean, load_model

PEFT = {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}  # scaling 2: not 1 by accident


def lora_config(peft: dict[str, Any]) -> Any:
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", **{k: v for k, v in peft.items() if k != "method"})


def adapter_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of a peft model, by name (whole: call under ZeRO-3 only after gathering)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def reference_lora(model_dir: str, peft: dict[str, Any], init: dict[str, torch.Tensor], steps: Sequence[Any],
                   lr: float = LR, eps: float = EPS, max_grad_norm: Optional[float] = None,
                   loss: Callable[[torch.nn.Module, Any], torch.Tensor] = global_token_mean) -> Any:
    """Plain PyTorch + peft: each step back-propagates the global token mean of its rows' ids and takes one AdamW step
    (no weight decay) on the adapter parameters, which start at ``init`` (lit_sft's initial adapter weights).

    Returns:
        The peft model after the last step.
    """
    from peft import get_peft_model

    model = get_peft_model(load_model(model_dir), lora_config(peft)).train()
    params = dict(model.named_parameters())
    assert set(init) == {n for n, p in params.items() if p.requires_grad}, sorted(set(init) ^ set(params))
    with torch.no_grad():
        for name, value in init.items():
            params[name].copy_(value)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, eps=eps,
                                  betas=(0.9, 0.999), weight_decay=0.0)
    for rows in steps:
        optimizer.zero_grad()
        loss(model, rows).backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
        optimizer.step()
    return model


class RecordInit(L.Callback):
    """The model's parameters when training starts (after ``configure_model`` and the strategy's setup)."""

    def __init__(self) -> None:
        self.params: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.params = {n: p.detach().clone() for n, p in module.model.named_parameters()}


def random_adapters(model_dir: str, peft: dict[str, Any], seed: int = 0, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Seeded random values for every adapter weight of ``peft`` on the model in ``model_dir`` (``lora_B`` not zero,
    so that the first step already trains ``lora_A`` too)."""
    from peft import get_peft_model

    names = adapter_params(get_peft_model(load_model(model_dir), lora_config(peft)))
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(v.shape, generator=g) * scale for n, v in names.items()}


class SetAdapters(L.Callback):
    """At the start of training (single process, plain AdamW: the optimizer holds the parameters themselves), set
    the adapter weights to ``values``."""

    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        self.values = values

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        params = dict(module.model.named_parameters())
        assert set(self.values) == {n for n, p in params.items() if p.requires_grad}
        with torch.no_grad():
            for name, value in self.values.items():
                params[name].copy_(value)
