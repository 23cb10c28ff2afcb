"""The loss curve: per-optimizer-step training loss and learning rate, each evaluation's loss, drawn to ``loss.png``.

:class:`LossCurve` (a Lightning callback that :class:`lit_sft.SFTModule` adds to any Trainer) keeps the run's history
in memory and in every checkpoint (``checkpoint["callbacks"]["LossCurve"]``), so a resumed run continues it: the
history is the checkpoint's, and steps an interrupted run took after its checkpoint are gone, as in the CSV log
(``lit_sft/loggers.py``). Every optimizer step is recorded, whatever ``trainer.log_every_n_steps``. An evaluation
that ran right after a checkpoint was written (``eval_steps`` a multiple of ``save_steps``) is not in that checkpoint;
on resume the CSV logger's ``metrics.csv``, when there is one, fills in what the restored history lacks up to the
checkpoint's step (also the whole history of a checkpoint written before this callback existed).

``loss.png`` (training loss per optimizer step, evaluation loss as markers, learning rate on a second axis) is
written next to the model: into the Hugging Face export's ``output_dir`` at every checkpoint and by the export itself
(:class:`lit_sft.export.HFExport`, ``lit_sft export``), which links it from the model card. Drawing never fails a
run: any error (matplotlib missing included) is a warning and the run goes on without the picture.

The metric names are ``lit_sft.metrics``' constants (``LOSS``, ``EVAL_LOSS``, ``LEARNING_RATE``), the names
:class:`lit_sft.SFTModule` logs.
"""

from __future__ import annotations

import csv
import glob
import math
import os
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lit_sft.metrics import EVAL_LOSS, LEARNING_RATE, LOSS as TRAIN_LOSS  # one place for metric names

FILENAME = "loss.png"


def render_loss_curve(train: list[tuple[int, float, float]], evals: list[tuple[int, float]], path: str,
                      title: Optional[str] = None) -> None:
    """Draw the curve to ``path`` (PNG) with matplotlib's object-oriented API (no pyplot: no global state, no
    display needed).

    Args:
        train: ``(optimizer step, training loss, learning rate)`` per step; non-finite losses are left out.
        evals: ``(optimizer step, evaluation loss)`` per evaluation.
        path: the PNG to write (written to ``path + ".tmp"``, then renamed).

    Raises:
        ImportError: matplotlib is not installed. Any matplotlib or I/O error is passed on.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = [(s, loss) for s, loss, _ in train if math.isfinite(loss)]
    if points:
        ax.plot(*zip(*points), color="tab:blue", linewidth=1.2, label="train loss")
    if evals:
        ax.plot(*zip(*evals), color="tab:orange", marker="o", linewidth=1.2, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss (nats per supervised token)")
    ax.grid(alpha=0.3)
    rates = [(s, lr) for s, _, lr in train if math.isfinite(lr)]
    handles, labels = ax.get_legend_handles_labels()
    if rates:
        lr_ax = ax.twinx()
        line, = lr_ax.plot(*zip(*rates), color="tab:gray", linewidth=1.0, linestyle="--", label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        handles, labels = handles + [line], labels + ["learning rate"]
    if handles:
        ax.legend(handles, labels, loc="upper right")
    ax.set_title(title or "lit_sft training")
    fig.tight_layout()
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def write_loss_curve(history: Optional["LossCurve"], folder: str, title: Optional[str] = None) -> Optional[str]:
    """Write ``folder/loss.png`` from ``history``; return its name relative to ``folder`` (for the model card), or
    ``None`` when there is nothing to draw or drawing failed (a warning says why; never raises)."""
    if history is None or not (history.train or history.evals):
        return None
    try:
        os.makedirs(folder, exist_ok=True)
        render_loss_curve(history.train, history.evals, os.path.join(folder, FILENAME), title)
    except Exception as err:  # a picture must never cost a run
        rank_zero_warn(f"could not draw {os.path.join(folder, FILENAME)} ({type(err).__name__}: {err}); "
                       "training and the export go on without the loss curve")
        return None
    return FILENAME


def find_loss_curve(trainer: Optional[L.Trainer]) -> Optional["LossCurve"]:
    """The trainer's :class:`LossCurve` callback, or ``None``."""
    return next((c for c in getattr(trainer, "callbacks", None) or [] if isinstance(c, LossCurve)), None)


def _float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


