"""Checkpointing every ``save_steps`` optimizer steps, keeping ``save_total_limit``, across resumes."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


class SFTCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``save_top_k`` (``save_total_limit``, with ``monitor="step",
    mode="max"``: the newest) also rotates out the checkpoint a run resumed from.

    Lightning never deletes the checkpoint a run resumed from, and does not list it in ``best_k_models`` (the state
    saved inside a checkpoint predates it). A job preempted N times would keep N extra ZeRO-3 checkpoints. Here the
    resumed-from checkpoint counts like any other of this folder; as always, an old checkpoint is deleted only after
    a newer one was written.
    """

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        super().on_train_start(trainer, module)
        resumed = os.path.realpath(trainer.ckpt_path) if trainer.ckpt_path else None
        if (resumed and self.dirpath and self.save_top_k > 0 and resumed not in self.best_k_models
                and os.path.dirname(resumed) == os.path.realpath(self.dirpath)):
            self.best_k_models[resumed] = torch.tensor(float(trainer.global_step))
            self.kth_best_model_path = min(self.best_k_models, key=lambda p: float(self.best_k_models[p]))
            self.kth_value = self.best_k_models[self.kth_best_model_path]

    def _should_remove_checkpoint(self, trainer: L.Trainer, previous: str, current: str) -> bool:
        if previous == current or self.dirpath is None:
            return False
        return Path(self.dirpath).absolute() in Path(previous).absolute().parents
