"""Checkpoints that never lose work: resume from the newest *usable* checkpoint, rotation repaired after a kill, the
final state always checkpointed, a finished run left alone, the command line winning over a checkpoint's
hyper-parameters, the non-finite guard, runs that would train nothing, and the exported files' modes.

All runs go through ``lit_sft fit`` (in-process) on a tiny Qwen2 (hidden 16, 1 layer) with 10 chat rows, fp32 CPU.
The kill -9 matrix at chosen moments is ``tests/test_checkpoint_kill.py``.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat

import lightning as L
import pytest
import torch
import yaml

from sft_helpers import QWEN_TOKENIZER, chat_rows, log_lines, read_metrics_csv, save_tiny_model, write_jsonl

TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt_assets")
    return {"data": write_jsonl(str(tmp / "rows.jsonl"), chat_rows(10, seed=2)),
            "model": save_tiny_model(str(tmp / "init"), seed=0, **TINY)}


def _config(assets, out, **overrides) -> dict:
    """10 rows, micro-batch 2, no accumulation: 5 optimizer steps per epoch."""
    config = {
        "seed_everything": 0,
        "run": {"output_dir": str(out), "save_steps": 2, "save_total_limit": None, "report_to": ["csv"]},
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_epochs": 1,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"model_name_or_path": assets["model"], "torch_dtype": "float32", "attn_implementation": "sdpa",
                  "gradient_checkpointing": False, "learning_rate": 1e-2, "warmup_ratio": 0.1},
        "data": {"dataset_name": assets["data"], "tokenizer_name_or_path": QWEN_TOKENIZER, "max_length": 64,
                 "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "num_workers": 0},
    }
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        config[section][name] = value
    return config


def _fit(tmp_path, config: dict, *args: str, name: str = "config.yaml") -> "object":
    """``lit_sft fit --config <config> args``, in-process; returns the CLI object (model, trainer)."""
    from lit_sft.cli import SFTCLI
    from lit_sft import SFTDataModule, SFTModule

    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return SFTCLI(SFTModule, SFTDataModule, args=["fit", "--config", str(path), *args],
                  save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                  parser_kwargs={"allow_abbrev": False})


@pytest.fixture
def lightning_log():
    with log_lines("lightning.pytorch") as collected:
        yield collected


def _ckpts(out) -> list[str]:
    return sorted(n for n in os.listdir(out / "checkpoints") if n.startswith("step-"))


def _digests(folder) -> dict[str, str]:
    from sft_helpers import file_digests

    return file_digests(str(folder))


# -- resume from the newest usable checkpoint ------------------------------------------------------------------------
def test_truncated_newest_checkpoint_is_skipped_with_its_reason(assets, tmp_path, lightning_log, recwarn):
    """A truncated ``step-4`` (what a kill mid-copy or a full disk left under Lightning's own IO) must not block the
    rerun: it resumes from ``step-2``, says why ``step-4`` was skipped, and finishes."""
    from lit_sft.cli import latest_checkpoint

    out = tmp_path / "run"
    _fit(tmp_path, _config(assets, out, **{"trainer.max_steps": 4, "trainer.max_epochs": -1}))
    assert _ckpts(out) == ["step-000002.ckpt", "step-000004.ckpt"]
    newest = out / "checkpoints" / "step-000004.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])

    assert latest_checkpoint(str(out)) == str(out / "checkpoints" / "step-000002.ckpt")
    messages = [str(w.message) for w in recwarn]
    assert any("Skipping checkpoint" in m and "step-000004.ckpt" in m and "cannot be loaded" in m for m in messages)

    cli = _fit(tmp_path, _config(assets, out, **{"trainer.max_steps": 5, "trainer.max_epochs": -1}))
    assert cli.trainer.global_step == 5
    assert any(line.endswith("step-000002.ckpt") for line in lightning_log if "resuming training at" in line)
    assert sorted(read_metrics_csv(str(out / "logs" / "metrics.csv"))) == [1, 2, 3, 4, 5]


def test_named_unusable_checkpoint_is_an_error(assets, tmp_path):
    out = tmp_path / "run"
    bad = tmp_path / "step-000007.ckpt"
    bad.write_bytes(b"PK\x03\x04 not a whole archive")
    with pytest.raises(ValueError, match=r"ckpt_path=.*step-000007.ckpt.*cannot be resumed from: cannot be loaded"):
        _fit(tmp_path, _config(assets, out), "--ckpt_path", str(bad))
    with pytest.raises(ValueError, match=r"run.resume_from_checkpoint=.*cannot be resumed from"):
        _fit(tmp_path, _config(assets, out, **{"run.resume_from_checkpoint": str(bad)}))


def test_rotation_repairs_a_kill_between_save_and_delete(assets, tmp_path):
    """Killed after writing a new checkpoint and before deleting the oldest, a run with ``save_total_limit 2``
    holds 3 checkpoints; the resumed run must end with 2 (Lightning's own bookkeeping, restored from the checkpoint,
    never knew the extra one)."""
    out = tmp_path / "run"
    config = _config(assets, out, **{"run.save_steps": 1, "run.save_total_limit": 2, "trainer.max_steps": 3,
                                      "trainer.max_epochs": -1})
    _fit(tmp_path, config)
    assert _ckpts(out) == ["step-000002.ckpt", "step-000003.ckpt"]
    # the state of a run killed between writing step 3 and deleting step 1: step 1 is back
    torch.save(torch.load(out / "checkpoints" / "step-000002.ckpt", weights_only=False),
               out / "checkpoints" / "step-000001.ckpt")
    (out / "checkpoints" / "finished.json").unlink(missing_ok=True)
    config["trainer"]["max_steps"] = 4
    _fit(tmp_path, config)
    assert _ckpts(out) == ["step-000003.ckpt", "step-000004.ckpt"]


# -- the end of a run --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_finished_run_rerun_changes_nothing_and_raised_limits_continue(assets, tmp_path, monkeypatch, lightning_log):
    """10 rows, batch 2, save_steps 2: the final step 5 is checkpointed; rerunning says finished and touches no file
    (no training, no export, no push); with ``max_epochs`` raised it trains steps 6..10."""
    import lit_sft.export

    pushed = []
    monkeypatch.setattr(lit_sft.export, "push_folder", lambda *args, **kwargs: pushed.append(args[0]))
    out = tmp_path / "run"
    config = _config(assets, out, **{"run.push_to_hub": True, "run.hub_model_id": "me/tiny",
                                     "run.hub_strategy": "end"})
    _fit(tmp_path, config)
    assert _ckpts(out) == ["step-000002.ckpt", "step-000004.ckpt", "step-000005.ckpt"] and len(pushed) == 1
    before = _digests(out)
    mtime = (out / "model.safetensors").stat().st_mtime_ns

    cli = _fit(tmp_path, config)
    assert _digests(out) == before and (out / "model.safetensors").stat().st_mtime_ns == mtime
    assert len(pushed) == 1 and cli.trainer.global_step == 0  # trainer.fit never ran
    assert any("This run has finished" in line and "step 5" in line for line in lightning_log)

    config["trainer"]["max_epochs"] = 2
    cli = _fit(tmp_path, config)
    assert cli.trainer.global_step == 10 and len(pushed) == 2
    logged = read_metrics_csv(str(out / "logs" / "metrics.csv"))
    assert sorted(logged) == list(range(1, 11))
    assert "step-000010.ckpt" in _ckpts(out)
    # steps 6..10 follow the stretched 10-step schedule from its step 6 on (transformers' scheduler as reference;
    # step 6 used to keep the 5-step schedule's last rate)
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    scheduler = get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=1, num_training_steps=10,
                              scheduler_specific_kwargs={"min_lr_rate": 0.1})
    reference = []
    for _ in range(10):
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for step in range(6, 11):
        assert logged[step]["train/learning_rate"] == pytest.approx(reference[step - 1], rel=1e-12), step


def test_refused_resume_is_one_line_and_keeps_the_runs_config(assets, tmp_path, capsys):
    """A rerun whose model no longer fits the checkpoint (``num_hidden_layers`` 1 -> 2) stops before training with
    one ``error:`` line naming the mismatch, and leaves ``logs/config.yaml`` as the run that trained wrote it (the
    recovery command ``lit_sft export --config <run>/logs/config.yaml`` reads it)."""
    from lit_sft.cli import main

    out = tmp_path / "run"
    _fit(tmp_path, _config(assets, out))
    saved = (out / "logs" / "config.yaml").read_bytes()
    assert b"num_hidden_layers" not in saved
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(_config(assets, out, **{"trainer.max_epochs": 2,
                                                           "model.model_config": {"num_hidden_layers": 2}})))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"^error: the checkpoint's weights do not fit the model as configured \(.*layers\.1\.", err,
                     re.M), err[-2000:]
    assert "Traceback" not in err
    assert (out / "logs" / "config.yaml").read_bytes() == saved


def test_export_failure_keeps_the_final_checkpoint_and_the_rerun_only_exports(assets, tmp_path, monkeypatch,
                                                                               lightning_log):
    """The export fails after the last step (max_steps 3, save_steps 2): the final state is in ``step-3``; the rerun
    exports from it without training (Lightning skips a loop with nothing left, and its ``on_train_end`` with it)."""
    import transformers.modeling_utils

    out = tmp_path / "run"
    config = _config(assets, out, **{"trainer.max_steps": 3, "trainer.max_epochs": -1})
    original = transformers.modeling_utils.safe_save_file

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    with pytest.raises(RuntimeError, match="No space left"):  # raised once training hooks are done, with the redo
        _fit(tmp_path, config)
    assert _ckpts(out) == ["step-000002.ckpt", "step-000003.ckpt"]
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints" / "finished.json").exists()
    losses = {step: row["train/loss"] for step, row in read_metrics_csv(str(out / "logs" / "metrics.csv")).items()}

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", original)
    _fit(tmp_path, config)
    assert any("Training is complete at optimizer step 3" in line for line in lightning_log)
    after = {step: row["train/loss"] for step, row in read_metrics_csv(str(out / "logs" / "metrics.csv")).items()}
    assert after == losses and sorted(after) == [1, 2, 3]  # nothing trained again
    from safetensors.torch import load_file

    state = torch.load(out / "checkpoints" / "step-000003.ckpt", weights_only=False)["state_dict"]
    exported = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(exported[k], state["model." + k]) for k in exported)
    assert json.loads((out / "checkpoints" / "finished.json").read_text())["global_step"] == 3
    lightning_log.clear()
    _fit(tmp_path, config)
    assert any("This run has finished" in line for line in lightning_log)


@pytest.mark.parametrize("key", ["trainer.max_steps", "trainer.max_epochs"])
def test_zero_steps_or_epochs_is_an_error(assets, tmp_path, key):
    with pytest.raises(ValueError, match=rf"{key}=0 would train nothing"):
        _fit(tmp_path, _config(assets, tmp_path / "run", **{key: 0}))
    assert not (tmp_path / "run" / "model.safetensors").exists()


# -- what the user types wins over the checkpoint ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("how", ["ckpt_path", "resume_from_checkpoint", "auto"])
def test_command_line_wins_over_checkpoint_hyper_parameters(assets, tmp_path, how, recwarn):
    """Train 2 steps (save_steps 1), then resume for a 3rd with other ``max_grad_norm``, ``gradient_checkpointing``,
    ``learning_rate`` and ``weight_decay``: all are used (the learning rate of step 3 is the new peak times
    transformers' own schedule factor), and a warning names each key that differs."""
    from transformers import get_scheduler

    out = tmp_path / "run"
    config = _config(assets, out, **{"run.save_steps": 1, "trainer.max_steps": 2, "trainer.max_epochs": -1,
                                     "model.lr_scheduler_type": "linear", "model.warmup_ratio": 0.0})
    _fit(tmp_path, config)
    ckpt = str(out / "checkpoints" / "step-000002.ckpt")
    args = ["--trainer.max_steps", "3", "--model.max_grad_norm", "0.25", "--model.gradient_checkpointing", "true",
            "--model.learning_rate", "0.003", "--model.weight_decay", "0.1"]
    args += {"ckpt_path": ["--ckpt_path", ckpt], "resume_from_checkpoint": ["--run.resume_from_checkpoint", ckpt],
             "auto": []}[how]
    cli = _fit(tmp_path, config, *args)
    module = cli.model
    assert cli.trainer.global_step == 3
    assert module.max_grad_norm == 0.25 and module.model.is_gradient_checkpointing
    groups = module.optimizers().param_groups
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    # reference: transformers' linear schedule for 3 steps, at step index 2, times the new peak
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.003)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=3)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    logged = read_metrics_csv(str(out / "logs" / "metrics.csv"))
    assert logged[3]["train/learning_rate"] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12, abs=0)
    messages = " ".join(str(w.message) for w in recwarn)
    for key in ("model.max_grad_norm=0.25", "model.gradient_checkpointing=True", "model.learning_rate=0.003"):
        assert key in messages, messages