class LossCurve(Callback):
    """Keeps the run's loss history across resumes and draws ``loss.png`` at every checkpoint (see the module
    docstring).

    Args:
        output_dir: where ``loss.png`` goes at checkpoints; default: the ``output_dir`` of the trainer's
            :class:`lit_sft.export.HFExport` (next to the model), else none (the export still draws it).

    Attributes:
        train: ``[(optimizer step, training loss, learning rate)]``, one per optimizer step, in step order.
        evals: ``[(optimizer step, evaluation loss)]``, one per evaluation during training.
    """

    def __init__(self, output_dir: Optional[str] = None) -> None:
        self.output_dir = output_dir
        self.train: list[tuple[int, float, float]] = []
        self.evals: list[tuple[int, float]] = []
        self._seen: Any = None

    # -- recording -----------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep only the history up to the step training starts from (the checkpoint's, restored before this
        hook), then fill what it lacks from the CSV log."""
        step = trainer.global_step
        self.train = [p for p in self.train if p[0] <= step]
        self.evals = [p for p in self.evals if p[0] <= step]
        self._seen = getattr(pl_module, "last_step_metrics", None)
        if step > 0:
            self._fill_from_csv(trainer, step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Record the optimizer step that just ended (once per step: ``SFTModule.last_step_metrics`` is a new dict
        after every step; a non-finite step it skipped leaves the previous one, and is not drawn)."""
        metrics = getattr(pl_module, "last_step_metrics", None)
        if not metrics or metrics is self._seen or TRAIN_LOSS not in metrics:
            return
        self._seen = metrics
        step = trainer.global_step
        if self.train and self.train[-1][0] >= step:
            return
        self.train.append((step, _float(metrics[TRAIN_LOSS]), _float(metrics.get(LEARNING_RATE, float("nan")))))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":  # `lit_sft validate` is not part of the run
            return
        value = trainer.callback_metrics.get(EVAL_LOSS)
        if value is None:
            return
        step = trainer.global_step
        self.evals = [p for p in self.evals if p[0] != step] + [(step, _float(value))]

    def _fill_from_csv(self, trainer: L.Trainer, step: int) -> None:
        """Add the CSV logger's points up to ``step`` that the restored history lacks."""
        from lightning.pytorch.loggers import CSVLogger

        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                self.fill_from_csv(os.path.join(logger.log_dir, "metrics.csv"), step)
                return

    def fill_from_csv(self, path: str, step: int) -> None:
        """Add the points of ``path`` (a Lightning ``metrics.csv``) up to optimizer step ``step`` that the history
        lacks (a missing file adds nothing)."""
        if not os.path.isfile(path):
            return
        train, evals = {p[0]: p for p in self.train}, dict(self.evals)
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                s = int(float(row.get("step") or 0))
                if s > step:
                    continue
                if row.get(TRAIN_LOSS) and s not in train:
                    train[s] = (s, _float(row[TRAIN_LOSS]), _float(row.get(LEARNING_RATE) or "nan"))
                if row.get(EVAL_LOSS) and s not in evals:
                    evals[s] = _float(row[EVAL_LOSS])
        self.train = [train[s] for s in sorted(train)]
        self.evals = sorted(evals.items())

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"train": [list(p) for p in self.train], "evals": [list(p) for p in self.evals]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train = [(int(s), float(loss), float(lr)) for s, loss, lr in state_dict.get("train", [])]
        self.evals = [(int(s), float(loss)) for s, loss in state_dict.get("evals", [])]

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Redraw ``loss.png`` next to the model (global rank 0) whenever a checkpoint is written."""
        folder = self.output_dir or _export_dir(trainer)
        if folder and trainer.is_global_zero:
            write_loss_curve(self, folder)


def _export_dir(trainer: L.Trainer) -> Optional[str]:
    from lit_sft.export import HFExport

    return next((c.output_dir for c in trainer.callbacks if isinstance(c, HFExport)), None)


def history_from_checkpoint(checkpoint: dict[str, Any], path: Optional[str] = None) -> Optional[LossCurve]:
    """The :class:`LossCurve` stored in a loaded checkpoint (``checkpoint["callbacks"]["LossCurve"]``), or ``None``.

    With ``path`` (the checkpoint's, ``<output_dir>/checkpoints/step-NNNNNN.ckpt``), points up to the checkpoint's step
    that it lacks are filled from the run's ``<output_dir>/logs/**/metrics.csv`` when there is one (the evaluation
    that ran right after the checkpoint was written, a checkpoint of a run without this callback).
    """
    history = LossCurve()
    history.load_state_dict((checkpoint.get("callbacks") or {}).get(LossCurve.__qualname__) or {})
    if path is not None:
        logs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "logs")
        found = sorted(glob.glob(os.path.join(logs, "**", "metrics.csv"), recursive=True))
        if found:
            history.fill_from_csv(found[0], int(checkpoint.get("global_step", 0)))
    return history if history.train or history.evals else None
