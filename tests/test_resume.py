"""Kill and resume: a run killed after optimizer step k and resumed from its checkpoint continues exactly like a run
that was never interrupted (losses, learning rates, rows of every step, final weights, step counters).

Setup: 10 chat rows, 2 rows x 2 micro-batches per optimizer step, so an epoch has 3 steps (the last one holds 2 rows)
and 2 epochs make N = 6 steps; rows are shuffled per epoch (``seed + epoch``). The kill is an exception raised
between two steps, after ``ModelCheckpoint`` has written step k. Killing (rather than ``max_steps=k``) keeps the
LR schedule of the interrupted run sized for all N steps, as in a real crash.

Cases: k = 3 (the checkpoint is the last step of epoch 0), k = 4 (mid-epoch after crossing an epoch boundary: the
resumed epoch must skip one step), and k = 2 with ``max_steps`` (iteration-based training, mid-epoch 0). The same is
then checked through the CLI, whose second invocation finds the checkpoint in ``output_dir`` by itself.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from sft_helpers import (QWEN_TOKENIZER, Killed, KillAfterStep, StepRecorder, chat_rows, cpu_trainer,
                         read_metrics_csv, save_tiny_model, sft_data, sft_module, write_jsonl)

N_ROWS, EPOCHS, STEPS_PER_EPOCH = 10, 2, 3
N = EPOCHS * STEPS_PER_EPOCH
LR = 1e-2  # large enough that the weights, and so the losses, change visibly from step to step
TOL = 1e-6
COMPARED = ("global_step", "epoch", "rows", "lrs", "train/loss", "train/num_loss_tokens", "train/num_tokens",
            "train/tokens_seen", "train/token_accuracy")


def _fit(paths, root, callbacks=(), ckpt_path=None, **trainer_kwargs):
    trainer_kwargs.setdefault("max_epochs", EPOCHS)
    recorder = StepRecorder()
    module = sft_module(paths["model"], learning_rate=LR)
    data = sft_data(paths["data"])
    trainer = cpu_trainer(root, [recorder, *callbacks], **trainer_kwargs)
    try:
        trainer.fit(module, data, ckpt_path=ckpt_path)
    except Killed:
        pass
    return recorder, module, trainer


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run A."""
    tmp = tmp_path_factory.mktemp("resume")
    paths = {"data": write_jsonl(str(tmp / "rows.jsonl"), chat_rows(N_ROWS, seed=2)),
             "model": save_tiny_model(str(tmp / "init"), seed=0)}
    recorder, module, trainer = _fit(paths, str(tmp / "a"))
    assert trainer.global_step == N and len(recorder.steps) == N
    assert recorder.column("epoch") == [0] * STEPS_PER_EPOCH + [1] * STEPS_PER_EPOCH
    assert len({tuple(r) for r in recorder.column("rows")}) == N, "every step should see a different set of rows"
    weights = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    return {"paths": paths, "steps": recorder.steps, "weights": weights}


def _max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _assert_steps_match(got: list[dict], want: list[dict]) -> float:
    """Same keys as the reference, floats within ``TOL``; returns the largest difference."""
    assert [s["global_step"] for s in got] == [s["global_step"] for s in want]
    worst = 0.0
    for g, w in zip(got, want):
        for key in COMPARED:
            if isinstance(w[key], float):
                worst = max(worst, abs(g[key] - w[key]))
                assert g[key] == pytest.approx(w[key], abs=TOL, rel=0), (g["global_step"], key)
            elif key == "lrs":
                worst = max(worst, *(abs(x - y) for x, y in zip(g[key], w[key])))
                assert g[key] == pytest.approx(w[key], abs=1e-12, rel=0), (g["global_step"], key)
            else:
                assert g[key] == w[key], (g["global_step"], key)
    return worst


@pytest.mark.parametrize("k, iteration_based", [(3, False), (4, False), (2, True)],
                         ids=["k3_epoch_end", "k4_mid_epoch_1", "k2_max_steps"])
