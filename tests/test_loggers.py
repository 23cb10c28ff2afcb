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
