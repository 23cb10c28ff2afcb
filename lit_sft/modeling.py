"""Building the transformers causal LM: pretrained or from a config, sharded at construction under ZeRO-3.

Under DeepSpeed ZeRO-3 Lightning calls ``configure_model`` inside ``deepspeed.zero.Init``, so parameters are born
partitioned. ``from_pretrained`` inside that context alone is a known failure: the parameters come out with size 0
and the checkpoint is never loaded into the shards. transformers partitions *and* loads correctly only while a live
``HfDeepSpeedConfig`` exists (``transformers.integrations.is_deepspeed_zero3_enabled()``), which
:func:`build_causal_lm` creates and returns; the caller must keep it alive as long as the model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_sft.data.loading import resolve_path
from lit_sft.validation import InputError

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": "auto"}


def resolve_attn_implementation(requested: Optional[str], padding_free: bool = False) -> Optional[str]:
    """``flash_attention_2`` when flash-attn is importable; otherwise fall back, with a warning, to ``sdpa`` (padded
    batches) or to PyTorch's varlen attention ``lit_sft_varlen`` (padding-free batches; see ``lit_sft/attention.py``).

    The fallback keeps the recipe runnable on machines without a flash-attn build (its wheels are source-only); it
    computes the same function, only speed and memory differ. For padding-free batches the fallback is
    ``lit_sft_varlen`` on CPU too: ``sdpa`` is exact there as well (transformers' packed-sequence mask, checked by
    :func:`lit_sft.attention.packed_rows_isolated_by_mask`) and is accepted when asked for, but it holds an
    ``N x N`` mask for a micro-batch of ``N`` tokens where the per-row loop needs only the rows' own squares.

    Raises:
        ValueError: padding-free batches with a backend that does not keep rows apart
            (:func:`lit_sft.attention.check_isolates_rows`).
    """
    from lit_sft.attention import VARLEN, check_isolates_rows, register_varlen_attention

    register_varlen_attention()
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        fallback = VARLEN if padding_free else "sdpa"
        rank_zero_warn(f"model.attn_implementation=flash_attention_2 but flash-attn is not installed: using {fallback}")
        requested = fallback
    if padding_free:
        check_isolates_rows(requested)
    return requested


def load_config(model_name_or_path: Optional[str], revision: Optional[str], model_config: Optional[dict]) -> Any:
    """The model's ``PretrainedConfig``: loaded from ``model_name_or_path`` and updated with ``model_config``, or,
    without a path, built with ``AutoConfig.for_model(**model_config)`` (``model_config`` must hold ``model_type``).

    Raises:
        ValueError: neither a path nor a ``model_config`` with ``model_type``, or a key the config class does not have.
    """
    from transformers import AutoConfig

    overrides = dict(model_config or {})
    if model_name_or_path is None:
        if "model_type" not in overrides:
            raise ValueError("set model.model_name_or_path, or model.model_config with a 'model_type' key")
        config = AutoConfig.for_model(overrides.pop("model_type"))
    else:
        config = AutoConfig.from_pretrained(resolve_path(model_name_or_path), revision=revision)
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"model.model_config: {unknown} are not fields of {type(config).__name__} "
                         f"(known: {sorted(known)})")
    if not overrides:
        return config
    base = config.to_dict()
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        base.pop("layer_types", None)  # derived from num_hidden_layers: let the config class rebuild it
    return type(config).from_dict({**base, **overrides})


def check_random_init(model_name_or_path: Optional[str], random_init: bool) -> None:
    """Refuse ``random_init: true`` with a local ``model_name_or_path`` that holds weights: they would be ignored
    silently (e.g. ``lit_sft validate`` of an exported folder with the embedded default's config, which sets
    ``random_init: true``, scored random weights). A folder with only ``config.json``, or a hub id, is accepted.

    Raises:
        InputError: naming both keys.
    """
    if not random_init or model_name_or_path is None:
        return
    path = resolve_path(model_name_or_path)
    names = os.listdir(path) if os.path.isdir(path) else []
    if any(n.endswith((".safetensors", ".safetensors.index.json")) or n.startswith("pytorch_model") for n in names):
        raise InputError(f"model.random_init: true would ignore the weights in model.model_name_or_path="
                         f"{model_name_or_path!r}: set model.random_init false to load them (true builds the "
                         "architecture with random weights)")


def build_causal_lm(
    model_name_or_path: Optional[str],
    revision: Optional[str] = None,
    torch_dtype: str = "bfloat16",
    attn_implementation: Optional[str] = None,
    random_init: bool = False,
    model_config: Optional[dict] = None,
    zero3_config: Optional[dict] = None,
    padding_free: bool = False,
    quantization_config: Any = None,
) -> tuple[torch.nn.Module, Any]:
    """Create the causal LM, pretrained or randomly initialised, partitioned at birth under ZeRO-3.

    Args:
        model_name_or_path: hub id or local folder; ``None`` with ``model_config`` builds from a config alone.
        revision: hub revision.
        torch_dtype: ``bfloat16``, ``float16``, ``float32`` or ``auto``.
        attn_implementation: ``flash_attention_2``, ``sdpa``, ``eager`` (see :func:`resolve_attn_implementation`).
        random_init: build from the config with random weights (benchmarks, tests, the embedded default).
        model_config: config overrides, e.g. ``{"num_hidden_layers": 2}``.
        zero3_config: the DeepSpeed config dict when training with ZeRO-3, else ``None``.
        padding_free: batches will be padding-free (the attention backend must keep rows apart).
        quantization_config: a transformers quantization config for a pretrained base (QLoRA:
            :func:`lit_sft.lora.quantization_config`), placed on the current CUDA device by transformers.

    Returns:
        ``(model, hf_ds_config)``; keep ``hf_ds_config`` (``None`` without ZeRO-3) referenced as long as the model.
    """
    from transformers import AutoModelForCausalLM

    hf_ds_config = None
    if zero3_config is not None:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(zero3_config)
    if torch_dtype not in _DTYPES:
        raise ValueError(f"model.torch_dtype={torch_dtype!r}: use one of {sorted(_DTYPES)}")
    attn = resolve_attn_implementation(attn_implementation, padding_free)
    kwargs = dict(dtype=_DTYPES[torch_dtype], attn_implementation=attn)
    config = load_config(model_name_or_path, revision, model_config)
    if random_init or model_name_or_path is None:
        if quantization_config is not None:
            raise ValueError("model.load_in_4bit quantises pretrained weights: set model.model_name_or_path and "
                             "random_init: false")
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        if quantization_config is not None:
            kwargs.update(quantization_config=quantization_config, device_map={"": torch.cuda.current_device()})
        model = AutoModelForCausalLM.from_pretrained(
            resolve_path(model_name_or_path), revision=revision, config=config, **kwargs
        )
    return model, hf_ds_config


def apply_liger_kernels(model: torch.nn.Module, enabled: bool) -> bool:
    """Swap in Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) for this model instance.

    Uses ``liger_kernel.transformers._apply_liger_kernel_to_instance``, the entry point transformers' own
    ``Trainer`` calls for ``use_liger_kernel``. Liger's kernels need a CUDA GPU: on CPU this warns and keeps the
    plain path.

    Returns:
        Whether the kernels were applied (then the model's forward computes the loss without materialising logits).
    """
    if not enabled:
        return False
    if not torch.cuda.is_available():
        rank_zero_warn("model.use_liger_kernel=true needs a CUDA GPU; training with the plain PyTorch kernels")
        return False
    if importlib.util.find_spec("liger_kernel") is None:
        raise ImportError("model.use_liger_kernel=true needs the liger-kernel package: pip install liger-kernel")
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)
    return True


def count_parameters(model_name_or_path: Optional[str], revision: Optional[str] = None,
                     model_config: Optional[dict] = None) -> int:
    """Parameters of the model (tied weights once), counted on the meta device: nothing is allocated or loaded."""
    from transformers import AutoModelForCausalLM

    config = load_config(model_name_or_path, revision, model_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers that gradient checkpointing wraps (transformers' ``GradientCheckpointingLayer``s)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointed_layers(model: torch.nn.Module, count: int) -> int:
    """After ``gradient_checkpointing_enable``: keep recomputation on the first ``count`` decoder layers only (the
    others store their activations). Which layers recompute does not change the peak (every layer's activations
    live until the backward pass reaches it), only how many.

    Returns:
        The number of layers that recompute (``count`` clipped to ``[0, layers]``).
    """
    layers = decoder_layers(model)
    count = max(0, min(int(count), len(layers)))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < count
    return count


def activation_bytes_per_token(config: Any, liger: bool) -> tuple[int, int]:
    """Bytes one token costs in one decoder layer until the backward pass: ``(stored, checkpointed)``.

    ``stored`` counts what autograd saves in a Qwen2/Llama-style layer without recomputation, in 16-bit:
    the attention block's norm input and output, q, k, v and the attention output (``2d + 2 d_kv``), the MLP's norm
    input and output, and the MLP's gate, up and activation (``3 i``); with Liger's RMSNorm and SwiGLU kernels that is
    ``2 (6 d + 2 d_kv + 3 i)`` bytes (73.2 KB for Qwen2.5-1.5B: d 1536, d_kv 256, i 8960); PyTorch's own RMSNorm
    keeps fp32 copies and its SiLU one more ``i``: ``2 (6 d + 2 d_kv + 4 i) + 16 d``. ``checkpointed`` is the layer
    input a recomputing layer keeps (``2 d``).
    """
    d, i = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    d_kv = kv * (getattr(config, "head_dim", None) or d // heads)
    stored = 2 * (6 * d + 2 * d_kv + 3 * i) if liger else 2 * (6 * d + 2 * d_kv + 4 * i) + 16 * d
    return stored, 2 * d


def auto_checkpointed_layers(num_layers: int, tokens: int, stored: int, checkpointed: int, budget: int) -> int:
    """How many of ``num_layers`` decoder layers must recompute so that one micro-batch of ``tokens`` tokens keeps
    its activations within ``budget`` bytes: the fewest ``c`` with
    ``(num_layers - c) * tokens * stored + c * tokens * checkpointed <= budget``.
    """
    if tokens <= 0 or num_layers * tokens * stored <= budget:
        return 0
    saving = tokens * (stored - checkpointed)
    over = num_layers * tokens * stored - budget
    return min(num_layers, -(-over // saving))
