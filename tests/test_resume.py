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
import os
import warnings

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from sft_helpers import (QWEN_TOKENIZER, Killed, KillAfterStep, StepRecorder, chat_rows, cpu_trainer, log_lines,
                         read_metrics_csv, save_tiny_model, sft_data, sft_module, weight_digest, write_jsonl)

N_ROWS, EPOCHS, STEPS_PER_EPOCH = 10, 2, 3
N = EPOCHS * STEPS_PER_EPOCH
LR = 1e-2  # large enough that the weights, and so the losses, change visibly from step to step
TOL = 1e-6
COMPARED = ("global_step", "epoch", "rows", "lrs", "train/loss", "train/step_loss_tokens", "train/step_tokens",
            "train/num_tokens", "train/mean_token_accuracy")


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

    with log_lines("lightning.pytorch") as lines:
        main(["fit", "--config", "config.yaml"])
    resume_lines = [line for line in lines if "resuming training at" in line]
    assert resume_lines and resume_lines[0].endswith(os.path.join("checkpoints", "step-000004.ckpt")), lines
    assert any(line.startswith("Restored all states from the checkpoint") for line in lines)

    logged = read_metrics_csv(str(out / "logs" / "metrics.csv"))
    want = {s["global_step"]: s for s in reference["steps"]}
    for step in range(5, N + 1):
        assert logged[step]["train/loss"] == pytest.approx(want[step]["train/loss"], abs=TOL, rel=0)
        assert logged[step]["train/learning_rate"] == pytest.approx(want[step]["lrs"][0], abs=1e-12, rel=0)
        assert logged[step]["train/num_tokens"] == want[step]["train/num_tokens"]
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


# -- resume with loader workers, in later epochs, with and without accumulation -----------------------------------
# 6 rows, 2 rows per micro-batch: accumulation 1 gives 3 steps per epoch, accumulation 2 gives 2 (the second holds 2
# rows). A constant learning rate makes the first E epochs of the 3-epoch reference the uninterrupted E-epoch run, so
# one reference per accumulation serves every case. Everything is compared bit for bit.
MATRIX_ROWS, MATRIX_EPOCHS = 6, 3
CONSTANT_LR = dict(learning_rate=LR, lr_scheduler_type="constant", lr_scheduler_kwargs={}, warmup_ratio=0.0)


class WeightDigests(L.Callback):
    """``{global_step: weight_digest}`` after every optimizer step."""

    def __init__(self) -> None:
        self.by_step: dict[int, str] = {}

    def on_train_batch_end(self, trainer, module, *args) -> None:
        if trainer.global_step not in self.by_step:
            self.by_step[trainer.global_step] = weight_digest(module)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume_matrix")
    paths = {"data": write_jsonl(str(tmp / "rows.jsonl"), chat_rows(MATRIX_ROWS, seed=3)),
             "model": save_tiny_model(str(tmp / "init"), seed=1)}
    data_modules: dict = {}

    def data(accumulation: int, workers: int):
        # one data module per setting, reused by every fit (its tokenized rows are kept; the trainer is re-attached)
        key = (accumulation, workers)
        if key not in data_modules:
            data_modules[key] = sft_data(paths["data"], per_device_train_batch_size=2,
                                         gradient_accumulation_steps=accumulation, num_workers=workers)
        return data_modules[key]

    def fit(root, accumulation, workers, epochs, callbacks=(), ckpt_path=None):
        recorder = StepRecorder()
        module = sft_module(paths["model"], **CONSTANT_LR)
        trainer = cpu_trainer(root, [recorder, *callbacks], max_epochs=epochs,
                              enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
        try:
            trainer.fit(module, data(accumulation, workers), ckpt_path=ckpt_path)
        except Killed:
            pass
        return recorder, module, trainer

    references = {}
    for accumulation in (1, 2):
        digests = WeightDigests()
        recorder, module, trainer = fit(str(tmp / f"ref{accumulation}"), accumulation, 0, MATRIX_EPOCHS, [digests])
        references[accumulation] = {"steps": recorder.steps, "digests": digests.by_step}
        assert len({tuple(s["rows"]) for s in recorder.steps[:3]}) > 1  # the epochs' row orders differ
    return {"fit": fit, "references": references}


@pytest.mark.slow
@pytest.mark.parametrize("workers, accumulation, epochs, kill", [
    (2, 1, 2, 4),  # the reported case: killed in epoch 2 of 2 with loader workers (resumed run trained nothing)
    (2, 2, 3, 4),  # killed at the end of epoch 2 of 3: the resumed run starts epoch 3
    (2, 2, 3, 5),  # killed mid epoch 3 of 3
    (0, 1, 3, 7),  # no workers, epoch 3 of 3
], ids=["workers2_acc1_epoch2of2", "workers2_acc2_end_of_epoch2of3", "workers2_acc2_epoch3of3",
        "workers0_acc1_epoch3of3"])
def test_resume_in_a_later_epoch_with_workers_is_exact(matrix, tmp_path, workers, accumulation, epochs, kill):
    reference = matrix["references"][accumulation]
    steps_per_epoch = 3 if accumulation == 1 else 2
    total = epochs * steps_per_epoch
    want = reference["steps"][:total]
    ckpt_dir = str(tmp_path / "checkpoints")
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step:06d}", auto_insert_metric_name=False,
                                 every_n_train_steps=kill, save_top_k=-1)
    before, _, killed = matrix["fit"](str(tmp_path), accumulation, workers, epochs, [checkpoint, KillAfterStep(kill)])
    assert killed.global_step == kill
    after, module, resumed = matrix["fit"](str(tmp_path), accumulation, workers, epochs,
                                           ckpt_path=os.path.join(ckpt_dir, f"step-{kill:06d}.ckpt"))

    assert resumed.global_step == total, f"resumed run stopped at step {resumed.global_step} of {total}"
    got = before.steps + after.steps
    assert [s["global_step"] for s in got] == list(range(1, total + 1))
    for g, w in zip(got, want):
        for key in ("epoch", "rows", "lrs", "train/loss", "train/step_loss_tokens", "train/num_tokens",
                    "train/grad_norm"):
            assert g[key] == w[key], (g["global_step"], key, g[key], w[key])
    assert weight_digest(module) == reference["digests"][total], "final weights differ from the uninterrupted run"


