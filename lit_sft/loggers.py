"""Loggers for ``run.report_to``: wandb, CSV and TensorBoard, one history per training across kills and resumes.

* CSV: Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when a run restarts in the same folder; a resumed
  SFT run must keep its history. :class:`ResumableCSVLogger` appends instead, after :func:`trim_metrics` removed the
  rows of steps the interrupted run logged after its last checkpoint (they are trained again).
* wandb: one run id for the whole training. A fresh run draws a random id and writes it to ``output_dir/wandb/run_id``
  (:func:`wandb_run_id`) before training; a resumed run reads it back and continues that run (``WandbLogger(id=...)``,
  whose ``resume="allow"`` appends to it; offline runs of the same id are merged by ``wandb sync``). Steps the
  interrupted run logged after its last checkpoint stay in wandb's history (wandb cannot remove them offline).
* TensorBoard: the same folder ``output_dir/logs[/run_name]`` every time; a resumed run opens its writer with
  ``purge_step`` = the checkpoint's step + 1, so TensorBoard hides the interrupted run's events after the checkpoint.
"""

from __future__ import annotations

import csv
import os
import secrets
import string
from typing import Any, Optional

from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers import CSVLogger


class _AppendingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):  # the previous header's columns stay (e.g. eval/loss): Lightning
            with open(self.metrics_file_path, newline="") as f:  # rewrites the file with the keys it knows
                self.metrics_keys = [k for k in next(csv.reader(f), []) if k]

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


def wandb_run_id(output_dir: str, resuming: bool) -> str:
    """The wandb run id of the training in ``output_dir``: the one stored in ``output_dir/wandb/run_id`` when
    ``resuming`` (a checkpoint is being resumed), else a new one (8 random lowercase letters and digits), stored
    there by global rank 0 so that a later resume finds it (written before training starts: it survives any kill)."""
    from lightning.pytorch.utilities import rank_zero_only

    path = os.path.join(output_dir, "wandb", "run_id")
    if resuming and os.path.isfile(path):
        with open(path) as f:
            stored = f.read().strip()
        if stored:
            return stored
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # wandb's id alphabet
    if rank_zero_only.rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(run_id + "\n")
        os.replace(path + ".tmp", path)
    return run_id


def build_loggers(report_to: list[str], output_dir: str, run_name: Optional[str], wandb_project: str,
                  resume_step: Optional[int] = None) -> list[Any]:
    """Loggers for ``report_to`` (``wandb``, ``csv``, ``tensorboard``; ``none`` or an empty list: none).

    CSV and TensorBoard write to ``output_dir/logs[/run_name]``; wandb to ``output_dir/wandb`` (``WANDB_MODE=offline``
    works without network). ``resume_step``: the step of the checkpoint being resumed (``None``: a fresh run): later
    CSV rows are dropped, later TensorBoard events purged, and wandb continues the stored run id.
    """
    loggers: list[Any] = []
    for name in report_to:
        if name == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            os.makedirs(output_dir, exist_ok=True)
            run_id = wandb_run_id(output_dir, resuming=resume_step is not None)
            loggers.append(WandbLogger(name=run_name, project=wandb_project, save_dir=output_dir, id=run_id))
        elif name == "csv":
            # flushed every step, so a killed run keeps the rows of the steps it finished
            logger = ResumableCSVLogger(output_dir, name="logs", version=run_name or "", flush_logs_every_n_steps=1)
            if resume_step is not None:
                trim_metrics(os.path.join(logger.log_dir, "metrics.csv"), resume_step)
            loggers.append(logger)
        elif name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            purge = {"purge_step": resume_step + 1} if resume_step is not None else {}
            loggers.append(TensorBoardLogger(output_dir, name="logs", version=run_name or "", **purge))
    return loggers