def test_kill_and_resume_matches_uninterrupted(reference, tmp_path, k, iteration_based):
    paths, want = reference["paths"], reference["steps"]
    limits = {"max_steps": N, "max_epochs": -1} if iteration_based else {"max_epochs": EPOCHS}
    ckpt_dir = str(tmp_path / "checkpoints")

    # Run B: checkpoints every k steps, killed right after step k.
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step:06d}", auto_insert_metric_name=False,
                                 every_n_train_steps=k, save_top_k=-1)
    before, _, killed = _fit(paths, str(tmp_path), [checkpoint, KillAfterStep(k)], enable_checkpointing=True,
                             **limits)
    assert killed.global_step == k
    _assert_steps_match(before.steps, want[:k])
    ckpt_path = os.path.join(ckpt_dir, f"step-{k:06d}.ckpt")
    assert os.listdir(ckpt_dir) == [os.path.basename(ckpt_path)]
    assert torch.load(ckpt_path, map_location="cpu", weights_only=False)["global_step"] == k

    # Run C: a fresh Trainer, module and data module resume from the checkpoint.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after, module, resumed = _fit(paths, str(tmp_path), ckpt_path=ckpt_path, **limits)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "not resumable" in m or "different data settings" in m], messages

    assert resumed.global_step == N
    assert resumed.current_epoch == EPOCHS
    worst = _assert_steps_match(after.steps, want[k:])
    param_diff = _max_param_diff(module.model.state_dict(), reference["weights"])
    print(f"\nk={k}: steps {k + 1}..{N}: max |metric diff| {worst:.3g}; max |weight diff| {param_diff:.3g}")
    assert param_diff <= TOL


class _Lines(logging.Handler):
    """Collects the messages of a logger that does not propagate (``lightning.pytorch``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_cli_kill_and_auto_resume(reference, tmp_path, monkeypatch):
    """``lit_sft fit`` killed after step 4 and started again with the same arguments resumes from
    ``output_dir/checkpoints/step-000004.ckpt`` by itself, logs steps 5..6 exactly as the uninterrupted Trainer run
    did, and exports the same final weights."""
    from safetensors.torch import load_file

    from lit_sft.cli import latest_checkpoint, main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    config = {
        "seed_everything": 0,
        "run": {"output_dir": str(out), "save_steps": 2, "save_total_limit": 1, "report_to": ["csv"]},
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_epochs": EPOCHS,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
        # the settings of ``sft_helpers.sft_module`` / ``sft_data``, as in the reference run
        "model": {"model_name_or_path": reference["paths"]["model"], "torch_dtype": "float32",
                  "attn_implementation": "sdpa", "gradient_checkpointing": False, "learning_rate": LR,
                  "warmup_ratio": 0.05},
        "data": {"dataset_name": reference["paths"]["data"], "tokenizer_name_or_path": QWEN_TOKENIZER,
                 "max_length": 128, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                 "num_workers": 0},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    kill = {"class_path": "sft_helpers.KillAfterStep", "init_args": {"step": 4}}
    killed = {**config, "trainer": {**config["trainer"], "callbacks": [kill]}}
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(killed))

    with pytest.raises(Killed):
        main(["fit", "--config", "killed.yaml"])
    assert os.listdir(out / "checkpoints") == ["step-000004.ckpt"]
    assert not (out / "model.safetensors").exists()

    handler = _Lines()
    logging.getLogger("lightning.pytorch").addHandler(handler)
    try:
        main(["fit", "--config", "config.yaml"])
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(handler)
    resume_lines = [line for line in handler.lines if "resuming training at" in line]
    assert resume_lines and resume_lines[0].endswith(os.path.join("checkpoints", "step-000004.ckpt")), handler.lines
    assert any(line.startswith("Restored all states from the checkpoint") for line in handler.lines)

    logged = read_metrics_csv(str(out / "logs" / "metrics.csv"))
    want = {s["global_step"]: s for s in reference["steps"]}
    for step in range(5, N + 1):
        assert logged[step]["train/loss"] == pytest.approx(want[step]["train/loss"], abs=TOL, rel=0)
        assert logged[step]["train/learning_rate"] == pytest.approx(want[step]["lrs"][0], abs=1e-12, rel=0)
        assert logged[step]["train/tokens_seen"] == want[step]["train/tokens_seen"]
    # The CSV history of the killed run is kept (Lightning's CSVLogger would delete it), with no duplicated step.
    with open(out / "logs" / "metrics.csv") as f:
        assert [int(float(row["step"])) for row in csv.DictReader(f)] == list(range(1, N + 1))
    # save_total_limit=1 also rotates out the checkpoint the run resumed from (Lightning alone would keep it).
    assert latest_checkpoint(str(out)) == str(out / "checkpoints" / f"step-{N:06d}.ckpt")
    assert sorted(os.listdir(out / "checkpoints")) == ["finished.json", f"step-{N:06d}.ckpt"]
    exported = load_file(str(out / "model.safetensors"))
    assert set(reference["weights"]) - set(exported) <= {"lm_head.weight"}  # tied to the embeddings
    expected = {k: v for k, v in reference["weights"].items() if k in exported}
    assert _max_param_diff(exported, expected) <= TOL
