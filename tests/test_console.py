"""What a user sees while training (``lit_sft/progress.py``, ``lit_sft/console.py``).

* The progress bar counts optimizer steps (Lightning's counted micro-batches: 64/64 for 32 steps, ``max_steps: 2``
  stopping at 4/64, ``Epoch 0/-2 ... 16/8`` in the library example) and shows a non-finite loss as ``nan``.
* With output in a file (nohup, SLURM, CI), plain step lines (step/total, loss, tokens/s, LR, ETA) every
  ``log_every_n_steps`` optimizer steps, checkpoint and resume notices; a run killed with SIGKILL keeps in its log the
  steps it trained.
* None of the known noise: Lightning's adverts, DeepSpeed's CPU notice, transformers' configuration dumps, the
  LeafSpec deprecation, "Total length of `list` across ranks is zero", "Checkpoint directory ... exists and is not
  empty" on a resume.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import lightning as L
import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from sft_helpers import (QWEN_TOKENIZER, chat_rows, cpu_trainer, log_lines, save_tiny_model, sft_data, sft_module,
                         write_jsonl)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = ("💡", "litlogger", "litmodels", "Setting accelerator to CPU", "PreTrainedConfig", "Model config",
         "LeafSpec", "across ranks is zero", "exists and is not empty")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    return {"data": write_jsonl(str(tmp / "rows.jsonl"), chat_rows(6, seed=7)),
            "model": save_tiny_model(str(tmp / "init"), seed=3), "tmp": tmp}


class BarAtEpochEnd(L.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []

    def on_train_epoch_end(self, trainer, module) -> None:
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((trainer.current_epoch, bar.n, bar.total))


@pytest.mark.parametrize("limits, want", [
    ({"max_epochs": 2}, [(0, 3, 3), (1, 3, 3)]),  # 6 rows, 1 x 2 per step: 3 optimizer steps (6 micro-batches)
    ({"max_steps": 2, "max_epochs": -1}, [(0, 2, 2)]),  # was 4/6 in micro-batches, "Epoch 0/-2" with Rich
], ids=["epochs", "max_steps"])
def test_progress_bar_counts_optimizer_steps(paths, tmp_path, limits, want):
    from lit_sft.progress import SFTProgressBar

    seen = BarAtEpochEnd()
    trainer = cpu_trainer(str(tmp_path), [seen], enable_progress_bar=True, **limits)
    trainer.fit(sft_module(paths["model"]), sft_data(paths["data"], per_device_train_batch_size=1))
    assert type(trainer.progress_bar_callback) is SFTProgressBar  # replaced Lightning's stock bar by itself
    assert seen.seen == want


def test_progress_bar_shows_a_nan_loss():
    """``log_step`` gives the progress bar every shown metric as logged, a nan loss included (it skipped nans)."""
    from lit_sft import SFTModule

    module = SFTModule(model_config={"model_type": "qwen2"}, random_init=True)
    module._trainer = SimpleNamespace(log_every_n_steps=1, global_step=3, loggers=[])
    shown = {}
    module.log = lambda name, value, **kwargs: shown.update({name: value})
    metrics = {"train/loss": float("nan"), "train/tokens_per_s": 12.5, "train/mfu": float("nan")}
    module.log_step(metrics)
    assert set(shown) == {"loss", "tokens_per_s"}  # MFU only where the device's peak FLOP/s is known
    assert math.isnan(shown["loss"])


def test_plain_lines_and_notices(paths, tmp_path):
    """Off a terminal (pytest's stdout): one line per ``log_every_n_steps`` optimizer steps with step/total, loss,
    tokens/s, LR, ETA; a notice for each checkpoint; after a resume, a resume notice and the remaining steps."""
    with log_lines("lightning.pytorch") as lines:
        ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="step-{step:06d}",
                               auto_insert_metric_name=False, every_n_train_steps=2, save_top_k=-1)
        module = sft_module(paths["model"])
        trainer = cpu_trainer(str(tmp_path), [ckpt], enable_progress_bar=True, enable_checkpointing=True,
                              max_epochs=2, log_every_n_steps=2)
        trainer.fit(module, sft_data(paths["data"], per_device_train_batch_size=1))
        first = list(lines)
        lines.clear()
        trainer = cpu_trainer(str(tmp_path), enable_progress_bar=True, max_epochs=3, log_every_n_steps=2)
        trainer.fit(sft_module(paths["model"]), sft_data(paths["data"], per_device_train_batch_size=1),
                    ckpt_path=str(tmp_path / "ckpt" / "step-000006.ckpt"))
        second = lines
    steps = [line for line in first if line.startswith("step ")]
    assert [line.split(" |")[0] for line in steps] == ["step 2/6", "step 4/6", "step 6/6"]
    loss = module.last_step_metrics["train/loss"]
    assert f"loss {loss:.4f}" in steps[-1] and "tokens/s " in steps[-1] and "lr " in steps[-1]
    assert "ETA 0:00:00" in steps[-1]
    assert [line for line in first if line.startswith("Saving checkpoint")] == [
        f"Saving checkpoint at optimizer step {s} (epoch {(s - 1) // 3}) in {tmp_path / 'ckpt'}" for s in (2, 4, 6)]
    assert "Resuming at optimizer step 6/9 (epoch 2)" in second
    assert [line.split(" |")[0] for line in second if line.startswith("step ")] == ["step 8/9", "step 9/9"]


def _config(paths, out, **run):
    return {
        "seed_everything": 0,
        "run": {"output_dir": str(out), "save_steps": 2, "save_total_limit": 1, "report_to": ["csv"], **run},
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_epochs": 1,
                    "log_every_n_steps": 1},
        "model": {"model_name_or_path": paths["model"], "torch_dtype": "float32", "attn_implementation": "sdpa",
                  "gradient_checkpointing": False, "learning_rate": 1e-2},
        "data": {"dataset_name": paths["data"], "tokenizer_name_or_path": QWEN_TOKENIZER, "max_length": 128,
                 "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "num_workers": 2},
    }


@pytest.mark.slow
def test_cli_log_in_a_file_survives_sigkill_and_is_quiet(paths, tmp_path):
    """``lit_sft fit > run.log 2>&1``, killed with SIGKILL after step 3, then rerun: the first log holds steps 1..3
    and the checkpoint notice of step 2; the second a resume notice and steps 3..6; neither holds any known noise."""
    out = tmp_path / "run"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_config(paths, out)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lit_sft.cli", "fit", "--config", "config.yaml"]

    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 400
        while "step 3/6" not in (tmp_path / "first.log").read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    first = (tmp_path / "first.log").read_text()
    line = r"^step (\d)/6 \| epoch 0 \| loss \d+\.\d{4} \| tokens/s \S+ \| lr \S+ \| elapsed \S+ \| ETA \S+$"
    assert re.findall(line, first, re.M)[:3] == ["1", "2", "3"], first
    assert "Saving checkpoint at optimizer step 2 (epoch 0)" in first

    second = subprocess.run(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-4000:]
    assert "Resuming at optimizer step 2/6 (epoch 0)" in second.stdout
    assert re.findall(r"^step (\d)/6 \|", second.stdout, re.M) == ["3", "4", "5", "6"]
    for text in (first, second.stdout):
        noisy = [line for line in text.splitlines() if any(n in line for n in NOISE)]
        assert not noisy, noisy