# -- a token budget: the number of micro-batches differs from epoch to epoch ---------------------------------------
# 12 rows, 4 rows per optimizer step (2 x 2), micro-batches of <= 100 tokens: 3 steps per epoch, in 6, 7 and 7
# micro-batches (epochs 0, 1, 2). Lightning ends an epoch after len(loader) micro-batches, read when the loader is
# built: with epoch 0's 6, epoch 1 was cut before its last micro-batch (half an optimizer step).
class PackedStepRows(L.Callback):
    """Per optimizer step: the rows it trained (token ids split at ``cu_seq_lens_q``, looked up in the data)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, list[int], float]] = []
        self._rows: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        index = {tuple(ids): i for i, ids in enumerate(trainer.datamodule.train_rows["input_ids"])}
        ids, bounds = batch["input_ids"][0].tolist(), batch["cu_seq_lens_q"].tolist()
        labels = batch["labels"][0]
        for a, b in zip(bounds, bounds[1:]):
            if (labels[a:b] != -100).any():  # a filler row has every label masked
                self._rows.append(index[tuple(ids[a:b])])
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, module, *args) -> None:
        if trainer.global_step != self._step:
            self.steps.append((trainer.global_step, sorted(self._rows), module.last_step_metrics["train/loss"]))
            self._rows = []


@pytest.mark.slow
def test_token_budget_epochs_are_whole_and_resume_exactly(tmp_path):
    from lit_sft.data.sampler import plan_epoch

    rows = write_jsonl(str(tmp_path / "rows.jsonl"), chat_rows(12, seed=8))
    model = save_tiny_model(str(tmp_path / "init"), seed=4)
    settings = dict(padding_free=True, max_tokens_per_micro_batch=100, max_length=100, per_device_train_batch_size=2,
                    gradient_accumulation_steps=2, num_workers=2, seed=0)
    data = sft_data(rows, **settings)

    def fit(root, callbacks=(), ckpt_path=None):
        record, digests = PackedStepRows(), WeightDigests()
        module = sft_module(model, attn_implementation="lit_sft_varlen", **CONSTANT_LR)
        trainer = cpu_trainer(root, [record, digests, *callbacks], max_epochs=3,
                              enable_checkpointing=bool(callbacks))
        try:
            trainer.fit(module, data, ckpt_path=ckpt_path)
        except Killed:
            pass
        return record, digests, trainer

    full, full_digests, trainer = fit(str(tmp_path / "full"))
    counts = [sum(len(step.micro_batches[0]) for step in plan_epoch(data.train_rows["num_loss_tokens"], 2, 2, 1, 0, e, True,
                                                   data.train_rows["length"], 100)) for e in range(3)]
    assert counts[1] > counts[0], counts  # the case that was cut
    assert trainer.global_step == 9
    for (step, got, _), e_s in zip(full.steps, [(e, s) for e in range(3) for s in range(3)]):
        plan = plan_epoch(data.train_rows["num_loss_tokens"], 2, 2, 1, 0, e_s[0], True, data.train_rows["length"], 100)
        assert got == sorted(plan[e_s[1]].rows), step

    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="step-{step:06d}",
                                 auto_insert_metric_name=False, every_n_train_steps=4, save_top_k=-1)
    before, _, _ = fit(str(tmp_path / "b"), [checkpoint, KillAfterStep(4)])
    after, after_digests, resumed = fit(str(tmp_path / "b"), ckpt_path=str(tmp_path / "ckpt" / "step-000004.ckpt"))
    assert resumed.global_step == 9
    assert before.steps + after.steps == full.steps  # same rows and bit-identical losses at every step
    assert after_digests.by_step[9] == full_digests.by_step[9]
