"""DeepSpeed ZeRO-3 with 2 processes (CPU, gloo, fp32): loading a pretrained folder, training, exporting.

One run (``tests/scripts/sft_run.py``) of ``SFTModule(model_name_or_path=<tiny Qwen2 folder>, torch_dtype="float32")``
under ``CPUDeepSpeedStrategy(zero_stage=3)`` with gradient checkpointing, 2 ranks x micro-batch 1 x accumulation 2,
2 optimizer steps on rows of very different lengths, ``lit_sft.export.HFExport`` at the end. The loss runs in chunks
of 64 positions, so the ranks need different numbers of ``lm_head`` calls (rank 0: up to 4, rank 1: 1, and an empty
one for its filler micro-batch in the short last step), each a collective gather under ZeRO-3. Checked here:

* loading: right after ``configure_model`` every parameter is partitioned (size 0 locally, a shard on each rank) and
  ``deepspeed.zero.GatheredParameters`` gives exactly the file's weights;
* training: the gathered trained parameters equal the single-process run's and the plain-PyTorch reference's
  (within 1e-6), so ZeRO-3 neither averages nor divides differently;
* export: the folder holds every weight, full-size, with the config's shapes, embeddings tied; plain
  ``AutoModelForCausalLM.from_pretrained`` reloads it with no missing key, and its logits equal those of a model built
  from the gathered trained weights (within 1e-5).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from sft_harness import (TOKENIZER, fit_lit_sft, load_model, max_abs_diff, model_params, reference_adamw, run_script,
                         save_tiny_qwen2, token_ids, write_rows)

ANSWER_WORDS = [150, 1, 60, 4, 100, 2, 30]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    rows = write_rows(str(tmp / "rows.jsonl"), ANSWER_WORDS)
    model_dir = save_tiny_qwen2(str(tmp / "model"))  # TINY_QWEN2: tie_word_embeddings=True
    out, export = tmp / "run", tmp / "export"
    run_script("tests/scripts/sft_run.py", "--model-dir", model_dir, "--data", str(tmp / "rows.jsonl"), "--out",
               str(out), "--strategy", "zero3", "--devices", "2", "--micro", "1", "--accum", "2", "--max-steps", "2",
               "--gradient-checkpointing", "--loss-chunk-size", "64", "--check-load", "--export-dir", str(export),
               "--save-checkpoint", str(out / "final.ckpt"))
    return dict(tmp=tmp, data=str(tmp / "rows.jsonl"), model_dir=model_dir, ids=token_ids(rows),
                report=json.loads((out / "report.json").read_text()), params=torch.load(out / "params.pt"),
                export=str(export), checkpoint=str(out / "final.ckpt"))


def test_pretrained_weights_load_into_the_shards(run):
    load = run["report"]["load"]
    file = load_file(os.path.join(run["model_dir"], "model.safetensors"))
    assert set(load) == set(file)  # lm_head is tied: neither a parameter of its own nor in the file
    for name, p in load.items():
        assert p["local_numel"] == 0, name  # partitioned: the module holds a size-0 placeholder ...
        assert 0 < p["shard_numel"] <= -(-p["ds_numel"] // 2), name  # ... and this rank a shard of at most half
        assert p["ds_numel"] == file[name].numel() > 0, name
        assert p["gathered_shape"] == p["file_shape"] == list(file[name].shape), name
        assert p["max_abs_diff"] == 0.0, name


def test_two_ranks_equal_single_process_and_reference(run):
    ids = run["ids"]
    reference, _ = reference_adamw(run["model_dir"], [ids[:4], ids[4:]])
    _, module = fit_lit_sft(run["model_dir"], run["data"], 4, 1, max_steps=2)
    to_single = max_abs_diff(run["params"], model_params(module))
    to_reference = max_abs_diff(run["params"], reference)
    initial = {n: p.detach() for n, p in load_model(run["model_dir"]).named_parameters()}
    print(f"zero3 x2: max |param diff| vs single process = {to_single:.3e}, vs plain PyTorch = {to_reference:.3e}; "
          f"moved by {max_abs_diff(run['params'], initial):.3e}")
    assert to_single < 1e-6 and to_reference < 1e-6
    assert max_abs_diff(run["params"], initial) > 1e-3
    assert run["report"]["global_step"] == 2
    assert run["report"]["last_step_metrics"]["train/step_loss_tokens"] == sum(len(r) - 1 for r in ids[4:])


def test_export_holds_full_tied_weights(run):
    from transformers import AutoConfig, AutoModelForCausalLM

    exported = load_file(os.path.join(run["export"], "model.safetensors"))
    config = AutoConfig.from_pretrained(run["export"])
    assert config.tie_word_embeddings
    expected_shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    assert set(exported) == set(expected_shapes) - {"lm_head.weight"}  # tied: saved once, as embed_tokens
    for name, tensor in exported.items():
        assert tensor.numel() > 0 and tensor.shape == expected_shapes[name], (name, tensor.shape)
        assert tensor.dtype == torch.float32
    assert max_abs_diff(exported, run["params"]) == 0.0


def test_export_reloads_with_plain_transformers_and_same_logits(run):
    from transformers import AutoConfig, AutoModelForCausalLM

    reloaded, info = AutoModelForCausalLM.from_pretrained(run["export"], dtype=torch.float32,
                                                          output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()

    trained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run["model_dir"]), dtype=torch.float32)
    missing, unexpected = trained.load_state_dict(run["params"], strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to embed_tokens
    assert trained.lm_head.weight.data_ptr() == trained.model.embed_tokens.weight.data_ptr()

    x = torch.tensor([run["ids"][0]])
    with torch.no_grad():
        got = reloaded.eval()(input_ids=x).logits
        want = trained.eval()(input_ids=x).logits
        initial = load_model(run["model_dir"]).eval()(input_ids=x).logits
    diff = (got - want).abs().max().item()
    print(f"export logits vs gathered trained weights: max |diff| = {diff:.3e} "
          f"(vs untrained: {(got - initial).abs().max().item():.3e})")
    assert diff < 1e-5
    assert (got - initial).abs().max().item() > 1e-2


def test_export_command_from_zero3_checkpoint_folder(run, tmp_path):
    """``lit_sft export --ckpt_path <ZeRO-3 folder>`` (2 ranks' shards, consolidated by DeepSpeed) writes the same
    weights as the export at the end of training, and the folder reloads in plain transformers."""
    from lit_sft.cli import main

    assert os.path.isdir(run["checkpoint"]) and os.path.isfile(os.path.join(run["checkpoint"], "latest"))
    out = tmp_path / "from_checkpoint"
    main(["export", "--model.model_name_or_path", run["model_dir"], "--model.torch_dtype", "float32",
          "--data.dataset_name", run["data"], "--data.tokenizer_name_or_path", TOKENIZER,
          "--run.output_dir", str(out), "--ckpt_path", run["checkpoint"]])
    exported = load_file(os.path.join(run["export"], "model.safetensors"))
    again = load_file(str(out / "model.safetensors"))
    assert set(again) == set(exported)
    assert max_abs_diff(again, exported) == 0.0
    assert max_abs_diff(again, run["params"]) == 0.0
