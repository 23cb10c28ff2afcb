"""Benchmark-only callbacks: per-step records, peak memory, a simulated kill, and a logits probe at train end."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import lightning as L
import torch


class StepRecorder(L.Callback):
    """Appends each optimizer step's metrics (loss, tokens, tokens/s, LR, peak GPU memory) to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path, self._last = path, None

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._last or not getattr(module, "last_step_metrics", None):
            return
        self._last = trainer.global_step
        if trainer.is_global_zero:
            record = {"step": trainer.global_step, **module.last_step_metrics}
            if torch.cuda.is_available():
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class KillAfterStep(L.Callback):
    """Simulates a crash: the process exits (no clean-up, no export) right after optimizer step ``step`` and its
    checkpoint (``ModelCheckpoint`` runs at the end of that batch; this fires at the start of the next one)."""

    def __init__(self, step: Optional[int] = None) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.step is not None and trainer.global_step >= self.step:
            trainer.strategy.barrier("kill")
            os._exit(0)


class LogitsProbe(L.Callback):
    """At train end, saves the trained model's logits on ``num_tokens`` tokens of the first training row."""

    def __init__(self, path: str, num_tokens: int = 256) -> None:
        self.path, self.num_tokens = path, num_tokens

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        ids = torch.tensor([trainer.datamodule.train_rows[0]["input_ids"][: self.num_tokens]], device=module.device)
        module.model.eval()
        with torch.no_grad():
            logits = module.model(input_ids=ids, use_cache=False).logits.float().cpu()
        module.model.train()
        if trainer.is_global_zero:
            torch.save({"input_ids": ids.cpu(), "logits": logits}, self.path)
