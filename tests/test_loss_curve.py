"""The loss curve (``lit_sft/loss_curve.py``) and the model card that shows it (``lit_sft/export.py``).

* The embedded default (``configs/tiny_cpu.yaml``) writes ``loss.png`` next to the model and a model card that links
  it and holds the preprocessing report (issue 12's acceptance point): ``tests/test_cli.py::
  test_tiny_config_end_to_end`` checks it on the run it already makes.
* The history behind the curve is the run's own: every optimizer step's ``train/loss`` and learning rate, and every
  evaluation's ``eval/loss``, equal to what the CSV logger recorded, and it survives a kill and a resume (the
  checkpoint carries it); ``lit_sft export`` from the checkpoint draws the same curve.
* Drawing never fails a run: without matplotlib the run finishes, warns, and the card has no image.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import yaml

from sft_helpers import QWEN_TOKENIZER, Killed, chat_rows, read_metrics_csv, save_tiny_model, write_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    from PIL import Image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    with Image.open(path) as image:
        return image.size


def _config(tmp_path, **run) -> dict:
    os.makedirs(tmp_path / "data", exist_ok=True)
    rows = chat_rows(12, seed=6)
    rows[3]["messages"] = [m for m in rows[3]["messages"] if m["role"] != "assistant"]  # dropped: in the report
    write_jsonl(str(tmp_path / "data" / "train.jsonl"), rows[:9])
    write_jsonl(str(tmp_path / "data" / "test.jsonl"), rows[9:])
    return {
        "seed_everything": 0,
        "run": {"output_dir": str(tmp_path / "run"), "save_steps": 2, "save_total_limit": 1, "report_to": ["csv"],
                "eval_strategy": "steps", "eval_steps": 2, **run},
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_epochs": 1,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0},
        "model": {"model_name_or_path": save_tiny_model(str(tmp_path / "init")), "torch_dtype": "float32",
                  "attn_implementation": "sdpa", "gradient_checkpointing": False, "learning_rate": 1e-2},
        "data": {"dataset_name": str(tmp_path / "data"), "tokenizer_name_or_path": QWEN_TOKENIZER,
                 "max_length": 128, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                 "num_workers": 0},
    }


def test_history_is_the_runs_and_survives_a_kill_and_resume(tmp_path, monkeypatch):
    """4 optimizer steps, a checkpoint and an evaluation every 2, killed after step 3 and run again: the history is
    every step's ``train/loss`` and learning rate and both evaluations, equal to the CSV logger's rows (each
    evaluation ran after its step's checkpoint was written: the CSV fills it in, on resume and for the export); the
    curve and the card are there, and ``lit_sft export`` from the checkpoint writes the same curve and report."""
    from lit_sft.cli import main
    from lit_sft.loss_curve import EVAL_LOSS, LEARNING_RATE, TRAIN_LOSS, history_from_checkpoint

    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    kill = {"class_path": "sft_helpers.KillAfterStep", "init_args": {"step": 3}}
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump({**config, "trainer": {**config["trainer"],
                                                                                 "callbacks": [kill]}}))
    with pytest.raises(Killed):
        main(["fit", "--config", "killed.yaml"])
    out = tmp_path / "run"
    assert (out / "loss.png").is_file()  # drawn at checkpoint 2, before any export
    main(["fit", "--config", "config.yaml"])

    path = out / "checkpoints" / "step-000004.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    stored = history_from_checkpoint(checkpoint)  # eval 2: filled in from the CSV on resume; eval 4 ran after it
    assert [s for s, _ in stored.evals] == [2] and [s for s, _, _ in stored.train] == [1, 2, 3, 4]
    history = history_from_checkpoint(checkpoint, str(path))  # and the run's metrics.csv next to it
    csv = read_metrics_csv(str(out / "logs" / "metrics.csv"))
    print(f"\nhistory: train {history.train}, evals {history.evals}")
    assert [s for s, _, _ in history.train] == [1, 2, 3, 4]
    for step, loss, lr in history.train:
        assert loss == pytest.approx(csv[step][TRAIN_LOSS], rel=1e-12)
        assert lr == pytest.approx(csv[step][LEARNING_RATE], rel=1e-12)
    assert [s for s, _ in history.evals] == [2, 4]
    assert all(0 <= csv[step]["eval/mean_token_accuracy"] <= 1 for step in (2, 4))  # logged with eval/loss during fit
    for step, loss in history.evals:
        assert loss == pytest.approx(csv[step][EVAL_LOSS], rel=1e-6)  # the progress-bar value is float32

    card = (out / "README.md").read_text()
    assert "](loss.png)" in card and _png_size(out / "loss.png")
    assert "### train" in card and "### test" in card
    assert "| no_assistant_turn | 1 | drop | 3 |" in card

    main(["export", "--config", "config.yaml", "--ckpt_path", str(path),
          "--run.output_dir", str(tmp_path / "exported")])
    exported = (tmp_path / "exported" / "README.md").read_text()
    assert "](loss.png)" in exported and _png_size(tmp_path / "exported" / "loss.png")
    assert "| no_assistant_turn | 1 | drop | 3 |" in exported


def test_drawing_failure_only_warns(tmp_path, monkeypatch):
    """matplotlib missing (any drawing error): the run finishes and exports, with a warning and no image link."""
    from lit_sft.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` raises ImportError
    config = _config(tmp_path, eval_strategy="no", save_steps=4)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.warns(UserWarning, match="could not draw .*loss.png.*ModuleNotFoundError"):
        main(["fit", "--config", "config.yaml", "--trainer.max_steps", "1"])
    out = tmp_path / "run"
    card = (out / "README.md").read_text()
    assert (out / "model.safetensors").is_file() and not (out / "loss.png").exists()
    assert "loss.png" not in card and "## Preprocessing report" in card


def test_render_draws_what_it_is_given(tmp_path):
    """The picture's data are the history's: matplotlib's lines carry exactly the steps and values passed (a
    non-finite loss left out), and the learning rate is on a second axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401 (matplotlib is a dependency)
    from matplotlib.figure import Figure

    from lit_sft import loss_curve

    drawn = []
    savefig = Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn.append(fig)
        return savefig(fig, *args, **kwargs)

    train = [(1, 3.0, 1e-4), (2, float("nan"), 2e-4), (3, 2.5, 1.5e-4)]
    Figure.savefig = keep
    try:
        loss_curve.render_loss_curve(train, [(3, 2.75)], str(tmp_path / "loss.png"))
    finally:
        Figure.savefig = savefig
    (fig,) = drawn
    ax, lr_ax = fig.axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines + lr_ax.lines}
    assert lines["train loss"] == ([1, 3], [3.0, 2.5])
    assert lines["eval loss"] == ([3], [2.75])
    assert lines["learning rate"] == ([1, 2, 3], [1e-4, 2e-4, 1.5e-4])
    assert [line.get_label() for line in lr_ax.lines] == ["learning rate"]
    assert _png_size(tmp_path / "loss.png")
