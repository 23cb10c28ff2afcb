"""LoRA on 2 processes (CPU, gloo, fp32): DDP and DeepSpeed ZeRO-3 with the base partitioned or whole, equal to the
plain PyTorch + peft reference; under ZeRO-3 the adapters start as peft initialises them, only they are optimised,
checkpoints leave the base out and resume exactly, and the export gathers the adapter and merges it.

7 rows with answers of very different lengths, in file order, 2 ranks x micro-batch 1 x accumulation 2: optimizer
steps of 4 + 3 rows (the ranks' token counts differ ~2x; in the short step one rank runs a filler micro-batch).
Each run (``tests/scripts/lora_run.py``) starts from peft's own adapter init as lit_sft builds it (``lora_B = 0``,
so the first step trains ``lora_B`` and the second both factors); the reference (``tests/lora_harness.py``) starts
from the same adapter weights. Cases:

* ``ddp``: DDP;
* ``zero3``: ZeRO-3 with ``zero3_partition_parameters: true`` (the base born partitioned inside ``zero.Init``),
  gradient checkpointing, the end-of-training export (adapter + merged) and a checkpoint every step;
* ``zero3-whole``: ZeRO-3 with ``zero3_partition_parameters: false`` (what ``auto`` picks for a small model on GPUs:
  DeepSpeed stage 2), padding-free micro-batches of <= 128 tokens;
* ``zero3-resume``: the ``zero3`` run's step-1 checkpoint resumed for step 2: bit for bit the ``zero3`` run's.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lora_harness import PEFT, adapter_params, reference_lora
from sft_harness import TOKENIZER, load_model, max_abs_diff, run_script, save_tiny_qwen2, token_ids, write_rows

pytestmark = pytest.mark.slow

ANSWER_WORDS = [150, 1, 60, 4, 100, 2, 30]
TOL = 1e-6
CASES = {
    "ddp": ["--strategy", "ddp"],
    "zero3": ["--strategy", "zero3", "--partition", "true", "--gradient-checkpointing", "--merge"],
    "zero3-whole": ["--strategy", "zero3", "--partition", "false", "--padding-free",
                    "--max-tokens-per-micro-batch", "128"],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_dp")
    rows = write_rows(str(tmp / "rows.jsonl"), ANSWER_WORDS)
    model_dir = save_tiny_qwen2(str(tmp / "model"))
    return dict(tmp=tmp, data=str(tmp / "rows.jsonl"), model_dir=model_dir, ids=token_ids(rows), runs={},
                base={n: p.detach() for n, p in load_model(model_dir).named_parameters()})


def _run(setup, case):
    if case in setup["runs"]:
        return setup["runs"][case]
    out = setup["tmp"] / case
    args = ["--model-dir", setup["model_dir"], "--data", setup["data"], "--out", str(out), "--peft", json.dumps(PEFT)]
    if case == "zero3-resume":
        args += [*CASES["zero3"], "--resume", str(setup["tmp"] / "zero3" / "checkpoints" / "step-000001.ckpt")]
    else:
        args += [*CASES[case], "--checkpoint-dir", str(out / "checkpoints")]
        if case == "zero3":
            args += ["--export-dir", str(out / "export")]
    run_script("tests/scripts/lora_run.py", *args)
    result = dict(out=out, params=torch.load(out / "params.pt"), init=torch.load(out / "init.pt"),
                  layout=json.loads((out / "layout.json").read_text()),
                  report=json.loads((out / "report.json").read_text()),
                  checkpoint=str(out / "checkpoints" / "step-000002.ckpt"))
    setup["runs"][case] = result
    return result


@pytest.mark.parametrize("case", ["ddp", "zero3", "zero3-whole", "zero3-resume"])
def test_two_processes_equal_peft_reference(setup, case):
    run = _run(setup, case)
    steps = run["report"]["global_step"]
    assert run["report"]["world_size"] == 2 and steps == 2
    init = _run(setup, "zero3")["init"] if case == "zero3-resume" else run["init"]
    ids = setup["ids"]
    reference = reference_lora(setup["model_dir"], PEFT, init, [ids[:4], ids[4:]])
    want = adapter_params(reference)
    got = {n: v for n, v in run["params"].items() if n in want}
    diff = max_abs_diff(got, want)
    moved = {kind: max((got[n] - init[n]).abs().max().item() for n in got if kind in n)
             for kind in ("lora_A", "lora_B")}
    print(f"{case}: {steps} steps, max |adapter - plain PyTorch + peft| = {diff:.3e}; moved {moved}")
    assert diff < TOL
    assert min(moved.values()) > 1e-3
    for name, value in run["params"].items():  # the frozen base: the file's weights, bit for bit
        if name not in want:
            assert torch.equal(value, setup["base"][name.removeprefix("base_model.model.").replace(".base_layer", "")])
    if case == "zero3-resume":  # the resumed step 2: what the uninterrupted run trained, bit for bit
        uninterrupted = _run(setup, "zero3")
        assert [s["train/loss"] for s in run["report"]["steps"]] == [uninterrupted["report"]["steps"][1]["train/loss"]]
        assert max_abs_diff(run["params"], uninterrupted["params"]) == 0.0


@pytest.mark.parametrize("case", ["zero3", "zero3-whole"])
def test_zero3_adapters_start_as_peft_initialises_them(setup, case):
    """Built inside ``zero.Init``, the adapters would be partitioned before peft's init and keep ``nn.Linear``'s
    random ``lora_B``; lit_sft builds them outside it: ``lora_B = 0`` (the adapted model starts as the base)."""
    init = _run(setup, case)["init"]
    assert init and all(v.abs().max() == 0 for n, v in init.items() if "lora_B" in n)
    assert all(v.abs().max() > 0 for n, v in init.items() if "lora_A" in n)


def test_memory_layouts(setup):
    """Per rank: the base partitioned (ZeRO-3) or whole (``zero3_partition_parameters: false``, DDP), and only the
    adapters in the optimizer (DeepSpeed: its fp32 partitions hold half the adapter elements each)."""
    adapters = sum(v.numel() for n, v in _run(setup, "ddp")["init"].items())
    base = sum(v.numel() for v in setup["base"].values())
    for case, base_partitioned in (("ddp", False), ("zero3", True), ("zero3-whole", False)):
        for rank in _run(setup, case)["layout"]:
            assert rank["adapter_full"] == adapters and rank["base_full"] == base, case
            if base_partitioned:
                assert rank["base_local"] == 0 and 0 < rank["base_shard"] <= -(-base // 2) + 64, (case, rank)
            else:
                assert rank["base_local"] == base, (case, rank)
            optimised = adapters if case == "ddp" else -(-adapters // 2)
            assert optimised <= rank["optimizer_numel"] <= optimised + 64, (case, rank)
    print(f"base {base:,} elements, adapters {adapters:,}: each rank's optimizer steps the adapters only")


@pytest.mark.parametrize("case", ["zero3", "zero3-whole"])
def test_deepspeed_checkpoint_leaves_the_base_out(setup, case):
    """DeepSpeed's module states and optimizer files hold the adapter only (``exclude_frozen_parameters``)."""
    folder = os.path.join(_run(setup, case)["checkpoint"], "checkpoint")
    size = 0
    for name in os.listdir(folder):
        size += os.path.getsize(os.path.join(folder, name))
        if name.endswith("model_states.pt"):
            states = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=False)
            module = states["module"]
            assert module and all(".lora_" in k for k in module), (name, [k for k in module if ".lora_" not in k])
            assert not states.get("frozen_param_fragments"), name
    base_bytes = 4 * sum(v.numel() for v in setup["base"].values())
    print(f"{case}: DeepSpeed checkpoint {size:,} bytes; the fp32 base alone is {base_bytes:,}")
    assert size < 0.05 * base_bytes


