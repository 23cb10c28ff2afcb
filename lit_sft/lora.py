"""LoRA and QLoRA with peft: ``model.peft`` trains low-rank adapters on a frozen base, on the same data, loss and
optimizer-step machinery as full fine-tuning.

lit_sft writes no adapter layers of its own; everything here configures peft and keeps the rest of the stack exact:

* **Config** (:func:`lora_config`): ``model.peft`` holds peft's ``LoraConfig`` field names (``r``, ``lora_alpha``,
  ``lora_dropout``, ``target_modules``, ``modules_to_save``, ``use_rslora``, ``use_dora``, ...), passed through, plus
  ``method: lora`` (the only method). An unknown key is an error naming it.
* **QLoRA** (:func:`check_load_in_4bit`, :func:`quantization_config`): ``model.load_in_4bit: true`` loads the base
  with bitsandbytes' NF4, double quantisation and bf16 compute (the QLoRA paper's setting, TRL's
  ``get_quantization_config``); GPU only, checked before the model is built.
* **Adapters on the model** (:func:`add_adapters`): ``peft.get_peft_model`` after the base is built. Under DeepSpeed
  ZeRO-3 ``SFTModule.configure_model`` runs inside ``deepspeed.zero.Init``, which would partition the adapter
  weights at construction, before peft initialises them (``lora_B = 0`` would land on an empty placeholder and
  leave the random ``nn.Linear`` init: the adapted model would not start equal to the base). So the adapters are
  created outside ``zero.Init``'s module patching (DeepSpeed's ``shutdown_init_context``), whole, as TRL/accelerate
  create them after ``from_pretrained``; ``deepspeed.initialize`` then partitions them (broadcast from rank 0), and
  the frozen base stays partitioned as loaded. Only the adapter weights require grad, so only they reach AdamW and
  DeepSpeed's optimizer partitions. Under DeepSpeed the adapters take the base's dtype (peft's
  ``autocast_adapter_dtype=False``, as TRL under ZeRO-3: ZeRO-3 gathers persistent parameters in one dtype; DeepSpeed
  keeps fp32 master weights of what trains anyway); otherwise peft keeps them in fp32 on a 16-bit base. QLoRA
  adapters are bf16 (as TRL, following the QLoRA paper). With gradient checkpointing the input embeddings' output
  requires grad (``enable_input_require_grads``), so that reentrant recomputation reaches the adapters.
* **What a checkpoint holds**: the trainable parameters and their optimizer state only (``SFTModule.state_dict``
  leaves the frozen base out, tied copies included; DeepSpeed saves with ``exclude_frozen_parameters``), plus
  :func:`adapter_checkpoint_record`, which :func:`check_adapter_checkpoint` compares on load. The base is rebuilt
  from ``model_name_or_path`` on resume, which is why ``random_init`` is refused with ``model.peft``.
* **ZeRO-3 and recomputation**: a frozen weight that ZeRO-3 partitions breaks PyTorch's non-reentrant checkpoint
  (deepspeedai/DeepSpeed#4332). DeepSpeed 0.19.8 handles it inside the decoder layers; lit_sft's chunked loss
  recomputes ``lm_head`` reentrantly then (:func:`lit_sft.loss.chunked_token_loss_sum`).
* **MFU** (:func:`lora_matmul_params`): a frozen weight costs 4 FLOPs per token (forward, and the gradient of its
  input), not 6: it gets no weight gradient.

The exported folders (the adapter in peft's format, and with ``run.merge_adapter`` the merged 16-bit model) are
written by :mod:`lit_sft.export_adapter`.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
from contextlib import contextmanager
from typing import Any, Generator, Mapping, Optional

import torch

METHODS = ("lora",)
"""``model.peft.method`` values (peft's LoRA; DoRA and rsLoRA are its ``use_dora`` / ``use_rslora`` options)."""

_SET_HERE = {"peft_type": "method", "task_type": "CAUSAL_LM (always)", "base_model_name_or_path":
             "model.model_name_or_path", "revision": "model.model_revision", "inference_mode": "false (training)"}


def lora_fields() -> list[str]:
    """The ``LoraConfig`` field names ``model.peft`` accepts (those lit_sft sets itself excluded)."""
    from peft import LoraConfig

    return [f.name for f in dataclasses.fields(LoraConfig) if f.init and f.name not in _SET_HERE
            and f.name not in ("auto_mapping", "peft_version")]


def lora_config(peft: Mapping[str, Any], model_name_or_path: Optional[str] = None,
                revision: Optional[str] = None) -> Any:
    """``model.peft`` as a ``peft.LoraConfig`` for a causal LM.

    Args:
        peft: ``{method: lora, r: 16, lora_alpha: 32, target_modules: all-linear, ...}``; every key but ``method`` is
            a ``LoraConfig`` field, passed through unchanged (peft's defaults for the others: ``r`` 8, ``lora_alpha``
            8, ``lora_dropout`` 0, ``target_modules`` the architecture's default, for Qwen2 ``q_proj``/``v_proj``).
        model_name_or_path, revision: recorded in the adapter's ``adapter_config.json``.

    Raises:
        ImportError: peft is not installed (the message names the extra).
        ValueError: a ``method`` other than ``lora``, a key that is not a ``LoraConfig`` field (or one lit_sft sets
            itself), or a value peft rejects; each message names ``model.peft.<key>``.
    """
    if importlib.util.find_spec("peft") is None:
        raise ImportError("model.peft needs the peft package: pip install 'lit_sft[lora]' (or pip install peft)")
    from peft import LoraConfig

    values = dict(peft)
    method = values.pop("method", "lora")
    if method not in METHODS:
        raise ValueError(f"model.peft.method={method!r}: lit_sft trains {list(METHODS)} adapters (DoRA: "
                         "use_dora: true, rsLoRA: use_rslora: true)")
    if "load_in_4bit" in values:
        raise ValueError("model.peft.load_in_4bit: QLoRA is a model key: set model.load_in_4bit: true")
    ours = sorted(set(values) & set(_SET_HERE))
    if ours:
        raise ValueError(f"model.peft.{ours[0]} is set by lit_sft ({_SET_HERE[ours[0]]}); remove it")
    known = lora_fields()
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"model.peft.{unknown[0]}: not a field of peft's LoraConfig (known: {known})")
    try:
        return LoraConfig(task_type="CAUSAL_LM", base_model_name_or_path=model_name_or_path, revision=revision,
                          **values)
    except (ValueError, TypeError) as err:
        raise ValueError(f"model.peft={dict(peft)!r}: peft's LoraConfig refuses it: {err}") from err


