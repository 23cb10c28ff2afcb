"""LoRA (``model.peft``) trains exactly what plain PyTorch + peft trains, on the same rows, loss and step.

4 rows whose answers differ ~8x in length, one optimizer step of all 4 rows, cut as 4x1, 1x4, 2x2 (micro-batch rows
x accumulation), padding-free with a token budget, with gradient checkpointing and with the chunked loss. lit_sft's
run (a real Lightning ``Trainer``) starts from seeded random adapter weights (``lora_B`` not zero, so ``lora_A``
trains in the first step too); the reference (``tests/lora_harness.py``) is ``peft.get_peft_model`` on the model
loaded with plain transformers, the same ``LoraConfig``, the same adapter weights, and ``torch.optim.AdamW`` on the
global token mean. After the step the adapter weights agree within 1e-6, the base weights are bit for bit the
file's, and only the adapter weights are in the optimizer. A normalisation by micro-batch means would land far
outside the tolerance (checked), so the comparison sees the gradient scale. Also: peft's options pass through (DoRA,
rsLoRA), and bad ``model.peft`` / ``model.load_in_4bit`` settings fail before the model is built with a message that
names the key.
"""

from __future__ import annotations

import pytest
import torch

from lit_sft.metrics import STEP_LOSS_TOKENS
from lora_harness import PEFT, SetAdapters, adapter_params, frozen_params, lora_config, random_adapters, reference_lora
from sft_harness import fit_lit_sft, load_model, max_abs_diff, row_losses, save_tiny_qwen2, token_ids, write_rows

ANSWER_WORDS = [150, 1, 40, 6]
TOL = 1e-6
STEPS = 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    rows = write_rows(str(tmp / "rows.jsonl"), ANSWER_WORDS)
    ids = token_ids(rows)
    model_dir = save_tiny_qwen2(str(tmp / "model"), pretrain_on=ids[:1])  # rows' mean losses differ
    return dict(data=str(tmp / "rows.jsonl"), model_dir=model_dir, ids=ids,
                base={n: p.detach().clone() for n, p in load_model(model_dir).named_parameters()})


def _fit(setup, micro, accum, peft=PEFT, **kwargs):
    init = random_adapters(setup["model_dir"], peft)
    module_kwargs = {"peft": peft, **kwargs.pop("module_kwargs", {})}
    trainer, module = fit_lit_sft(setup["model_dir"], setup["data"], micro, accum, max_steps=STEPS,
                                  callbacks=[SetAdapters(init)], module_kwargs=module_kwargs, **kwargs)
    assert trainer.global_step == STEPS
    optimizer = module.optimizers().optimizer
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.model.parameters() if p.requires_grad}
    return module, init


def _check_base_untouched(setup, module):
    """Every frozen parameter is the file's weight, bit for bit (peft names: ``base_model.model.<name>``, adapted
    layers' weights under ``.base_layer``)."""
    frozen = frozen_params(module.model)
    assert frozen
    for name, value in frozen.items():
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(value, setup["base"][plain]), name


@pytest.mark.parametrize("micro,accum,kwargs", [
    (4, 1, {}), (1, 4, {}), (2, 2, {}),
    (2, 2, {"padding_free": True, "max_tokens_per_micro_batch": 256}),
    (2, 2, {"gradient_checkpointing": True}),
    # reentrant recomputation reaches the adapters only because the frozen embeddings' output requires grad
    (2, 2, {"gradient_checkpointing": True,
            "module_kwargs": {"gradient_checkpointing_kwargs": {"use_reentrant": True}}}),
    (2, 2, {"gradient_checkpointing": True, "module_kwargs": {"gradient_checkpointing_layers": 1}}),  # selective
], ids=["4x1", "1x4", "2x2", "token-budget", "gradient-checkpointing", "reentrant-checkpointing", "1-layer-recomputes"])
def test_adapter_steps_equal_peft_reference(setup, micro, accum, kwargs):
    module, init = _fit(setup, micro, accum, **kwargs)
    reference = reference_lora(setup["model_dir"], PEFT, init, [setup["ids"]] * STEPS)
    got, want = adapter_params(module.model), adapter_params(reference)
    diff = max_abs_diff(got, want)
    moved = {kind: max((got[n] - init[n]).abs().max().item() for n in got if kind in n)
             for kind in ("lora_A", "lora_B")}
    print(f"{micro}x{accum} {kwargs}: max |adapter - reference| = {diff:.3e}; moved {moved}")
    assert diff < TOL
    assert min(moved.values()) > 1e-3  # both factors trained
    _check_base_untouched(setup, module)
    assert module.last_step_metrics[STEP_LOSS_TOKENS] == sum(len(r) - 1 for r in setup["ids"])
    if kwargs.get("gradient_checkpointing"):
        from lit_sft.modeling import decoder_layers

        count = kwargs.get("module_kwargs", {}).get("gradient_checkpointing_layers", 2)
        assert [layer.gradient_checkpointing for layer in decoder_layers(module.model)] == [i < count for i in range(2)]


