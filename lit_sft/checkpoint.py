"""Checkpointing every ``save_steps`` optimizer steps and at the end of training, keeping ``save_total_limit``, across
kills, full disks and resumes.

How a checkpoint is written so that a kill never leaves a partial one under its final name is in
:mod:`lit_sft.checkpoint_io`. This module decides *when* to save and *what to delete*, and records that a run has
finished (``checkpoints/finished.json``), so that a rerun of a finished run does nothing.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info

from lit_sft.checkpoint_io import (AtomicCheckpointIO, checkpoint_problem, clean_orphans, remove_checkpoint_path,
                                   save_folder_checkpoint, step_checkpoints, write_json_atomic)
from lit_sft.guard import check_weights

FINISHED = "finished.json"


def _max_epochs(max_steps: Optional[int], max_epochs: Optional[int]) -> int:
    """``max_epochs`` as Lightning's fit loop uses it (``_parse_loop_limits``: ``None`` is 1000 epochs without
    ``max_steps``, unlimited with it)."""
    if max_epochs is None:
        return 1000 if max_steps in (None, -1) else -1
    return max_epochs


def training_done(progress: dict[str, Any], max_steps: Optional[int], max_epochs: Optional[int]) -> bool:
    """Whether a run at ``progress`` (a checkpoint's ``lit_sft`` record: ``global_step``, ``epochs_completed``) has
    nothing left to train under the limits ``max_steps``/``max_epochs`` (Lightning's ``FitLoop.done``: either limit
    reached; ``-1`` is no limit)."""
    steps_done = max_steps not in (None, -1) and progress["global_step"] >= max_steps
    epochs = _max_epochs(max_steps, max_epochs)
    completed = progress.get("epochs_completed")
    return bool(steps_done or (epochs != -1 and completed is not None and completed >= epochs))


class SFTCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` for SFT runs: ``step-NNNNNN.ckpt`` every ``every_n_train_steps`` optimizer
    steps (or every epoch) and always at the run's last step, crash-safe, rotated by ``save_total_limit``.

    * **Complete or absent**: checkpoint files are written through :class:`lit_sft.checkpoint_io.AtomicCheckpointIO`
      (installed as the strategy's ``CheckpointIO`` plugin when it is Lightning's default); DeepSpeed folders through
      :func:`lit_sft.checkpoint_io.save_folder_checkpoint` (all ranks, then a completion marker, then a rename).
    * **The final state**: the last optimizer step is checkpointed whatever ``save_steps`` (before the Hugging Face
      export, so an export failure never loses it). After the export (and push), ``finished.json`` records the run
      as finished; ``lit_sft fit`` run again on it does nothing (see ``lit_sft.cli``).
    * **Rotation**: after every save and at the start of training, complete checkpoints beyond the newest
      ``save_total_limit`` are deleted (counted from the folder, so a kill between writing a new checkpoint and
      deleting an old one is repaired on resume); unreadable ones older than the oldest kept one too. The checkpoint
      a run resumed from is kept until this run has written a newer one; the newest complete one is never deleted.
    * **Leftovers**: hidden temporary files and folders of interrupted saves and deletions are removed at the start
      of training (a DeepSpeed folder that was complete but not yet renamed is renamed instead).
    * **Never non-finite**: a save with NaN/inf parameters raises ``lit_sft.guard.NonFiniteError`` instead.

    Args:
        dirpath: the checkpoint folder (``output_dir/checkpoints``).
        every_n_train_steps: optimizer steps between checkpoints (``run.save_steps``).
        every_n_epochs: checkpoint at every ``every_n_epochs``-th epoch end instead (``run.save_strategy: epoch``).
        save_total_limit: checkpoints kept, newest first; ``None`` keeps all.

    Raises:
        ValueError: ``save_total_limit`` below 1.
    """

    def __init__(self, dirpath: str, every_n_train_steps: Optional[int] = None, every_n_epochs: Optional[int] = None,
                 save_total_limit: Optional[int] = None) -> None:
        if save_total_limit is not None and save_total_limit < 1:
            raise ValueError(f"run.save_total_limit={save_total_limit} must be >= 1 (or null to keep every "
                             "checkpoint); use run.save_strategy: no to write none")
        super().__init__(dirpath=dirpath, filename="step-{step:06d}", auto_insert_metric_name=False, save_top_k=-1,
                         every_n_train_steps=every_n_train_steps, every_n_epochs=every_n_epochs,
                         enable_version_counter=False)
        self.save_total_limit = save_total_limit
        self._saved_this_run = False
        self._in_train_end = False
        self.finished: Optional[dict[str, Any]] = None

    @property
    def finished_path(self) -> str:
        """``dirpath/finished.json``: written once the final checkpoint, the export and the push are done."""
        return os.path.join(str(self.dirpath), FINISHED)

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default: not crash-safe
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        super().on_train_start(trainer, module)
        self._saved_this_run = False
        if trainer.ckpt_path:  # the state now is the checkpoint's: do not save it again before the next step
            self._last_global_step_saved = trainer.global_step
            if hasattr(module.hparams, "adam_beta1"):
                changed = apply_optimizer_hparams(module)
                if changed:
                    rank_zero_info("Resumed optimizer uses the given hyper-parameters, not the checkpoint's: "
                                   f"{changed}")
        if trainer.is_global_zero and self.dirpath:
            removed, recovered = clean_orphans(str(self.dirpath))
            if removed:
                rank_zero_info(f"Removed leftovers of interrupted checkpoint saves in {self.dirpath}: {removed}")
            if recovered:
                rank_zero_info(f"Completed the interrupted save of {recovered} (all ranks had written it)")
            if os.path.exists(self.finished_path):  # training again (e.g. a raised max_steps): no longer finished
                os.remove(self.finished_path)
            self._rotate(trainer)
        trainer.strategy.barrier("lit_sft_ckpt_train_start")

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
        if self._run_ends_after_batch(trainer) and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Runs after the Hugging Face export and push (Lightning calls checkpoint callbacks last): save the final
        state if the run stopped where no checkpoint was taken (e.g. ``trainer.should_stop``), then record the run as
        finished."""
        super().on_train_end(trainer, module)
        self._in_train_end = True
        try:
            if not self._should_skip_saving_checkpoint(trainer):
                self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
        finally:
            self._in_train_end = False
        if not any(getattr(callback, "export_failed", False) for callback in trainer.callbacks):
            self.write_finished(trainer)  # an export that failed is redone by the rerun (lit_sft.cli: _check_finished)

    def write_finished(self, trainer: L.Trainer) -> None:
        """Record (global rank 0) that the run finished at the checkpoint of this step and was exported."""
        path = self.format_checkpoint_name(self._monitor_candidates(trainer))
        self.finished = {"checkpoint": os.path.basename(path), "global_step": trainer.global_step}
        if trainer.is_global_zero and os.path.exists(path):
            write_json_atomic(self.finished_path, self.finished)
        trainer.strategy.barrier("lit_sft_finished")

    @staticmethod
    def _run_ends_after_batch(trainer: L.Trainer) -> bool:
        """Whether the optimizer step that just ended is the run's last (``max_steps``, or the last batch of the last
        epoch)."""
        if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
            return True
        loop = trainer.fit_loop
        max_epochs = _max_epochs(trainer.max_steps, loop.max_epochs)
        return bool(loop.epoch_loop.batch_progress.is_last_batch and max_epochs != -1
                    and trainer.current_epoch + 1 >= max_epochs)

    # -- saving --------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Adds ``checkpoint["lit_sft"]``: ``global_step``, ``epochs_completed`` (whole epochs done at this state),
        ``max_steps``/``max_epochs`` of the run, read by :func:`training_done` when the run is started again."""
        loop = trainer.fit_loop
        if self._in_train_end:
            epochs = loop.epoch_progress.current.processed
        else:
            epochs = trainer.current_epoch + int(bool(loop.epoch_loop.batch_progress.is_last_batch))
        checkpoint["lit_sft"] = {"global_step": trainer.global_step, "epochs_completed": epochs,
                                 "max_steps": trainer.max_steps, "max_epochs": loop.max_epochs}

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        check_weights(trainer, trainer.lightning_module, f"checkpoint {os.path.basename(filepath)}")
        if isinstance(trainer.strategy, DeepSpeedStrategy):  # a folder, written by every rank
            save_folder_checkpoint(trainer, filepath, self.save_weights_only)
        else:
            trainer.save_checkpoint(filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        self._saved_this_run = True
        rank_zero_info(f"Checkpoint saved: {filepath}")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)
            self._rotate(trainer)
        trainer.strategy.barrier("lit_sft_ckpt_rotated")

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """Deletion is :meth:`_rotate`'s alone (Lightning's own bookkeeping never deletes here)."""

    def _rotate(self, trainer: L.Trainer) -> None:
        """Delete what ``save_total_limit`` does not keep (global rank 0; see the class docstring)."""
        if self.save_total_limit is None or not self.dirpath:
            return
        resumed = os.path.realpath(trainer.ckpt_path) if trainer.ckpt_path and not self._saved_this_run else None
        kept: list[str] = []
        for _, path in step_checkpoints(str(self.dirpath)):  # newest first
            is_resumed = os.path.realpath(path) == resumed
            problem = checkpoint_problem(path)
            if problem is None and (len(kept) < self.save_total_limit or is_resumed):
                kept.append(path)
            elif not is_resumed and (problem is None or kept):  # beyond the limit, or unusable and older than kept
                remove_checkpoint_path(path)
                rank_zero_info(f"Removed checkpoint {path} (run.save_total_limit={self.save_total_limit}"
                               f"{'' if problem is None else f'; it was unusable: {problem}'})")


