"""What a user sees while training: a progress bar in optimizer steps, or plain log lines when output goes to a file.

Lightning's stock progress bars count training batches, and a lit_sft batch is one micro-batch: 64/64 for an epoch of
32 optimizer steps, ``max_steps: 2`` stopping at 4/64, ``Epoch 0/-2`` with ``max_steps``. :class:`SFTProgressBar`
counts optimizer steps, as ``trainer.global_step``, ``max_steps``, the logs and the checkpoints do.

When standard output is not a terminal (``nohup``, SLURM, CI) a bar is useless: it writes ``\\r`` redraws into the
file, or nothing until the end. The bar is then off and one plain line is logged every ``trainer.log_every_n_steps``
optimizer steps (and at the last step), flushed as it is written, so a killed run's log shows the steps it trained::

    step 12/64 | epoch 0 | loss 2.3456 | tokens/s 1.23e+03 | lr 3.00e-03 | elapsed 0:01:02 | ETA 0:04:29

Checkpoint and resume notices are logged in both modes. Lines go through Lightning's ``rank_zero_info`` (the
``lightning.pytorch`` logger, standard error, global rank 0 only).
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.utilities import rank_zero_info

from lit_sft.metrics import EVAL_LOSS


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "n/a"
    return str(datetime.timedelta(seconds=int(round(seconds))))


def run_steps(trainer: L.Trainer, module: L.LightningModule) -> Optional[int]:
    """Optimizer steps of the whole run: ``SFTModule.num_training_steps()``, else ``trainer.max_steps``, else
    ``None`` (unknown)."""
    count = getattr(module, "num_training_steps", None)
    if callable(count):
        try:
            return int(count())
        except RuntimeError:
            pass
    return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None


def steps_per_epoch(trainer: L.Trainer) -> Optional[int]:
    """Optimizer steps per epoch from the data module (``SFTDataModule.optimizer_steps_per_epoch``), or ``None``."""
    return getattr(trainer.datamodule, "optimizer_steps_per_epoch", None) if trainer.datamodule is not None else None


def epoch_span(trainer: L.Trainer, per_epoch: Optional[int]) -> tuple[int, Optional[int]]:
    """``(first step, step count)`` of the current epoch in optimizer steps, from ``per_epoch`` (optimizer steps per
    epoch) and ``max_steps``; without ``per_epoch``, the whole run: ``(0, max_steps or None)``."""
    max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
    if not per_epoch:
        return 0, max_steps
    start = trainer.current_epoch * per_epoch
    end = start + per_epoch if max_steps is None else min(start + per_epoch, max_steps)
    return start, max(end - start, 0)


class SFTProgressBar(TQDMProgressBar):
    """Lightning's ``TQDMProgressBar`` counting optimizer steps; plain periodic log lines when stdout is a file.

    The training bar of epoch ``e`` runs over that epoch's optimizer steps (fewer when ``max_steps`` ends the run
    inside it; a resumed run starts at the steps already taken) and is redrawn once per optimizer step, with the
    metrics the module shows (``loss``, ``tokens_per_s``, ``mfu``, ``eval/loss``; a non-finite loss shows as ``nan``).

    Args:
        refresh_rate, process_position, leave: as ``TQDMProgressBar`` (``refresh_rate`` in optimizer steps).
        plain: ``True``: no bar, log lines; ``False``: the bar; ``None``: lines when ``sys.stdout`` is not a terminal.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False,
                 plain: Optional[bool] = None) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.plain = plain
        self._plain = False
        self._start_time: Optional[float] = None
        self._start_step = 0
        self._last_step: Optional[int] = None
        self._total: Optional[int] = None
        self._per_epoch: Optional[int] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        isatty = getattr(sys.stdout, "isatty", None)
        self._plain = self.plain if self.plain is not None else not (callable(isatty) and isatty())
        if self._plain:
            self.disable()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: noise here
        return metrics

    # -- training bar in optimizer steps -------------------------------------------------------------------------
    def _reset_train_bar(self, trainer: L.Trainer) -> None:
        start, total = epoch_span(trainer, self._per_epoch)
        bar = self.train_progress_bar
        bar.reset(total=convert_inf(total))
        bar.initial = 0
        bar.n = max(0, trainer.global_step - start)
        bar.set_description(f"Epoch {trainer.current_epoch}")
        bar.refresh()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start_time, self._start_step = time.perf_counter(), trainer.global_step
        self._last_step = trainer.global_step
        self._total = run_steps(trainer, pl_module)
        self._per_epoch = steps_per_epoch(trainer)
        self._reset_train_bar(trainer)
        if trainer.global_step > 0:
            rank_zero_info(f"Resuming at optimizer step {trainer.global_step}"
                           f"{'/' + str(self._total) if self._total else ''} (epoch {trainer.current_epoch})")

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self._reset_train_bar(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # inside an accumulation window: no optimizer step yet
            return
        self._last_step = step
        start, total = epoch_span(trainer, self._per_epoch)
        bar = self.train_progress_bar
        bar.n = step - start  # counted in both modes (a disabled tqdm draws nothing)
        if self.is_enabled and (step % self.refresh_rate == 0 or step - start == total):
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()
        every = trainer.log_every_n_steps or 1
        if self._plain and (step % every == 0 or step == self._total):
            rank_zero_info(self.step_line(trainer, pl_module))

    def step_line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """The plain progress line of the optimizer step just taken (see the module docstring)."""
        step = trainer.global_step
        metrics = dict(getattr(pl_module, "last_step_metrics", None) or {})
        if not metrics:
            metrics = {f"train/{k}": v for k, v in trainer.progress_bar_metrics.items()}
        elapsed = time.perf_counter() - (self._start_time or time.perf_counter())
        done = step - self._start_step
        remaining = (self._total - step) if self._total else None
        eta = elapsed / done * remaining if done > 0 and remaining is not None else float("nan")
        parts = [f"step {step}" + (f"/{self._total}" if self._total else ""), f"epoch {trainer.current_epoch}",
                 f"loss {_fmt(metrics.get('train/loss'), '.4f')}",
                 f"tokens/s {_fmt(metrics.get('train/tokens_per_s'), '.3g')}",
                 f"lr {_fmt(metrics.get('train/learning_rate'), '.2e')}",
                 f"elapsed {_duration(elapsed)}", f"ETA {_duration(eta)}"]
        return " | ".join(parts)

    # -- notices (both modes) ------------------------------------------------------------------------------------
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        value = trainer.callback_metrics.get(EVAL_LOSS)
        if self._plain and not trainer.sanity_checking and value is not None:
            rank_zero_info(f"step {trainer.global_step} | {EVAL_LOSS} {float(value):.4f}")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        rank_zero_info(f"Saving checkpoint at optimizer step {trainer.global_step} (epoch {trainer.current_epoch})"
                       + (f" in {dirpath}" if dirpath else ""))


def replace_stock_progress_bar(trainer: L.Trainer) -> list[Callback]:
    """If ``trainer`` has Lightning's stock progress bar (``TQDMProgressBar`` or ``RichProgressBar``, exactly those
    classes, i.e. the default of ``enable_progress_bar=True``), remove it from ``trainer.callbacks`` and return
    ``[SFTProgressBar()]`` for ``LightningModule.configure_callbacks``; otherwise (no bar, or a bar of the user's own
    class) return ``[]``."""
    bar = trainer.progress_bar_callback
    if type(bar) not in (TQDMProgressBar, RichProgressBar):
        return []
    trainer.callbacks.remove(bar)
    return [SFTProgressBar()]
