"""The Hugging Face export: a folder that plain transformers reloads into the trained model, a model card, a hub
push that fails safely, and wandb logging (offline) through the CLI."""

from __future__ import annotations

import glob
import json
import os
import re
import time

import lightning as L
import pytest
import torch

from sft_helpers import (QWEN_TOKENIZER, StepRecorder, chat_rows, cpu_trainer, file_digests, logits_of,
                         read_metrics_csv, save_tiny_model, sft_data, sft_module, write_jsonl)

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Three optimizer steps through a Trainer with ``HFExport``; the trained module stays in memory."""
    from lit_sft.export import HFExport

    tmp = tmp_path_factory.mktemp("export")
    out = str(tmp / "hf")
    data = sft_data(write_jsonl(str(tmp / "rows.jsonl"), chat_rows(12, seed=4)))
    module = sft_module(save_tiny_model(str(tmp / "init")), learning_rate=1e-2)
    recorder = StepRecorder()
    trainer = cpu_trainer(str(tmp), [recorder, HFExport(out)], max_epochs=1)
    trainer.fit(module, data)
    assert trainer.global_step == 3
    return {"out": out, "module": module, "data": data, "trainer": trainer, "recorder": recorder}


def test_folder_reloads_with_plain_transformers(exported):
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    out, module, data = exported["out"], exported["module"], exported["data"]
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([data.train_rows[i]["input_ids"][:24] for i in range(3)])
    trained, loaded = logits_of(module.model, ids), logits_of(reloaded, ids)
    diff = (trained - loaded).abs().max().item()
    initial = AutoModelForCausalLM.from_pretrained(module.hparams.model_name_or_path, dtype=torch.float32)
    moved = (trained - logits_of(initial, ids)).abs().max().item()
    print(f"\nmax |logits(export) - logits(in memory)| = {diff:.3g} (training moved them by {moved:.3g})")
    assert diff <= 1e-5
    assert moved > 1e-3, "the exported weights must be the trained ones, not the initial ones"

    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["use_cache"] is True
    assert AutoConfig.from_pretrained(out).use_cache is True
    assert module.model.config.use_cache is False  # training keeps the cache off

    eos = GenerationConfig.from_pretrained(out).eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    assert eos[0] == data.tokenizer.convert_tokens_to_ids(IM_END) == data.tokenizer.eos_token_id


def test_tokenizer_reloads_with_same_chat_template_ids(exported):
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(exported["out"])
    data = exported["data"]
    assert reloaded.eos_token == IM_END and reloaded.pad_token == data.tokenizer.pad_token
    for i, row in enumerate(chat_rows(12, seed=4)):
        ids = reloaded.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        assert list(ids) == data.train_rows[i]["input_ids"]
        prompt = reloaded.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        assert prompt == data.tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False,
                                                            add_generation_prompt=True)


def test_model_card(exported):
    import lightning
    import transformers

    with open(os.path.join(exported["out"], "README.md")) as f:
        card = f.read()
    module, data = exported["module"], exported["data"]
    assert card.startswith("---\n") and "library_name: transformers" in card and "lit_sft" in card
    assert f"`{module.hparams.model_name_or_path}`" in card  # base model
    assert f"`{data.hparams.dataset_name}`" in card  # dataset
    for key, value in [("learning_rate", 0.01), ("lr_scheduler_type", "cosine_with_min_lr"), ("warmup_ratio", 0.05),
                       ("max_grad_norm", 1.0), ("per_device_train_batch_size", 2),
                       ("gradient_accumulation_steps", 2)]:
        assert f"| {key} | {value} |" in card, key
    final = exported["recorder"].steps[-1]["train/loss"]
    match = re.search(r"final training loss[^:]*: ([0-9.]+)", card)
    assert match and float(match.group(1)) == pytest.approx(final, abs=5e-5)
    assert "optimizer steps: 3" in card
    for name, version in [("transformers", transformers.__version__), ("torch", torch.__version__),
                          ("lightning", lightning.__version__)]:
        assert f"- {name}: {version}" in card


def test_model_card_metadata_names_hub_base_model_and_dataset():
    """With hub ids (not local paths), the card's YAML header carries ``base_model`` and ``datasets``."""
    from types import SimpleNamespace

    import yaml

    from lit_sft.export import model_card

    module = SimpleNamespace(hparams={"model_name_or_path": "Qwen/Qwen2.5-1.5B-Instruct", "learning_rate": 5e-5})
    data = SimpleNamespace(hparams={"dataset_name": "open-r1/OpenR1-Math-220k"})
    card = model_card(module, data, {"train/loss": 0.5, "global_step": 10})
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "Qwen/Qwen2.5-1.5B-Instruct"
    assert meta["datasets"] == ["open-r1/OpenR1-Math-220k"]
    assert "final training loss (token mean of the last step): 0.5000" in card