@pytest.mark.parametrize("extra", [{"use_dora": True}, {"use_rslora": True, "target_modules": ["q_proj", "down_proj"],
                                                         "r": 2, "lora_alpha": 3}], ids=["dora", "rslora-subset"])
def test_peft_options_pass_through(setup, extra):
    """DoRA's magnitude vectors and rsLoRA's ``alpha / sqrt(r)`` scaling train as peft defines them."""
    peft = {**PEFT, **extra}
    module, init = _fit(setup, 2, 2, peft=peft)
    reference = reference_lora(setup["model_dir"], peft, init, [setup["ids"]] * STEPS)
    got = adapter_params(module.model)
    diff = max_abs_diff(got, adapter_params(reference))
    print(f"{extra}: {len(got)} trained tensors, max |adapter - reference| = {diff:.3e}")
    assert diff < TOL
    assert any("magnitude" in n for n in got) == bool(extra.get("use_dora"))
    if "r" in extra:  # only the targeted layers carry adapters, of the given rank
        assert {n.split(".")[-4] for n in got} == {"q_proj", "down_proj"}
        assert all(min(v.shape) == 2 for v in got.values())
    _check_base_untouched(setup, module)


def test_micro_batch_means_would_be_caught(setup):
    """The reference with a mean of micro-batch means (2 rows each) lands far from the global token mean's."""
    init = random_adapters(setup["model_dir"], PEFT)

    def naive(model, rows):
        sums, counts = row_losses(model, rows)
        return ((sums[0] + sums[1]) / (counts[0] + counts[1]) + (sums[2] + sums[3]) / (counts[2] + counts[3])) / 2

    right = adapter_params(reference_lora(setup["model_dir"], PEFT, init, [setup["ids"]] * STEPS))
    wrong = adapter_params(reference_lora(setup["model_dir"], PEFT, init, [setup["ids"]] * STEPS, loss=naive))
    gap = max_abs_diff(right, wrong)
    print(f"mean of micro-batch means: max |adapter diff| = {gap:.3e}")
    assert gap > 1000 * TOL


def test_adapted_model_starts_as_the_base(setup):
    """peft's init (``lora_B = 0``) as lit_sft builds it: the adapted model's logits equal the base's."""
    from lit_sft import SFTModule

    module = SFTModule(setup["model_dir"], torch_dtype="float32", attn_implementation="sdpa", peft=PEFT)
    module.configure_model()
    x = torch.tensor([setup["ids"][0]])
    with torch.no_grad():
        adapted = module.model.eval()(input_ids=x).logits
        base = load_model(setup["model_dir"]).eval()(input_ids=x).logits
    assert torch.equal(adapted, base)
    assert all(v.abs().max() == 0 for n, v in adapter_params(module.model).items() if "lora_B" in n)


def test_lora_matmul_params_count_frozen_weights_at_two_thirds(setup):
    from lit_sft import SFTModule
    from lit_sft.lora import lora_matmul_params
    from lit_sft.metrics import matmul_params

    module = SFTModule(setup["model_dir"], torch_dtype="float32", attn_implementation="sdpa", peft=PEFT)
    module.configure_model()
    base = load_model(setup["model_dir"])
    frozen = matmul_params(base)  # every nn.Linear of the plain model (projections + lm_head)
    adapters = sum(p.numel() for p in adapter_params(module.model).values())
    assert lora_matmul_params(module.model) == pytest.approx(frozen * 2 / 3 + adapters, rel=1e-12)
    assert module._flops_args[0] == lora_matmul_params(module.model)


@pytest.mark.parametrize("peft,match", [
    ({"method": "prefix_tuning", "r": 4}, r"model\.peft\.method='prefix_tuning'"),
    ({"r": 4, "rank": 8}, r"model\.peft\.rank: not a field of peft's LoraConfig"),
    ({"r": 4, "task_type": "SEQ_CLS"}, r"model\.peft\.task_type is set by lit_sft"),
    ({"r": 4, "load_in_4bit": True}, r"model\.load_in_4bit"),
    ({"r": 4, "layers_pattern": "layers"}, r"LoraConfig refuses it"),
], ids=["method", "unknown-key", "set-by-lit-sft", "4bit-inside-peft", "peft-refuses"])
def test_bad_peft_keys_are_named(setup, peft, match):
    from lit_sft import SFTModule

    with pytest.raises(ValueError, match=match):
        SFTModule(setup["model_dir"], peft=peft)


