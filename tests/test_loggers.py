"""One logged history per training across a kill and a resume (``lit_sft/loggers.py``): one wandb run id (offline,
``WANDB_MODE=offline``), TensorBoard events in the same folder with the killed run's steps after its checkpoint purged,
and the CSV history (``tests/test_resume.py``).

``lit_sft fit`` with ``report_to: [csv, tensorboard, wandb]``, ``save_steps: 2``, 4 optimizer steps, killed after
step 3, then run again: it resumes at step 2 and retrains steps 3 and 4.
"""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from sft_helpers import QWEN_TOKENIZER, Killed, chat_rows, save_tiny_model, write_jsonl


def test_kill_and_resume_is_one_wandb_run_and_one_tensorboard_history(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from lit_sft.cli import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    config = {
        "seed_everything": 0,
        "run": {"output_dir": str(out), "save_steps": 2, "save_total_limit": 1,
                "report_to": ["csv", "tensorboard", "wandb"], "wandb_project": "lit-sft-tests"},
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_epochs": 1,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"model_name_or_path": save_tiny_model(str(tmp_path / "init")), "torch_dtype": "float32",
                  "attn_implementation": "sdpa", "gradient_checkpointing": False, "learning_rate": 1e-2},
        "data": {"dataset_name": write_jsonl(str(tmp_path / "rows.jsonl"), chat_rows(8, seed=6)),
                 "tokenizer_name_or_path": QWEN_TOKENIZER, "max_length": 128, "per_device_train_batch_size": 2,
                 "gradient_accumulation_steps": 1, "num_workers": 0},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    kill = {"class_path": "sft_helpers.KillAfterStep", "init_args": {"step": 3}}
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump({**config, "trainer": {**config["trainer"],
                                                                                 "callbacks": [kill]}}))
    try:
        with pytest.raises(Killed):
            main(["fit", "--config", "killed.yaml"])
    finally:
        wandb.finish()
    try:
        main(["fit", "--config", "config.yaml"])
    finally:
        wandb.finish()

    runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    assert len(runs) == 2, os.listdir(out / "wandb")
    ids = {run.rsplit("-", 1)[1] for run in runs}
    assert len(ids) == 1, f"a resumed run is a second wandb run: {runs}"
    assert ids == {(out / "wandb" / "run_id").read_text().strip()}

    events = sorted(glob.glob(str(out / "logs" / "events.out.tfevents.*")))
    assert len(events) == 2  # both processes wrote into the same run folder
    accumulator = event_accumulator.EventAccumulator(str(out / "logs"))
    accumulator.Reload()
    steps = [event.step for event in accumulator.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4], steps  # step 3 of the killed run is purged, not shown twice


def test_a_fresh_run_draws_a_new_wandb_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lit_sft.loggers import wandb_run_id

    first = wandb_run_id(str(tmp_path), resuming=False)
    assert wandb_run_id(str(tmp_path), resuming=True) == first
    assert wandb_run_id(str(tmp_path), resuming=False) != first  # a new training in the same output_dir


def test_resumed_csv_keeps_columns_the_new_rows_lack(tmp_path):
    """A resumed run whose first rows lack a column of the earlier ones (``val/loss`` logged before the checkpoint,
    only training rows after it): Lightning's writer rewrote the file with the new rows' keys alone and failed
    (``dict contains fields not in fieldnames: 'val/loss'``); the earlier rows must keep their values."""
    from lit_sft.loggers import build_loggers
    from sft_helpers import read_metrics_csv

    first, = build_loggers(["csv"], str(tmp_path), None, "unused")
    first.log_metrics({"train/loss": 2.0}, step=1)
    first.log_metrics({"val/loss": 1.5}, step=2)
    first.save()
    resumed, = build_loggers(["csv"], str(tmp_path), None, "unused", resume_step=2)
    resumed.log_metrics({"train/loss": 1.0, "train/grad_norm": 0.5}, step=3)
    resumed.save()
    assert read_metrics_csv(str(tmp_path / "logs" / "metrics.csv")) == {
        1: {"train/loss": 2.0}, 2: {"val/loss": 1.5}, 3: {"train/loss": 1.0, "train/grad_norm": 0.5}}
