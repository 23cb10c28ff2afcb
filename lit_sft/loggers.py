"""Loggers for ``run.report_to``: wandb, CSV and TensorBoard, kept across resumes.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when a run restarts in the same folder; a resumed SFT
run must keep its history. :class:`ResumableCSVLogger` appends instead, after :func:`trim_metrics` removed the rows
of steps the interrupted run logged after its last checkpoint (they are trained again).
"""

from __future__ import annotations

import csv
import os
from typing import Any, Optional

from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers import CSVLogger


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # keep the previous rows: the resumed run appends to them
        pass


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to an existing ``metrics.csv`` (Lightning's deletes it)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def trim_metrics(path: str, max_step: int) -> None:
    """Drop the rows of ``path`` (a ``metrics.csv``) whose ``step`` is past ``max_step``."""
    if not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], [r for r in reader if int(float(r.get("step") or 0)) <= max_step]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def build_loggers(report_to: list[str], output_dir: str, run_name: Optional[str], wandb_project: str,
                  resume_step: Optional[int] = None) -> list[Any]:
    """Loggers for ``report_to`` (``wandb``, ``csv``, ``tensorboard``; ``none`` or an empty list: none).

    CSV and TensorBoard write to ``output_dir/logs[/run_name]``; wandb to ``output_dir/wandb`` (``WANDB_MODE=offline``
    works without network). ``resume_step``: the step of the checkpoint being resumed, whose later CSV rows are
    dropped.
    """
    loggers: list[Any] = []
    for name in report_to:
        if name == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            os.makedirs(output_dir, exist_ok=True)
            loggers.append(WandbLogger(name=run_name, project=wandb_project, save_dir=output_dir))
        elif name == "csv":
            # flushed every step, so a killed run keeps the rows of the steps it finished
            logger = ResumableCSVLogger(output_dir, name="logs", version=run_name or "", flush_logs_every_n_steps=1)
            if resume_step is not None:
                trim_metrics(os.path.join(logger.log_dir, "metrics.csv"), resume_step)
            loggers.append(logger)
        elif name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(output_dir, name="logs", version=run_name or ""))
    return loggers
