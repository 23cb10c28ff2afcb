"""The export of a LoRA run: the adapter folder (peft's format) and, with ``merge_adapter``, the merged 16-bit model.

A single-process fp32 run (2 optimizer steps from seeded random adapters, so the adapter changes the model a lot)
ends with :class:`lit_sft.export.HFExport` (``merge_adapter=True``) and a final checkpoint. Checked against the
trained model's own logits (1e-5, fp32, CPU):

* ``output_dir`` loads with ``peft.PeftModel.from_pretrained(base, output_dir)`` on the base loaded with plain
  transformers; it holds the adapter weights only, ``adapter_config.json`` names the base, the card is peft's;
* ``output_dir/merged`` loads with plain ``AutoModelForCausalLM.from_pretrained`` with no missing key, embeddings
  tied, the chat template's EOS in ``generation_config.json``, transformers 4.x's keys (``export_format:
  compatible``), a model card;
* ``lit_sft export`` from the adapter-only checkpoint (the base rebuilt from ``model_name_or_path``) writes the same
  adapter and merged weights.
"""

from __future__ import annotations

import json
import os

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lora_harness import PEFT, SetAdapters, adapter_params, random_adapters
from sft_harness import TOKENIZER, fit_lit_sft, load_model, max_abs_diff, save_tiny_qwen2, token_ids, write_rows

ANSWER_WORDS = [40, 3, 25, 8]


class SaveCheckpoint(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from lit_sft.export import HFExport

    tmp = tmp_path_factory.mktemp("lora_export")
    rows = write_rows(str(tmp / "rows.jsonl"), ANSWER_WORDS)
    model_dir = save_tiny_qwen2(str(tmp / "model"))
    out = tmp / "out"
    init = random_adapters(model_dir, PEFT, scale=0.3)
    _, module = fit_lit_sft(model_dir, str(tmp / "rows.jsonl"), 2, 2, max_steps=2, lr=1e-2, eps=1e-8,
                            callbacks=[SetAdapters(init), HFExport(str(out), merge_adapter=True),
                                       SaveCheckpoint(str(tmp / "final.ckpt"))], module_kwargs={"peft": PEFT})
    x = torch.tensor([token_ids(rows)[0]])
    module.model.eval()
    with torch.no_grad():
        logits = module.model(input_ids=x).logits
        base_logits = load_model(model_dir).eval()(input_ids=x).logits
    assert (logits - base_logits).abs().max() > 1e-2  # the adapter changes the model
    file = {n: p for n, p in load_model(model_dir).named_parameters()}
    for name, p in module.model.named_parameters():  # the merge left the training model's base untouched
        if not p.requires_grad:
            assert torch.equal(p, file[name.removeprefix("base_model.model.").replace(".base_layer", "")]), name
    return dict(tmp=tmp, data=str(tmp / "rows.jsonl"), model_dir=model_dir, out=str(out), x=x, logits=logits,
                adapter=adapter_params(module.model), checkpoint=str(tmp / "final.ckpt"))


def test_adapter_folder_loads_with_peft(run):
    from peft import PeftModel

    files = set(os.listdir(run["out"]))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer_config.json"} <= files
    assert "model.safetensors" not in files  # the base is not copied
    saved = load_file(os.path.join(run["out"], "adapter_model.safetensors"))
    assert len(saved) == len(run["adapter"]) and all("lora_" in k for k in saved)
    config = json.loads(open(os.path.join(run["out"], "adapter_config.json")).read())
    assert config["base_model_name_or_path"] == run["model_dir"] and config["r"] == PEFT["r"]
    assert "library_name: peft" in open(os.path.join(run["out"], "README.md")).read()

    model = PeftModel.from_pretrained(load_model(run["model_dir"]), run["out"]).eval()
    assert max_abs_diff(adapter_params_loaded(model), run["adapter"]) == 0.0
    with torch.no_grad():
        diff = (model(input_ids=run["x"]).logits - run["logits"]).abs().max().item()
    print(f"adapter folder via PeftModel.from_pretrained: max |logits - trained| = {diff:.3e}")
    assert diff < 1e-5


def adapter_params_loaded(model):
    """Adapter weights of a peft model loaded for inference (nothing requires grad there)."""
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


def test_merged_folder_reloads_in_plain_transformers(run):
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    merged = os.path.join(run["out"], "merged")
    model, info = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not any("lora" in k or "base_layer" in k for k in load_file(os.path.join(merged, "model.safetensors")))
    with torch.no_grad():
        diff = (model.eval()(input_ids=run["x"]).logits - run["logits"]).abs().max().item()
    print(f"merged folder in plain transformers: max |logits - adapted model| = {diff:.3e}")
    assert diff < 1e-5

    from lit_sft.data.loading import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    assert GenerationConfig.from_pretrained(merged).eos_token_id[0] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    raw = json.loads(open(os.path.join(merged, "config.json")).read())
    assert "rope_theta" in raw and raw["use_cache"] is True  # export_format: compatible, as a full export
    assert AutoConfig.from_pretrained(merged).tie_word_embeddings
    assert "fine-tuned with lit_sft" in open(os.path.join(merged, "README.md")).read()


def test_export_command_from_adapter_checkpoint(run, tmp_path):
    """``lit_sft export`` on a LoRA run's checkpoint (adapter and optimizer state only) rebuilds the base from
    ``model_name_or_path`` and writes the same folders."""
    from lit_sft.cli import main

    state = torch.load(run["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    assert set(state) == {"model." + n for n in run["adapter"]}
    out = tmp_path / "exported"
    main(["export", "--model.model_name_or_path", run["model_dir"], "--model.torch_dtype", "float32",
          "--model.peft", json.dumps(PEFT), "--data.dataset_name", run["data"], "--data.tokenizer_name_or_path",
          TOKENIZER, "--run.output_dir", str(out), "--run.merge_adapter", "true", "--ckpt_path", run["checkpoint"]])
    for name in ("adapter_model.safetensors", "merged/model.safetensors"):
        again, first = load_file(str(out / name)), load_file(os.path.join(run["out"], name))
        assert set(again) == set(first), name
        diff = max_abs_diff(again, first)
        print(f"lit_sft export {name}: max |diff| vs the end-of-training export = {diff:.3e}")
        assert diff <= 1e-6, name