def test_push_to_unreachable_hub_warns_and_keeps_local_files(exported, monkeypatch):
    from lit_sft.export import HFExport, push_folder

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: connection refused
    monkeypatch.setenv("HF_TOKEN", "hf_dummy_token_for_tests")  # so the upload gets as far as the network
    out = exported["out"]
    before = file_digests(out)
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md"} <= set(before)

    with pytest.warns(UserWarning, match=r"push_to_hub to 'lit-sft-test/tiny' failed"):
        assert push_folder(out, "lit-sft-test/tiny") is None
    assert file_digests(out) == before

    # The callback's end-of-training path: export again, then push; the failure only warns.
    callback = HFExport(out, push_to_hub=True, hub_model_id="lit-sft-test/tiny", hub_strategy="end")
    with pytest.warns(UserWarning, match="the model stays in"):
        callback.on_train_end(exported["trainer"], exported["module"])
    assert file_digests(out) == before


def test_cli_reports_to_wandb_offline(tmp_path, monkeypatch):
    import yaml

    from lit_sft.cli import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    config = {
        "run": {"output_dir": str(out), "save_strategy": "no", "report_to": ["wandb", "csv"],
                "run_name": "tiny-offline", "wandb_project": "lit-sft-tests"},
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_epochs": 1,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"model_name_or_path": save_tiny_model(str(tmp_path / "init")), "torch_dtype": "float32",
                  "attn_implementation": "sdpa", "gradient_checkpointing": False, "learning_rate": 1e-2},
        "data": {"dataset_name": write_jsonl(str(tmp_path / "rows.jsonl"), chat_rows(8, seed=5)),
                 "tokenizer_name_or_path": QWEN_TOKENIZER, "max_length": 128, "per_device_train_batch_size": 2,
                 "gradient_accumulation_steps": 2, "num_workers": 0},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    import wandb

    try:
        main(["fit", "--config", "config.yaml"])
    finally:
        if wandb.run is not None:
            wandb.finish()

    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(runs) == 1, os.listdir(out)
    assert glob.glob(os.path.join(runs[0], "run-*.wandb"))
    # wandb's service process writes the log asynchronously; on a loaded machine it can trail ``finish()``.
    deadline = time.monotonic() + 60
    while len(history := _wandb_history(runs[0])) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    wandb_loss = {h["trainer/global_step"]: h["train/loss"] for h in history if "train/loss" in h}
    csv_metrics = read_metrics_csv(str(out / "logs" / "tiny-offline" / "metrics.csv"))
    csv_loss = {step: m["train/loss"] for step, m in csv_metrics.items()}
    assert sorted(wandb_loss) == [1, 2]
    assert wandb_loss == pytest.approx(csv_loss, abs=1e-12, rel=0)  # the same step metrics reach both loggers
    assert (out / "model.safetensors").exists()