def test_peft_needs_a_pretrained_base(setup):
    from lit_sft import SFTModule

    with pytest.raises(ValueError, match="model_name_or_path"):
        SFTModule(setup["model_dir"], random_init=True, peft=PEFT)
    with pytest.raises(ValueError, match="model_name_or_path"):
        SFTModule(None, model_config={"model_type": "qwen2"}, peft=PEFT)


def test_load_in_4bit_is_refused_before_the_model_is_built(setup, monkeypatch):
    """QLoRA without adapters, without bitsandbytes, or without a GPU stops in ``SFTModule.__init__``."""
    import importlib.util

    from lit_sft import SFTModule

    with pytest.raises(ValueError, match="set model.peft too"):
        SFTModule(setup["model_dir"], load_in_4bit=True)
    real = importlib.util.find_spec

    def bitsandbytes(present):
        fake = object() if present else None
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: fake if name == "bitsandbytes" else real(name, *a))

    bitsandbytes(False)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        SFTModule(setup["model_dir"], load_in_4bit=True, peft=PEFT)
    bitsandbytes(True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        SFTModule(setup["model_dir"], load_in_4bit=True, peft=PEFT)


def test_quantization_config_is_qlora():
    from lit_sft.lora import quantization_config

    config = quantization_config()
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_lora_config_passes_fields_through():
    from lit_sft.lora import lora_config as build

    config = build({"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear",
                    "modules_to_save": ["lm_head"], "use_rslora": True, "use_dora": True}, "base/path", "main")
    assert (config.r, config.lora_alpha, config.lora_dropout, config.target_modules) == (16, 32, 0.05, "all-linear")
    assert config.modules_to_save == ["lm_head"] and config.use_rslora and config.use_dora
    assert config.task_type == "CAUSAL_LM" and config.base_model_name_or_path == "base/path"
    assert lora_config(PEFT).r == build(PEFT).r


def test_qwen_lora_overlay(capsys, monkeypatch):
    """``configs/qwen_lora.yaml`` over the recipe: the recipe's keys stay, ``model.peft`` becomes a LoraConfig, and
    ``run.merge_adapter`` reaches the export callback."""
    import yaml

    from conftest import ROOT
    from lit_sft import SFTModule
    from lit_sft.cli import main

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/qwen_zero3.yaml", "--config", "configs/qwen_lora.yaml", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    with open("configs/qwen_lora.yaml") as f:
        overlay = yaml.safe_load(f)
    assert printed["model"]["peft"] == overlay["model"]["peft"] and printed["run"]["merge_adapter"] is True
    assert printed["data"]["max_tokens_per_micro_batch"] == 65536 and printed["model"]["use_liger_kernel"] is True
    config = SFTModule(**{**printed["model"], "model_name_or_path": "Qwen/Qwen2.5-1.5B-Instruct"}).adapter_config
    assert (config.r, config.lora_alpha, config.target_modules) == (16, 32, "all-linear")


def test_load_in_4bit_on_a_cpu_trainer_is_refused_before_the_model_is_built(setup, monkeypatch):
    """On a GPU machine with ``trainer.accelerator: cpu`` (or partitioned ZeRO-3), ``configure_model`` stops before
    loading anything."""
    import importlib.util

    import lightning as L

    from lit_sft import SFTModule

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    module = SFTModule(setup["model_dir"], load_in_4bit=True, peft=PEFT)
    module.trainer = L.Trainer(accelerator="cpu", logger=False)
    with pytest.raises(ValueError, match="QLoRA.*CUDA GPUs with whole parameters"):
        module.configure_model()
    assert module.model is None


def test_adapter_on_lm_head_is_refused_with_fused_loss(setup):
    """Liger's fused cross-entropy reads ``lm_head.weight`` directly: an adapter there would never train."""
    from lit_sft.lora import add_adapters, lora_config as build

    with pytest.raises(ValueError, match="adapts lm_head"):
        add_adapters(load_model(setup["model_dir"]), build({"r": 2, "target_modules": ["lm_head", "q_proj"]}),
                     fused_loss=True)
    add_adapters(load_model(setup["model_dir"]), build({"r": 2, "target_modules": ["lm_head", "q_proj"]}))  # chunked


def test_dropout_bytes_per_token(setup):
    """LoRA dropout keeps each adapted layer's dropped input (2 bytes) and mask (1 byte) per token."""
    from lit_sft.lora import add_adapters, dropout_bytes_per_token, lora_config as build

    model = load_model(setup["model_dir"])
    config = model.config
    none = add_adapters(load_model(setup["model_dir"]), build(PEFT))
    some = add_adapters(model, build({**PEFT, "lora_dropout": 0.1}))
    d, i = config.hidden_size, config.intermediate_size
    assert dropout_bytes_per_token(none, 2) == 0
    assert dropout_bytes_per_token(some, 2) == 3 * (6 * d + i)  # q, k, v, o, gate, up read d; down reads i