# -- non-finite guard --------------------------------------------------------------------------------------------------
def test_divergent_learning_rate_stops_with_the_step_and_exports_nothing(assets, tmp_path):
    """``learning_rate 1e30``: the loss turns NaN within a few steps; the run stops with an error naming that step,
    every checkpoint left holds finite weights, no model is exported."""
    out = tmp_path / "run"
    config = _config(assets, out, **{"model.learning_rate": 1e30, "run.save_steps": 1, "trainer.max_epochs": 2})
    with pytest.raises(FloatingPointError, match=r"optimizer step (\d+): NaN/inf in training loss") as error:
        _fit(tmp_path, config)
    step = int(error.value.args[0].split("optimizer step ")[1].split(":")[0])
    print(f"\nlearning_rate 1e30: stopped at optimizer step {step}: {error.value}")
    assert 1 < step < 10
    assert not (out / "model.safetensors").exists() and not (out / "README.md").exists()
    kept = _ckpts(out)
    assert kept and all(int(n[5:11]) < step for n in kept)
    for name in kept:
        state = torch.load(out / "checkpoints" / name, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), name
    logged = read_metrics_csv(str(out / "logs" / "metrics.csv"))
    assert not math.isfinite(logged[step]["train/loss"])  # the logs show the step that failed


class InjectNaN(L.Callback):
    """Makes one parameter's gradient NaN in every micro-batch of the optimizer steps ``steps``, and records the
    weights before and after each of them (test helper)."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = steps
        self.before: dict = {}
        self.after: dict = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        step = trainer.global_step + 1
        if step in self.steps and step not in self.before:
            self.before[step] = {k: v.detach().clone() for k, v in module.model.state_dict().items()}

    def on_after_backward(self, trainer, module):
        if trainer.global_step + 1 in self.steps:
            next(module.model.parameters()).grad[0, 0] = float("nan")

    def on_train_batch_end(self, trainer, module, *args):
        step = trainer.global_step
        if step in self.steps and step not in self.after:
            self.after[step] = {k: v.detach().clone() for k, v in module.model.state_dict().items()}


@pytest.mark.slow
def test_cli_reports_the_nonfinite_stop_in_one_line(assets, tmp_path, capsys):
    """The console script ends a run stopped by the guard with ``error: optimizer step N: ...`` and exit status 1,
    not a traceback; with no checkpoint written yet, the message does not claim one."""
    from lit_sft.cli import main

    out = tmp_path / "run"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_config(assets, out, **{"model.learning_rate": 1e30, "run.save_steps": 100,
                                                           "trainer.max_epochs": 2})))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert re.search(r"^error: optimizer step \d+: NaN/inf in training loss", err, re.M), err[-2000:]
    assert "Traceback" not in err and "last checkpoint holds" not in err
    assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()


def test_injected_nan_gradient_stops_or_is_skipped(assets, tmp_path):
    """A NaN gradient at step 3: by default the run stops naming step 3 and keeps checkpoint 2; with
    ``max_nonfinite_steps 2`` and NaNs at steps 3 and 5 (the last) both are skipped (the weights after each equal
    those before it), the other steps train, and the model card reports the last finite loss, not NaN."""
    out = tmp_path / "strict"
    config = _config(assets, out, **{"trainer.callbacks": [{"class_path": "test_checkpoint.InjectNaN",
                                                             "init_args": {"steps": [3]}}]})
    with pytest.raises(FloatingPointError, match=r"optimizer step 3: NaN/inf in training loss .*gradient norm nan; the "
                                             r"weights were not updated"):
        _fit(tmp_path, config)
    assert _ckpts(out) == ["step-000002.ckpt"] and not (out / "model.safetensors").exists()

    out = tmp_path / "tolerant"
    config = _config(assets, out, **{"trainer.callbacks": [{"class_path": "test_checkpoint.InjectNaN",
                                                             "init_args": {"steps": [3, 5]}}],
                                     "model.max_nonfinite_steps": 2})
    cli = _fit(tmp_path, config)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, InjectNaN))
    assert cli.trainer.global_step == 5 and sorted(callback.after) == [3, 5]
    for step in (3, 5):
        assert all(torch.equal(callback.before[step][k], callback.after[step][k]) for k in callback.before[step])
    logged = read_metrics_csv(str(out / "logs" / "metrics.csv"))
    assert math.isnan(logged[3]["train/grad_norm"]) and math.isnan(logged[5]["train/grad_norm"])
    assert math.isfinite(logged[4]["train/grad_norm"])
    card_loss = (out / "README.md").read_text().split("final training loss")[1].splitlines()[0]
    assert f"{logged[4]['train/loss']:.4f}" in card_loss, card_loss


@pytest.mark.slow
def test_deepspeed_zero3_skips_nan_steps_and_the_guard_stops(assets, tmp_path):
    """ZeRO-3, 2 processes: NaN losses at steps 2 and 4 with ``max_nonfinite_steps 1``. DeepSpeed itself skips a step
    whose gradient norm is not finite (its ``skipped_steps``; the engine reports the norm as inf): step 2 leaves the
    weights unchanged and is tolerated, step 4 stops the run naming it; checkpoints 1-3 stay, nothing is exported."""
    from sft_harness import run_script

    run_script("tests/scripts/nan_deepspeed.py", "--model-dir", assets["model"], "--data", assets["data"],
               "--out", str(tmp_path), "--nan-steps", "2", "4", "--tolerate", "1")
    report = json.loads((tmp_path / "report.json").read_text())
    print(f"\nZeRO-3 x2, NaN at steps 2 and 4: {report}")
    assert report["error"].startswith("optimizer step 4: NaN/inf in training loss nan, gradient norm inf; the "
                                      "weights were not updated"), report["error"]
    assert report["skipped_steps"] == 2 and report["global_step"] == 4  # step 4 counted, not applied
    assert report["changed"] == {"1": True, "2": False, "3": True}
    assert math.isinf(report["grad_norm"]["2"]) and math.isfinite(report["grad_norm"]["3"])
    assert report["checkpoints"] == ["step-000001.ckpt", "step-000002.ckpt", "step-000003.ckpt"]
    assert not report["exported"]


def test_nonfinite_weights_are_never_exported_nor_checkpointed(assets, tmp_path):
    """Whatever produced them, parameters holding inf are refused by the export and by a checkpoint save
    (``lit_sft.guard.NonFiniteError``, a ``FloatingPointError``)."""
    class PoisonAtEnd(L.Callback):
        def on_train_end(self, trainer, module):
            with torch.no_grad():
                next(module.model.parameters())[0, 0] = float("inf")

    from lit_sft.export import HFExport

    module_trainer = _fit(tmp_path, _config(assets, tmp_path / "run", **{"trainer.max_steps": 1,
                                                                          "trainer.max_epochs": -1}))
    module, trainer = module_trainer.model, module_trainer.trainer
    PoisonAtEnd().on_train_end(trainer, module)
    with pytest.raises(FloatingPointError, match="refusing to export"):
        HFExport(str(tmp_path / "export")).export(trainer, module)
    assert not (tmp_path / "export" / "model.safetensors").exists()
    checkpoint = trainer.checkpoint_callback
    with pytest.raises(FloatingPointError, match="refusing to write the checkpoint"):
        checkpoint._save_checkpoint(trainer, str(tmp_path / "run" / "checkpoints" / "step-000009.ckpt"))
    assert not (tmp_path / "run" / "checkpoints" / "step-000009.ckpt").exists()


# -- file modes -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_exported_files_follow_the_umask(assets, tmp_path, umask):
    """``model.safetensors`` gets the mode of every other exported file (safetensors writes it through a 0600
    temporary file)."""
    from transformers import AutoModelForCausalLM

    from lit_sft.data.loading import load_tokenizer
    from lit_sft.export import save_hf_folder

    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    old = os.umask(umask)
    try:
        save_hf_folder(str(tmp_path / "export"), model, model.state_dict(), load_tokenizer(QWEN_TOKENIZER), "card")
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE(os.stat(tmp_path / "export" / name).st_mode)
             for name in os.listdir(tmp_path / "export")}
    assert set(modes.values()) == {0o666 & ~umask}, {k: oct(v) for k, v in modes.items()}


def test_checkpoint_files_follow_the_umask_and_never_touch_tmpdir(tmp_path, monkeypatch):
    """The atomic checkpoint write: mode ``0666 & ~umask``, nothing written to ``TMPDIR``, and a failed write
    (ENOSPC halfway) leaves neither the checkpoint nor its temporary file."""
    import tempfile

    from lit_sft.checkpoint_io import AtomicCheckpointIO

    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "step-000001.ckpt"
    old = os.umask(0o002)
    try:
        io.save_checkpoint({"w": torch.ones(1000)}, str(path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664
    assert torch.equal(torch.load(path)["w"], torch.ones(1000))

    real_save = torch.save

    def half_then_enospc(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_enospc)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"w": torch.zeros(1000)}, str(tmp_path / "ckpts" / "step-000002.ckpt"))
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path / "ckpts")) == ["step-000001.ckpt"] and not os.listdir(tmpdir)