def _wandb_history(run_dir: str) -> list[dict]:
    """The ``history`` records of an offline wandb run, read back from its ``run-*.wandb`` transaction log.

    That file is a LevelDB-style log (what ``wandb sync`` uploads): a 7-byte header (``:W&B``, magic, version), then
    32 KiB blocks of chunks, each with a 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last)
    whose payloads join into serialized ``wandb_internal_pb2.Record`` messages.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    with open(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0], "rb") as f:
        buf = f.read()
    assert buf[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(buf):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        payload, pos = buf[pos + 7:pos + 7 + length], pos + 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            records.append(pending)
    history = []
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    return history


INVALID_GENERATION = {"eos_token_id": 151643, "do_sample": False, "temperature": 0.7, "top_p": 0.8, "top_k": 20}


class _WarningsAtFirstBatch(L.Callback):
    """The warnings caught (by the test's ``catch_warnings``) when the first micro-batch starts."""

    def __init__(self, caught: list) -> None:
        self.caught, self.before = caught, None

    def on_train_batch_start(self, *args) -> None:
        if self.before is None:
            self.before = [str(w.message) for w in self.caught]


def test_invalid_base_generation_config_is_normalised_before_training(tmp_path):
    """A base model whose generation_config.json sets sampling flags with ``do_sample: false`` (common in published
    checkpoints; transformers refuses to save it once changed): the flags are unset, with a warning, before the
    first step; the run ends with the folder written and a generation config that transformers validates."""
    import warnings

    from transformers import GenerationConfig

    from lit_sft.export import HFExport

    base = save_tiny_model(str(tmp_path / "init"))
    with open(os.path.join(base, "generation_config.json"), "w") as f:
        json.dump(INVALID_GENERATION, f)
    reference = GenerationConfig.from_pretrained(base)  # transformers' own verdict on this input, once modified
    reference.eos_token_id = [151645, 151643]
    with pytest.raises(ValueError, match="GenerationConfig is invalid"):
        reference.save_pretrained(str(tmp_path / "reference"))

    out = tmp_path / "hf"
    data = sft_data(write_jsonl(str(tmp_path / "rows.jsonl"), chat_rows(12, seed=4)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _WarningsAtFirstBatch(caught)
        trainer = cpu_trainer(str(tmp_path), [first, HFExport(str(out))], max_epochs=1)
        trainer.fit(sft_module(base, learning_rate=1e-2), data)
    assert trainer.global_step == 3
    normalised = [m for m in first.before if "generation_config.json normalised" in m]
    assert normalised and all(f"{k}: {v!r} -> None" in normalised[0] for k, v in
                              [("temperature", 0.7), ("top_p", 0.8), ("top_k", 20)]), first.before

    saved = GenerationConfig.from_pretrained(str(out))
    saved.validate(strict=True)
    assert saved.do_sample is False and saved.temperature is None and saved.top_p is None and saved.top_k is None
    assert saved.eos_token_id == [data.tokenizer.convert_tokens_to_ids(IM_END), 151643]
    assert os.path.isfile(out / "model.safetensors")


def _cli_args(tmp_path, out) -> list[str]:
    base = save_tiny_model(str(tmp_path / "init"))
    rows = write_jsonl(str(tmp_path / "rows.jsonl"), chat_rows(8, seed=3))
    return ["fit", "--model.model_name_or_path", base, "--model.torch_dtype", "float32",
            "--model.attn_implementation", "sdpa", "--model.gradient_checkpointing", "false",
            "--model.learning_rate", "1e-2", "--data.dataset_name", rows, "--data.tokenizer_name_or_path",
            QWEN_TOKENIZER, "--data.max_length", "128", "--data.per_device_train_batch_size", "2",
            "--data.gradient_accumulation_steps", "1", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.precision", "32-true", "--trainer.max_steps", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--run.output_dir", str(out), "--run.save_steps", "2"]


def test_failed_export_keeps_the_checkpoint_and_lit_sft_export_redoes_it(tmp_path, monkeypatch):
    """A save that fails at the end of training (here: a full disk) fails the run only after the final checkpoint
    is written, naming the command that redoes the export; ``lit_sft export --config <the run's config>`` then
    writes the folder from that checkpoint, with its exact weights."""
    import lit_sft.export as export_module
    from transformers import AutoModelForCausalLM

    from lit_sft.cli import main

    out = tmp_path / "run"
    save = export_module.save_hf_folder

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "save_hf_folder", full_disk)
    with pytest.raises(RuntimeError, match=r"lit_sft export --config \S+config\.yaml") as failure:
        main(_cli_args(tmp_path, out))
    assert "No space left on device" in str(failure.value)
    ckpt = out / "checkpoints" / "step-000002.ckpt"
    assert ckpt.is_file() and not (out / "model.safetensors").exists()

    monkeypatch.setattr(export_module, "save_hf_folder", save)
    config = re.search(r"lit_sft export --config (\S+config\.yaml)", str(failure.value)).group(1)
    main(["export", "--config", config])
    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    trained = AutoModelForCausalLM.from_config(exported.config, dtype=torch.float32)
    trained.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    ids = torch.tensor([[151644, 872, 198, 22, 353, 220, 21, 30, 151645]])
    assert torch.equal(logits_of(exported, ids), logits_of(trained, ids))
    with open(out / "README.md") as f:
        assert "exported from the checkpoint `step-000002.ckpt` with `lit_sft export`" in f.read()


def test_export_command_needs_a_checkpoint(tmp_path, monkeypatch):
    from lit_sft.cli import main

    monkeypatch.setenv("JSONARGPARSE_DEBUG", "true")  # the exception itself (the CLI prints it as one error line)
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*pass --ckpt_path"):
        main(["export", "--model.model_name_or_path", save_tiny_model(str(tmp_path / "init")),
              "--data.dataset_name", "x.jsonl", "--data.tokenizer_name_or_path", QWEN_TOKENIZER,
              "--run.output_dir", str(tmp_path / "empty")])