def test_zero3_export_gathers_adapter_and_merges(setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = _run(setup, "zero3")
    export = run["out"] / "export"
    saved = load_file(str(export / "adapter_model.safetensors"))
    trained = {n: v for n, v in run["params"].items() if "lora_" in n}
    assert len(saved) == len(trained)
    model = PeftModel.from_pretrained(load_model(setup["model_dir"]), str(export)).eval()
    assert max_abs_diff({n: p.detach() for n, p in model.named_parameters() if "lora_" in n}, trained) == 0.0
    merged = AutoModelForCausalLM.from_pretrained(str(export / "merged"), dtype=torch.float32).eval()
    x = torch.tensor([setup["ids"][0]])
    with torch.no_grad():
        diff = (merged(input_ids=x).logits - model(input_ids=x).logits).abs().max().item()
    print(f"ZeRO-3 export: merged logits vs adapter on the base: max |diff| = {diff:.3e}")
    assert diff < 1e-5


def test_export_command_from_zero3_adapter_checkpoint(setup, tmp_path):
    from lit_sft.cli import main

    run = _run(setup, "zero3")
    main(["export", "--model.model_name_or_path", setup["model_dir"], "--model.torch_dtype", "float32",
          "--model.peft", json.dumps(PEFT), "--data.dataset_name", setup["data"], "--data.tokenizer_name_or_path",
          TOKENIZER, "--run.output_dir", str(tmp_path), "--ckpt_path", run["checkpoint"]])
    again = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert max_abs_diff(again, load_file(str(run["out"] / "export" / "adapter_model.safetensors"))) == 0.0
