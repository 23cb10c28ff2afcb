"""``lit_sft validate`` (``lit_sft/validate.py``): the evaluation loss and token accuracy of an exported folder or a
checkpoint on ``data.dataset_test_split`` equal a plain transformers computation (fp32, CPU).

Reference: each test row (its tokens and labels as the data module tokenizes them) through
``AutoModelForCausalLM`` one at a time, no padding: summed cross-entropy of the shifted labels over all rows divided
by their supervised tokens, and the share of those tokens whose argmax is the label. Rows of different lengths in
batches of 2 (padding) and, in the slow test, 2 gloo processes (rank 1 gets a filler batch) must not change it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from sft_helpers import QWEN_TOKENIZER, chat_rows, save_tiny_model, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("validate")
    os.makedirs(tmp / "data")
    write_jsonl(str(tmp / "data" / "train.jsonl"), chat_rows(4, seed=1))
    write_jsonl(str(tmp / "data" / "test.jsonl"), chat_rows(5, seed=7))
    folder = save_tiny_model(str(tmp / "exported"), seed=0)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    other = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = str(tmp / "step-000007.ckpt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.state_dict().items()}, "global_step": 7}, ckpt)
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "enable_progress_bar": False,
                    "enable_model_summary": False},
        "model": {"model_name_or_path": folder, "torch_dtype": "float32", "attn_implementation": "sdpa",
                  "gradient_checkpointing": False},
        "data": {"dataset_name": str(tmp / "data"), "tokenizer_name_or_path": QWEN_TOKENIZER, "max_length": 128,
                 "per_device_eval_batch_size": 2, "num_workers": 0},
        "run": {"output_dir": str(tmp / "run")},
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    return {"tmp": tmp, "folder": folder, "ckpt": ckpt, "config": str(tmp / "config.yaml"), "data": config["data"]}


def _reference(model, data_kwargs: dict) -> dict[str, float]:
    from lit_sft import SFTDataModule

    data = SFTDataModule(**{**data_kwargs, "do_eval": True})
    data.setup("validate")
    assert data.train_rows is None  # validate reads the test split only
    loss_sum, tokens, correct = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for row in data.eval_rows:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
            logits = model(input_ids=ids).logits[0, :-1].double()
            target = labels[1:]
            mask = target != -100
            loss_sum += torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            tokens += int(mask.sum())
            correct += int((logits.argmax(-1)[mask] == target[mask]).sum())
    return {"eval/loss": loss_sum / tokens, "eval/mean_token_accuracy": correct / tokens, "eval/loss_tokens": tokens}


def _validate(*args: str) -> dict[str, float]:
    from lit_sft import SFTDataModule, SFTModule
    from lit_sft.cli import SFTCLI

    cli = SFTCLI(SFTModule, SFTDataModule, args=["validate", *args], auto_configure_optimizers=False)
    return cli.model.validation_results


def _check(got: dict[str, float], expected: dict[str, float]) -> None:
    print(f"\nlit_sft validate {got}\nreference        {expected}")
    assert got["eval/loss_tokens"] == expected["eval/loss_tokens"]
    assert got["eval/loss"] == pytest.approx(expected["eval/loss"], rel=1e-5)
    assert got["eval/mean_token_accuracy"] == pytest.approx(expected["eval/mean_token_accuracy"], abs=1e-9)


def test_exported_folder_matches_plain_transformers(setup, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    expected = _reference(AutoModelForCausalLM.from_pretrained(setup["folder"], dtype=torch.float32), setup["data"])
    _check(_validate("--config", setup["config"], "--model.model_name_or_path", setup["folder"]), expected)
    assert os.listdir(tmp_path) == [] and not os.path.exists(setup["tmp"] / "run")  # nothing written


def test_checkpoint_matches_plain_transformers(setup):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(setup["folder"], dtype=torch.float32)
    state = torch.load(setup["ckpt"], weights_only=False)["state_dict"]
    model.load_state_dict({k[len("model."):]: v for k, v in state.items()})
    expected = _reference(model, setup["data"])
    got = _validate("--config", setup["config"], "--ckpt_path", setup["ckpt"])
    _check(got, expected)
    folder = _reference(AutoModelForCausalLM.from_pretrained(setup["folder"], dtype=torch.float32), setup["data"])
    assert abs(got["eval/loss"] - folder["eval/loss"]) > 1e-3  # the checkpoint's weights, not the config's base model


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_two_processes_give_the_same_numbers(setup, strategy):
    """``lit_sft validate --trainer.devices 2`` (gloo): 5 rows over 2 ranks, the token mean over all of them; with
    DDP, and with DeepSpeed ZeRO-3 with partitioned parameters (the checkpoint's weights go into the shards)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(setup["folder"], dtype=torch.float32)
    state = torch.load(setup["ckpt"], weights_only=False)["state_dict"]
    model.load_state_dict({k[len("model."):]: v for k, v in state.items()})
    expected = _reference(model, setup["data"])
    tests = os.path.join(ROOT, "tests")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, tests, os.environ.get("PYTHONPATH", "")])}
    flags = (["--trainer.strategy", "ddp"] if strategy == "ddp" else
             ["--trainer.strategy", "cpu_deepspeed.CPUDeepSpeedStrategy", "--trainer.strategy.zero_stage", "3",
              "--trainer.strategy.zero3_partition_parameters", "true"])
    done = subprocess.run([sys.executable, "-m", "lit_sft.cli", "validate", "--config", setup["config"], "--ckpt_path",
                           setup["ckpt"], "--trainer.devices", "2", *flags],
                          cwd=str(setup["tmp"]), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if strategy == "zero3":
        assert "parameters, gradients and optimizer states partitioned" in done.stderr
    found = re.search(r"eval/loss (\S+), eval/mean_token_accuracy (\S+) over (\d+) supervised tokens", done.stderr)
    assert found, done.stderr[-3000:]
    _check({"eval/loss": float(found.group(1)), "eval/mean_token_accuracy": float(found.group(2)),
            "eval/loss_tokens": float(found.group(3))}, expected)