def check_load_in_4bit(load_in_4bit: bool, peft: Optional[Mapping[str, Any]]) -> None:
    """Refuse, before anything is built, a 4-bit base that cannot train or cannot load here.

    Raises:
        ValueError: ``load_in_4bit`` without ``model.peft`` (a 4-bit base cannot be fine-tuned itself).
        ImportError: bitsandbytes is not installed.
        RuntimeError: no CUDA GPU (bitsandbytes' 4-bit kernels are lit_sft's GPU-only path).
    """
    if not load_in_4bit:
        return
    if not peft:
        raise ValueError("model.load_in_4bit=true (QLoRA) trains adapters on a frozen 4-bit base: set model.peft too "
                         "(e.g. {method: lora, r: 16, lora_alpha: 32, target_modules: all-linear})")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("model.load_in_4bit=true (QLoRA) needs bitsandbytes: pip install bitsandbytes "
                          "(or set model.load_in_4bit: false for LoRA on a 16-bit base)")
    if not torch.cuda.is_available():
        raise RuntimeError("model.load_in_4bit=true (QLoRA) needs a CUDA GPU (bitsandbytes' NF4 kernels); on this "
                           "machine set model.load_in_4bit: false (LoRA on a 16-bit base)")


def quantization_config() -> Any:
    """transformers' ``BitsAndBytesConfig`` for QLoRA: NF4 weights, double quantisation of the scales, bf16 compute
    (Dettmers et al. 2023, "QLoRA"; TRL's ``get_quantization_config`` with ``bnb_4bit_quant_type: nf4``,
    ``use_bnb_nested_quant: true``)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


@contextmanager
def outside_zero_init() -> Generator[None, None, None]:
    """Suspend ``deepspeed.zero.Init``'s module patching while inside it (no-op otherwise): modules built here keep
    whole parameters (DeepSpeed's own ``shutdown_init_context``/``restore_init_context``, made to initialise an
    engine inside ``Init``)."""
    try:
        from deepspeed.runtime.zero import partition_parameters as zero
    except ImportError:
        yield
        return
    if zero.top_level_context is None:
        yield
        return
    zero.shutdown_init_context()
    try:
        yield
    finally:
        zero.restore_init_context()


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (without importing peft when it is absent)."""
    if importlib.util.find_spec("peft") is None:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def base_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM: ``model`` itself, or the one under a peft model's adapters (its submodules hold
    the adapter layers; its ``base_model`` is the decoder stack without ``lm_head``)."""
    return model.get_base_model() if is_peft_model(model) else model


def add_adapters(model: torch.nn.Module, config: Any, deepspeed: bool = False, quantized: bool = False,
                 gradient_checkpointing: bool = False, fused_loss: bool = False) -> torch.nn.Module:
    """Wrap a built causal LM with peft's LoRA adapters (see the module docstring for ZeRO-3 and dtypes) and log
    how many parameters train.

    Args:
        model: the transformers causal LM (possibly partitioned by ZeRO-3, possibly 4-bit).
        config: a ``peft.LoraConfig`` (:func:`lora_config`).
        deepspeed: trained under a DeepSpeed strategy (adapters in the base's dtype).
        quantized: the base is 4-bit (adapters in bf16, the DoRA magnitude in fp32).
        gradient_checkpointing: make the input embeddings' output require grad.
        fused_loss: the loss is Liger's fused linear cross-entropy, which reads ``lm_head.weight`` directly.

    Returns:
        The ``peft.PeftModelForCausalLM``; only adapter (and ``modules_to_save``) parameters require grad.

    Raises:
        ValueError: an adapter on ``lm_head`` with ``fused_loss`` (it would never train).
    """
    from lightning.pytorch.utilities import rank_zero_info
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    autocast = not (deepspeed and not quantized)
    with outside_zero_init():  # peft resolves target_modules into the config it keeps: give it a copy
        peft_model = get_peft_model(model, copy.deepcopy(config), autocast_adapter_dtype=autocast)
    if quantized:  # TRL: adapters in bf16 on a 4-bit base (peft's autocast_adapter_dtype=False is not for 4-bit)
        for name, param in peft_model.named_parameters():
            if param.requires_grad and "lora_magnitude_vector" not in name:
                param.data = param.data.to(torch.bfloat16)
    if gradient_checkpointing:
        base_causal_lm(peft_model).enable_input_require_grads()
    if fused_loss and isinstance(peft_model.get_output_embeddings(), BaseTunerLayer):
        raise ValueError("model.peft.target_modules adapts lm_head, which Liger's fused cross-entropy reads as a plain "
                         "weight (the adapter would never train): leave lm_head out of target_modules or set "
                         "model.use_liger_kernel: false")
    from peft.tuners.lora import LoraLayer

    def numel(p: torch.Tensor) -> int:  # ZeRO-3 shards and 4-bit packed weights count whole
        quant = getattr(p, "quant_state", None)
        return int(quant.shape.numel()) if quant is not None else getattr(p, "ds_numel", p.numel())

    trainable = sum(numel(p) for p in peft_model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in peft_model.parameters())
    layers = sum(isinstance(m, LoraLayer) for m in peft_model.modules())
    rank_zero_info(f"LoRA: {trainable:,} of {total:,} parameters train ({trainable / max(total, 1):.3%}): "
                   f"r={config.r}, lora_alpha={config.lora_alpha}, target_modules={config.target_modules!r} "
                   f"({layers} layers)"
                   f"{', on a 4-bit base (QLoRA)' if quantized else ''}")
    return peft_model


def trainable_names(model: torch.nn.Module, prefix: str = "") -> list[str]:
    """Names (with ``prefix``) of the parameters that train: what a LoRA checkpoint holds."""
    return [prefix + name for name, p in model.named_parameters() if p.requires_grad]


_SAME_FUNCTION = ("lora_alpha", "use_rslora", "alpha_pattern", "use_dora", "lora_bias")
"""Adapter settings that must match on resume besides the parameter shapes (they change what the weights compute)."""


def adapter_checkpoint_record(model: torch.nn.Module, config: Any, prefix: str = "model.") -> dict[str, Any]:
    """``checkpoint["lit_sft_adapter"]``: the shapes of the trained parameters by name (as in the module's
    ``state_dict``) and the adapter config (plain types), checked when the checkpoint is loaded
    (:func:`check_adapter_checkpoint`)."""
    plain = json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    shapes = {prefix + n: list(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters() if p.requires_grad}
    return {"trainable": shapes, "config": plain}


def check_adapter_checkpoint(checkpoint: Mapping[str, Any], model: torch.nn.Module, config: Any,
                             prefix: str = "model.") -> None:
    """Check that a checkpoint holds exactly the adapter this run trains, before its weights are used: the same
    trained parameters with the same shapes, and the same scaling settings (:data:`_SAME_FUNCTION`).

    Raises:
        ValueError: the checkpoint is a full-weight one, or its adapter differs (the message names the first
            differing parameters or settings, and the fix).
    """
    record = checkpoint.get("lit_sft_adapter")
    if record is None:
        raise ValueError("this checkpoint holds full weights (it was written without model.peft); resume it without "
                         "model.peft, or start the adapter run in a new run.output_dir")
    want = adapter_checkpoint_record(model, config, prefix)
    fix = "resume with the checkpoint's model.peft (its hyper_parameters hold it) or start a new run.output_dir"
    if want["trainable"] != record["trainable"]:
        differ = sorted(n for n in set(want["trainable"]) | set(record["trainable"])
                        if want["trainable"].get(n) != record["trainable"].get(n))
        shown = [(n, record["trainable"].get(n), want["trainable"].get(n)) for n in differ[:2]]
        raise ValueError(f"the checkpoint's adapter does not fit model.peft as given: {len(differ)} parameters differ, "
                         f"e.g. (name, checkpoint shape, shape now) {shown}; {fix}")
    changed = {k: (record["config"].get(k), want["config"].get(k)) for k in _SAME_FUNCTION
               if record["config"].get(k) != want["config"].get(k)}
    if changed:
        raise ValueError(f"the checkpoint's adapter does not fit model.peft as given: {changed} (checkpoint, now); "
                         f"{fix}")


def lora_matmul_params(model: torch.nn.Module) -> float:
    """Matmul parameters for the MFU formula's ``6 N`` (:func:`lit_sft.metrics.training_flops`), LoRA-aware: a
    trainable weight costs 6 FLOPs per token (forward 2, input gradient 2, weight gradient 2), a frozen one 4 (no
    weight gradient), so frozen weights count 2/3. ZeRO-3 shards count whole; a 4-bit weight counts its
    unquantised size (``in_features x out_features``)."""
    total = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight
            numel = getattr(weight, "ds_numel", None) or module.in_features * module.out_features
            total += numel if weight.requires_grad else numel * 2 / 3
    return total


def dropout_bytes_per_token(model: torch.nn.Module, num_layers: int) -> int:
    """Activation bytes per token and decoder layer that LoRA dropout adds until the backward pass: each adapted
    layer with ``lora_dropout > 0`` keeps its dropped input (16-bit) and the dropout mask (1 byte) for
    ``lora_A``'s weight gradient; without dropout ``lora_A`` reads the input its base layer already holds."""
    from peft.tuners.lora import LoraLayer

    total = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for dropout in module.lora_dropout.values():
                if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                    total += 3 * module.in_features
    return total // max(num_layers, 1)
