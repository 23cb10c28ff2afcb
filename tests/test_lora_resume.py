"""A LoRA run resumes exactly from a checkpoint that holds only what trains.

Through the CLI (``lit_sft fit``), 10 chat rows, 2 rows x 2 micro-batches per optimizer step, 2 epochs = 6 steps, a
cosine schedule with warmup, ``save_steps: 2``: run A is never interrupted; run B is killed right after its step-4
checkpoint and the same command is started again, which resumes from ``output_dir/checkpoints/step-000004.ckpt``
by itself (the base rebuilt from ``model_name_or_path``, the adapter and its AdamW moments from the checkpoint). The
logged losses, learning rates and gradient norms of steps 5..6 and the exported adapter weights are bit for bit run
A's. The checkpoint holds the adapter weights and their optimizer state only: no base weight, and it is a small
fraction of a full fine-tuning checkpoint of the same model (measured). Resuming with another ``model.peft``, or
a full-weight checkpoint with ``model.peft``, stops with an error that says so.
"""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lit_sft.metrics import NUM_TOKENS
from sft_helpers import QWEN_TOKENIZER, Killed, chat_rows, read_metrics_csv, save_tiny_model, write_jsonl

pytestmark = pytest.mark.slow  # three CLI runs (about 35 s on 2 cores)

PEFT = {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
N = 6


def _config(tmp_path, paths, out, peft=PEFT, kill=None):
    config = {
        "seed_everything": 0,
        "run": {"output_dir": str(out), "save_steps": 2, "save_total_limit": 2, "report_to": ["csv"],
                "merge_adapter": True},
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_epochs": 2,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"model_name_or_path": paths["model"], "torch_dtype": "float32", "attn_implementation": "sdpa",
                  "gradient_checkpointing": False, "learning_rate": 5e-2, "warmup_ratio": 0.2, "peft": peft},
        "data": {"dataset_name": paths["data"], "tokenizer_name_or_path": QWEN_TOKENIZER, "max_length": 128,
                 "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "num_workers": 0},
    }
    if kill is not None:
        config["trainer"]["callbacks"] = [{"class_path": "sft_helpers.KillAfterStep", "init_args": {"step": kill}}]
    name = tmp_path / f"config_{os.path.basename(str(out))}{'_kill' if kill else ''}.yaml"
    name.write_text(yaml.safe_dump(config))
    return str(name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from lit_sft.cli import main

    tmp = tmp_path_factory.mktemp("lora_resume")
    paths = {"data": write_jsonl(str(tmp / "rows.jsonl"), chat_rows(10, seed=5)),
             "model": save_tiny_model(str(tmp / "init"), seed=0)}
    main(["fit", "--config", _config(tmp, paths, tmp / "a")])
    with pytest.raises(Killed):
        main(["fit", "--config", _config(tmp, paths, tmp / "b", kill=4)])
    killed = {name: os.path.getsize(tmp / "b" / "checkpoints" / name)
              for name in os.listdir(tmp / "b" / "checkpoints")}
    checkpoint = torch.load(tmp / "b" / "checkpoints" / "step-000004.ckpt", map_location="cpu", weights_only=False)
    main(["fit", "--config", _config(tmp, paths, tmp / "b")])
    return dict(tmp=tmp, paths=paths, killed=killed, checkpoint=checkpoint)


def test_resumed_run_is_bit_identical(runs):
    tmp = runs["tmp"]
    a, b = (read_metrics_csv(str(tmp / r / "logs" / "metrics.csv")) for r in ("a", "b"))
    assert sorted(a) == sorted(b) == list(range(1, N + 1))
    for step in range(1, N + 1):
        for key in ("train/loss", "train/learning_rate", "train/grad_norm", NUM_TOKENS):
            assert b[step][key] == a[step][key], (step, key)
    assert a[N]["train/loss"] < a[1]["train/loss"]  # it trains
    for name in ("adapter_model.safetensors", "merged/model.safetensors"):  # run.merge_adapter: true
        wa, wb = (load_file(str(tmp / r / name)) for r in ("a", "b"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    print(f"\nresumed at step 4: steps 5..{N} losses {[b[s]['train/loss'] for s in (5, 6)]} equal run A's bit for bit")


def test_checkpoint_holds_only_what_trains(runs, tmp_path):
    """``state_dict`` holds the adapter weights only, the optimizer state their moments only; measured against a full
    fine-tuning checkpoint of the same model and data."""
    from sft_helpers import cpu_trainer, sft_data, sft_module

    checkpoint = runs["checkpoint"]
    state = checkpoint["state_dict"]
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state), sorted(state)[:3]
    assert checkpoint["lit_sft_adapter"]["trainable"] == {k: list(v.shape) for k, v in state.items()}
    moments = checkpoint["optimizer_states"][0]["state"]
    assert len(moments) == len(state)
    assert sorted(m["exp_avg"].numel() for m in moments.values()) == sorted(v.numel() for v in state.values())

    trainer = cpu_trainer(str(tmp_path), max_steps=1)
    trainer.fit(sft_module(runs["paths"]["model"]), sft_data(runs["paths"]["data"]))
    trainer.save_checkpoint(str(tmp_path / "full.ckpt"))
    full = os.path.getsize(tmp_path / "full.ckpt")
    lora = runs["killed"]["step-000004.ckpt"]
    print(f"\ncheckpoint bytes: LoRA {lora:,} vs full fine-tuning {full:,} ({lora / full:.2%})")
    assert lora < 0.05 * full


def test_resume_with_another_adapter_is_refused(runs, tmp_path, monkeypatch):
    from lit_sft.cli import main

    monkeypatch.setenv("JSONARGPARSE_DEBUG", "true")  # the exception itself (the CLI prints it as one error line)
    for change, match in (({"r": 2}, r"\[4, 64\], \[2, 64\]"), ({"lora_alpha": 16}, r"'lora_alpha': \(8, 16\)")):
        other = _config(tmp_path, runs["paths"], runs["tmp"] / "b", peft={**PEFT, **change})
        with pytest.raises(ValueError, match="does not fit model.peft as given.*" + match):
            main(["fit", "--config", other, "--ckpt_path", str(runs["tmp"] / "b" / "checkpoints" / "step-000004.ckpt"),
                  "--trainer.max_epochs", "3"])


def test_full_checkpoint_with_peft_is_refused(runs, tmp_path):
    from sft_helpers import cpu_trainer, sft_data, sft_module

    trainer = cpu_trainer(str(tmp_path), max_steps=1)
    trainer.fit(sft_module(runs["paths"]["model"]), sft_data(runs["paths"]["data"]))
    trainer.save_checkpoint(str(tmp_path / "full.ckpt"))
    with pytest.raises(ValueError, match="holds full weights"):
        cpu_trainer(str(tmp_path), max_steps=2).fit(sft_module(runs["paths"]["model"], peft=PEFT),
                                                    sft_data(runs["paths"]["data"]),
                                                    ckpt_path=str(tmp_path / "full.ckpt"))
    with pytest.raises(ValueError, match="holds a LoRA adapter"):
        cpu_trainer(str(tmp_path), max_steps=8).fit(
            sft_module(runs["paths"]["model"]), sft_data(runs["paths"]["data"]),
            ckpt_path=str(runs["tmp"] / "b" / "checkpoints" / "step-000004.ckpt"))