def apply_optimizer_hparams(module: L.LightningModule) -> dict[str, Any]:
    """After a resume, make the optimizer and LR schedule use the module's *current* hyper-parameters.

    Lightning restores AdamW's ``param_groups`` (``lr``, ``betas``, ``eps``, ``weight_decay``) and the scheduler's
    ``base_lrs`` from the checkpoint, so a ``learning_rate`` or ``weight_decay`` given for the resumed run would be
    silently ignored. The schedule's shape follows the current config (transformers' ``LambdaLR`` keeps no state in
    its lambdas), but the restored ``lr`` of the first resumed step was the old schedule's: with a raised
    ``max_steps`` it is recomputed here, ``base_lr * lambda(last_epoch)`` as ``LambdaLR`` does. Group 0 is the
    weight-decay group (``lit_sft.optim.adamw``). The step counter and the moments are kept. Returns the values
    that changed, ``{name: (old, new)}``.
    """
    hp = module.hparams
    optimizer, scheduler = module.optimizers(), module.lr_schedulers()
    groups = optimizer.param_groups
    changed: dict[str, Any] = {}
    wanted = {"betas": (hp.adam_beta1, hp.adam_beta2), "eps": hp.adam_epsilon}
    for i, group in enumerate(groups):
        for key, value in {**wanted, **({"weight_decay": hp.weight_decay} if i == 0 else {})}.items():
            current = group.get(key)
            if key == "betas" and current is not None:
                current = tuple(current)
            if current != value:
                changed[f"{key}[{i}]"] = (current, value)
                group[key] = value
    if scheduler is None:
        return changed
    if list(scheduler.base_lrs) != [hp.learning_rate] * len(groups):
        changed["learning_rate"] = (scheduler.base_lrs[0], hp.learning_rate)
        scheduler.base_lrs = [hp.learning_rate] * len(groups)
        for group in groups:
            group["initial_lr"] = hp.learning_rate
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is not None:  # the rate of the next step under the current schedule (a raised max_steps stretches it)
        for i, group in enumerate(groups):
            group["lr"] = scheduler.base_lrs[i] * lambdas[i](scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
    return changed
