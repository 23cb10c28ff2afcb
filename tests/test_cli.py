"""``lit_sft fit``: the shipped configs parse and print whole, unknown keys are errors, command-line overrides win,
and the tiny config trains end to end (loss falls, the exported folder reloads into the trained weights)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT
from sft_helpers import logits_of, read_metrics_csv


def _print_config(capsys, *args: str) -> dict:
    from lit_sft.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _cli_error(capsys, *args: str) -> str:
    from lit_sft.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code not in (0, None)
    return capsys.readouterr().err


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name data files relative to the repository root


@pytest.mark.parametrize("config", ["configs/qwen_zero3.yaml", "configs/tiny_cpu.yaml"])
def test_print_config_is_whole_and_runnable(capsys, tmp_path, config):
    printed = _print_config(capsys, "--config", config)
    with open(config) as f:
        source = yaml.safe_load(f)
    # Every key of the file comes out with its value (flattened, since class_path/init_args expand).
    for section in ("model", "data"):
        for key, value in source[section].items():
            assert printed[section][key] == value, f"{section}.{key}"
    for key, value in source["run"].items():
        assert printed["run"][key] == value, f"run.{key}"
    assert printed["trainer"]["max_epochs"] == source["trainer"]["max_epochs"]
    assert printed["trainer"]["use_distributed_sampler"] is False
    # ... plus every default, so the printed file alone reproduces the run.
    assert {"learning_rate", "warmup_ratio", "max_grad_norm", "adam_beta2"} <= set(printed["model"])
    assert {"shuffle", "seed", "truncation", "assistant_only_loss"} <= set(printed["data"])
    if "qwen_zero3" in config:
        assert printed["trainer"]["strategy"]["class_path"] == "lit_sft.SFTDeepSpeedStrategy"
        assert printed["trainer"]["strategy"]["init_args"]["zero_stage"] == 3
        assert printed["data"]["tokenizer_name_or_path"] in (None, "Qwen/Qwen2.5-1.5B-Instruct")
    saved = tmp_path / "printed.yaml"
    saved.write_text(yaml.safe_dump(printed))
    assert _print_config(capsys, "--config", str(saved)) == printed


@pytest.mark.parametrize("bad", [["--model.learnig_rate", "1e-3"], ["--data.per_device_batch_size", "4"],
                                 ["--run.save_stpes", "5"]], ids=["model", "data", "run"])
def test_misspelled_key_on_command_line_is_an_error(capsys, bad):
    err = _cli_error(capsys, "--config", "configs/tiny_cpu.yaml", *bad, "--print_config")
    assert bad[0].split(".")[-1] in err


def test_misspelled_key_in_config_file_is_an_error(capsys, tmp_path):
    with open("configs/tiny_cpu.yaml") as f:
        config = yaml.safe_load(f)
    config["model"]["learnig_rate"] = config["model"].pop("learning_rate")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    assert "learnig_rate" in _cli_error(capsys, "--config", str(bad), "--print_config")


def test_wrong_type_is_an_error(capsys):
    err = _cli_error(capsys, "--config", "configs/tiny_cpu.yaml", "--data.per_device_train_batch_size", "four",
                     "--print_config")
    assert "per_device_train_batch_size" in err


def test_command_line_overrides_config(capsys, tmp_path):
    printed = _print_config(capsys, "--config", "configs/tiny_cpu.yaml", "--model.learning_rate", "1e-4",
                            "--data.per_device_train_batch_size", "4", "--trainer.max_epochs", "3",
                            "--run.output_dir", str(tmp_path), "--model.lr_scheduler_kwargs", "{min_lr_rate: 0.2}")
    assert printed["model"]["learning_rate"] == 1e-4
    assert printed["data"]["per_device_train_batch_size"] == 4
    assert printed["trainer"]["max_epochs"] == 3
    assert printed["run"]["output_dir"] == str(tmp_path)
    assert printed["model"]["lr_scheduler_kwargs"] == {"min_lr_rate": 0.2}
    assert printed["model"]["model_config"]["hidden_size"] == 64  # untouched keys stay


def test_tiny_config_end_to_end(tmp_path):
    """The embedded default on 64 rows for one epoch (4 optimizer steps): the loss falls, the final checkpoint and
    the exported Hugging Face folder hold the same weights, and the folder reloads with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_sft.cli import main

    out = tmp_path / "run"
    main(["fit", "--config", "configs/tiny_cpu.yaml", "--data.max_train_samples", "64", "--trainer.max_epochs", "1",
          "--data.per_device_train_batch_size", "8",
          "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false", "--run.save_steps", "4",
          "--run.output_dir", str(out)])

    metrics = read_metrics_csv(str(out / "logs" / "metrics.csv"))
    losses = [metrics[step]["train/loss"] for step in sorted(metrics) if "train/loss" in metrics[step]]
    print(f"\ntiny config, 4 steps: train/loss {[round(x, 4) for x in losses]}")
    assert sorted(metrics) == [1, 2, 3, 4]
    assert losses[-1] < losses[0] - 0.05

    # The exported folder against the final checkpoint's weights, through the logits.
    checkpoint = torch.load(out / "checkpoints" / "step-000004.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4
    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    trained = AutoModelForCausalLM.from_config(exported.config, dtype=torch.float32)
    state = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    trained.load_state_dict(state)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 * 6?"},
                                         {"role": "assistant", "content": "7 * 6 = 42."}],
                                        tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    diff = (logits_of(exported, ids) - logits_of(trained, ids)).abs().max().item()
    print(f"max |logits(export) - logits(final checkpoint)| = {diff:.3g}")
    assert diff <= 1e-5
    assert os.path.isfile(out / "README.md")
    assert os.path.isfile(out / "logs" / "config.yaml")  # LightningCLI's record of the resolved config

    # The model card holds the loss curve and the preprocessing report (issue 12; tests/test_loss_curve.py).
    card = (out / "README.md").read_text()
    assert "![Training loss per optimizer step, evaluation loss and learning rate](loss.png)" in card
    with open(out / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "## Preprocessing report" in card
    assert "64 rows, 64 kept, 0 dropped (max_length=512, format messages)." in card


def _write(path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("base", ["configs/qwen_zero3.yaml", "configs/tiny_cpu.yaml"])
def test_config_overlays_merge_dict_keys(capsys, tmp_path, base):
    """A second and a third ``--config`` update dict-valued keys key by key (as dotted flags do) instead of replacing
    them: model_config, lr_scheduler_kwargs, gradient_checkpointing_kwargs, data_files and a strategy's dicts."""
    with open(base) as f:
        source = yaml.safe_load(f)
    a = _write(tmp_path / "a.yaml", {
        "model": {"model_config": {"num_hidden_layers": 4, "max_position_embeddings": 4096},
                  "lr_scheduler_kwargs": {"num_cycles": 0.5}, "gradient_checkpointing_kwargs": {"use_reentrant": True}},
        "data": {"data_files": {"train": "a.jsonl", "test": "t.jsonl"}}})
    b = _write(tmp_path / "b.yaml", {"model": {"model_config": {"num_hidden_layers": 2}},
                                     "data": {"data_files": {"train": "b.jsonl"}}})
    base_model_config = source["model"].get("model_config") or {}
    base_kwargs = source["model"]["lr_scheduler_kwargs"]

    two = _print_config(capsys, "--config", base, "--config", a)
    assert two["model"]["model_config"] == {**base_model_config, "num_hidden_layers": 4,
                                            "max_position_embeddings": 4096}
    assert two["model"]["lr_scheduler_kwargs"] == {**base_kwargs, "num_cycles": 0.5}

    three = _print_config(capsys, "--config", base, "--config", a, "--config", b)
    expected = {**base_model_config, "num_hidden_layers": 2, "max_position_embeddings": 4096}
    assert three["model"]["model_config"] == expected
    assert three["model"]["lr_scheduler_kwargs"] == {**base_kwargs, "num_cycles": 0.5}
    assert three["model"]["gradient_checkpointing_kwargs"] == {
        **(source["model"].get("gradient_checkpointing_kwargs") or {}), "use_reentrant": True}
    assert three["data"]["data_files"] == {"train": "b.jsonl", "test": "t.jsonl"}
    if "model_type" in base_model_config:  # tiny_cpu: the model is still buildable from the merged config
        from lit_sft.modeling import load_config

        assert load_config(None, None, three["model"]["model_config"]).num_hidden_layers == 2

    # Overlay + dotted flag: the same merge, and the later source wins for the key they share.
    flagged = _print_config(capsys, "--config", base, "--config", a, "--model.model_config.num_hidden_layers", "3",
                            "--model.lr_scheduler_kwargs.min_lr_rate", "0.2")
    assert flagged["model"]["model_config"] == {**expected, "num_hidden_layers": 3}
    assert flagged["model"]["lr_scheduler_kwargs"] == {**base_kwargs, "num_cycles": 0.5, "min_lr_rate": 0.2}
    flag_first = _print_config(capsys, "--config", base, "--model.model_config.hidden_size", "32", "--config", b)
    assert flag_first["model"]["model_config"] == {**base_model_config, "hidden_size": 32, "num_hidden_layers": 2}

    # null clears a dict; a later file then sets it afresh.
    cleared = _write(tmp_path / "clear.yaml", {"data": {"data_files": None}})
    fresh = _write(tmp_path / "fresh.yaml", {"data": {"data_files": {"train": "c.jsonl"}}})
    assert _print_config(capsys, "--config", base, "--config", a, "--config", cleared, "--config", fresh)[
        "data"]["data_files"] == {"train": "c.jsonl"}


def test_config_overlay_merges_strategy_init_args(capsys, tmp_path):
    """A strategy overlay that names only some ``init_args`` keeps the others (jsonargparse's own merge)."""
    overlay = _write(tmp_path / "offload.yaml", {"trainer": {"strategy": {"init_args": {
        "offload_optimizer_device": "cpu"}}}})
    printed = _print_config(capsys, "--config", "configs/qwen_zero3.yaml", "--config", overlay)
    init_args = printed["trainer"]["strategy"]["init_args"]
    assert printed["trainer"]["strategy"]["class_path"] == "lit_sft.SFTDeepSpeedStrategy"
    assert init_args["offload_optimizer_device"] == "cpu"
    assert init_args["zero_stage"] == 3 and init_args["zero3_init_flag"] is True


def _lit_sft(*args: str) -> subprocess.CompletedProcess:
    """``lit_sft ARGS`` in a fresh process (this checkout's package first on the path), from the repository root."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "lit_sft.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/qwen_zero3.yaml", "configs/tiny_cpu.yaml"])
def test_print_config_stdout_runs_as_printed(tmp_path, config):
    """``lit_sft fit --config X --print_config > run.yaml && lit_sft fit --config run.yaml``: stdout is the YAML
    alone (DeepSpeed's import-time log line goes to stderr), and the file runs: the tiny config trains a step from
    it (with an overlay, so the merged model_config is what runs); the 8-GPU recipe is parsed back (no GPU here)."""
    overlay = _write(tmp_path / "overlay.yaml", {"model": {"model_config": {"num_hidden_layers": 1}}})
    extra = ["--config", overlay, "--data.max_train_samples", "16", "--trainer.max_steps", "1",
             "--run.output_dir", str(tmp_path / "run")] if "tiny" in config else []
    printed = _lit_sft("fit", "--config", config, *extra, "--print_config")
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert printed.stdout.startswith("# lightning.pytorch=="), printed.stdout[:300]
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(printed.stdout)
    config_dict = yaml.safe_load(printed.stdout)
    if "tiny" not in config:
        again = _lit_sft("fit", "--config", str(run_yaml), "--print_config")
        assert again.returncode == 0, again.stderr[-3000:]
        assert yaml.safe_load(again.stdout) == config_dict
        return
    assert config_dict["model"]["model_config"]["num_hidden_layers"] == 1
    trained = _lit_sft("fit", "--config", str(run_yaml), "--trainer.enable_progress_bar", "false")
    assert trained.returncode == 0, trained.stderr[-3000:]
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(tmp_path / "run")).num_hidden_layers == 1
