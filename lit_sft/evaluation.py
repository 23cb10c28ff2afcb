"""When evaluation runs during training: ``eval_strategy`` / ``eval_steps`` in optimizer steps, at step boundaries.

transformers' ``TrainingArguments`` evaluate every ``eval_steps`` optimizer steps (``eval_strategy: steps``), at the
end of every epoch (``epoch``) or never (``no``). Lightning's own schedule counts training *batches*, and a lit_sft
batch is one micro-batch (``lit_sft/data/sampler.py``): ``trainer.val_check_interval: 3`` with 2 micro-batches per
step validates in the middle of steps 2, 5, 8, ..., and Lightning zeroes the gradients before validation
(``_TrainingEpochLoop.on_advance_end`` calls ``on_validation_model_zero_grad`` whenever Lightning's own
``accumulate_grad_batches`` says the batch is not accumulating, always true here), so the step's pending gradients
are lost. With a token budget the number of micro-batches per step varies, so no fixed batch interval can say
"every N optimizer steps".

:class:`SFTEvaluation` therefore decides itself, after every micro-batch, whether validation is due, using only public
``Trainer`` attributes that Lightning 2.6 reads at each check:

* ``trainer.val_check_interval = 1`` (an int: Lightning considers validation after every training batch; set in
  ``setup`` before ``FitLoop.setup_data`` derives ``val_check_batch`` from it);
* ``trainer.limit_val_batches``: the gate. ``Trainer.enable_validation`` (read by
  ``_TrainingEpochLoop._should_check_val_epoch`` before any other condition, including time-based and early-stop
  validation) is false while it is 0. The callback sets it to the user's value right after the micro-batch that
  completed a due optimizer step, and to 0 after every other micro-batch, so validation only ever runs at an
  optimizer-step boundary, where the gradients were already consumed and zeroed by the optimizer step.

``trainer.check_val_every_n_epoch`` keeps its meaning for ``eval_strategy: epoch`` (every N-th epoch). Sanity-check
validation (``num_sanity_val_steps``) runs before training as usual unless ``eval_strategy`` is ``no``.
:class:`lit_sft.SFTModule` adds an ``SFTEvaluation()`` when the trainer has none (``configure_callbacks``); the CLI adds
one from ``run.eval_strategy`` / ``run.eval_steps``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import lightning as L
from lightning.pytorch.callbacks import Callback

EvalStrategy = Literal["no", "steps", "epoch"]


class SFTEvaluation(Callback):
    """Runs validation every ``eval_steps`` optimizer steps, at each epoch end, or never, only between optimizer steps.

    Args:
        eval_strategy: ``steps`` (every ``eval_steps`` optimizer steps, counted over the whole run, as transformers'
            ``global_step % eval_steps == 0``), ``epoch`` (after the last optimizer step of each epoch, every
            ``trainer.check_val_every_n_epoch`` epochs), ``no``; ``None``: ``epoch`` when the data module evaluates
            (``SFTDataModule(do_eval=True)``, or any ``val_dataloader`` without an ``SFTDataModule``), else ``no``.
        eval_steps: optimizer steps between evaluations with ``eval_strategy: steps``; ``None``: the trainer's
            ``log_every_n_steps`` (transformers' default: ``logging_steps``).

    Raises:
        ValueError: (at ``setup``) ``eval_steps < 1``; ``trainer.val_check_interval`` other than its default 1.0 (it
            counts micro-batches: use ``eval_strategy: steps`` and ``eval_steps``); ``trainer.check_val_every_n_epoch``
            other than 1 with ``eval_strategy: steps``; ``eval_strategy`` ``steps``/``epoch`` with an
            ``SFTDataModule(do_eval=False)``.
    """

    def __init__(self, eval_strategy: Optional[EvalStrategy] = None, eval_steps: Optional[int] = None) -> None:
        if eval_strategy not in (None, "no", "steps", "epoch"):
            raise ValueError(f"eval_strategy={eval_strategy!r} must be one of 'no', 'steps', 'epoch'")
        if eval_steps is not None and eval_steps < 1:
            raise ValueError(f"eval_steps={eval_steps} must be >= 1 (optimizer steps between evaluations)")
        self.eval_strategy = eval_strategy
        self.eval_steps = eval_steps
        self._strategy: EvalStrategy = "no"
        self._every: int = 1
        self._limit: Union[int, float] = 1.0
        self._saved: Optional[dict[str, Any]] = None
        self._last_step: Optional[int] = None
        self._per_epoch: Optional[int] = None

    # -- configuration -------------------------------------------------------------------------------------------
    def _resolve(self, trainer: L.Trainer) -> EvalStrategy:
        datamodule = trainer.datamodule
        do_eval = getattr(getattr(datamodule, "hparams", None), "do_eval", None) if datamodule is not None else None
        if self.eval_strategy is None:
            return "epoch" if do_eval is not False else "no"
        if self.eval_strategy != "no" and do_eval is False:
            raise ValueError(f"eval_strategy={self.eval_strategy!r} needs evaluation data: set data.do_eval: true "
                             "(SFTDataModule(do_eval=True)), or eval_strategy: no")
        return self.eval_strategy

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = self._resolve(trainer)
        if trainer.val_check_interval != 1.0:
            raise ValueError(
                f"trainer.val_check_interval={trainer.val_check_interval!r} counts Lightning batches, which are "
                "micro-batches in lit_sft; validation must run between optimizer steps: leave "
                "trainer.val_check_interval at 1.0 and set run.eval_strategy: steps and run.eval_steps: N (optimizer "
                "steps), or SFTEvaluation(eval_strategy='steps', eval_steps=N) in the Trainer's callbacks")
        if strategy == "steps" and trainer.check_val_every_n_epoch != 1:
            raise ValueError(f"trainer.check_val_every_n_epoch={trainer.check_val_every_n_epoch!r} does not combine "
                             "with eval_strategy: steps; leave it at 1 (it sets the epoch interval of "
                             "eval_strategy: epoch)")
        self._strategy = strategy
        self._every = self.eval_steps or max(1, int(trainer.log_every_n_steps or 1))
        self._saved = {"val_check_interval": trainer.val_check_interval, "limit_val_batches": trainer.limit_val_batches}
        self._limit = trainer.limit_val_batches
        trainer.val_check_interval = 1
        if strategy == "no":
            trainer.limit_val_batches = 0  # no sanity check, no val_dataloader() request at all
        self._last_step = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._saved is not None:
            trainer.val_check_interval = self._saved["val_check_interval"]
            trainer.limit_val_batches = self._saved["limit_val_batches"]
            self._saved = None

    # -- the gate ------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.limit_val_batches = 0
        self._last_step = trainer.global_step
        datamodule = trainer.datamodule
        self._per_epoch = getattr(datamodule, "optimizer_steps_per_epoch", None) if datamodule is not None else None

    def due(self, trainer: L.Trainer) -> bool:
        """Whether the optimizer step that just completed (``trainer.global_step``) is followed by an evaluation."""
        step = trainer.global_step
        if self._strategy == "steps":
            return step % self._every == 0
        if self._strategy == "epoch":
            if self._per_epoch:
                return step % self._per_epoch == 0
            return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        return False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        stepped = trainer.global_step != self._last_step
        self._last_step = trainer.global_step
        trainer.limit_val_batches = self._limit if stepped and self.due(trainer) else 0
