"""The export of a LoRA run (``model.peft``): the adapter in peft's format and, with ``run.merge_adapter: true``, the
merged 16-bit Hugging Face model.

``output_dir`` gets the adapter folder that ``peft.PeftModel.from_pretrained(base, output_dir)`` (and
``AutoModelForCausalLM.from_pretrained(output_dir)`` with peft installed) loads: ``adapter_config.json`` (with
``base_model_name_or_path``), ``adapter_model.safetensors`` (the trained weights only), the tokenizer and the model
card (lit_sft's, completed by peft's ``create_or_update_model_card``: ``library_name: peft``, the base model, a
``lora`` tag). With ``run.merge_adapter: true``, ``output_dir/merged`` gets a plain transformers folder written
like a full fine-tuning export (:func:`lit_sft.export.save_hf_folder`: tied embeddings, generation EOS, model card,
``export_format``), whose weights are the base's with each adapter folded in by peft's ``merge_and_unload``.

Where the base weights of the merge come from: the model in training memory (gathered from ZeRO-3), rebuilt on the
``meta`` device and filled with those tensors (``load_state_dict(assign=True)``), so nothing is allocated twice and
the training model is never modified (peft's ``safe_merge`` writes each merged weight to a new tensor); a 4-bit
(QLoRA) base is not merged into its quantised weights but into the 16-bit base rebuilt from ``model_name_or_path``
(the QLoRA paper's and peft's recommended merge).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Optional

import torch

from lit_sft.lora import base_causal_lm, trainable_names

MERGED_DIR = "merged"
"""Subfolder of ``output_dir`` that holds the merged model (``run.merge_adapter: true``)."""


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether the base holds bitsandbytes 4/8-bit weights."""
    base = base_causal_lm(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def adapter_state(peft_model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained parameters of ``state_dict`` (keyed as ``peft_model.state_dict()``).

    Raises:
        KeyError: a trained parameter is missing from ``state_dict``.
    """
    names = trainable_names(peft_model)
    missing = [n for n in names if n not in state_dict]
    if missing:
        raise KeyError(f"the weights to export lack trained adapter parameters: {missing[:3]}")
    return {n: state_dict[n] for n in names}


def merged_model(peft_model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                 base_loader: Optional[Callable[[], torch.nn.Module]] = None) -> torch.nn.Module:
    """The causal LM with the adapter merged into the base weights (CPU tensors), built apart from ``peft_model``.

    Args:
        peft_model: the trained ``PeftModel`` (its config, adapter config and generation config are used; it is not
            modified).
        state_dict: its full state (``peft_model.state_dict()`` keys, base and adapter, e.g. gathered from ZeRO-3).
        base_loader: builds the 16-bit base from ``model_name_or_path``; used for a quantised base only.

    Raises:
        ValueError: a quantised base without ``base_loader``, or weights missing from ``state_dict``.
    """
    from peft import get_peft_model

    config = copy.deepcopy(peft_model.peft_config[peft_model.active_adapter])
    config.inference_mode = False
    hf = base_causal_lm(peft_model)
    if is_quantized(peft_model):
        if base_loader is None:
            raise ValueError("merging a QLoRA adapter needs the 16-bit base (model_name_or_path)")
        fresh = get_peft_model(base_loader(), config)
        _, unexpected = fresh.load_state_dict(adapter_state(peft_model, state_dict), strict=False)
        if unexpected:
            raise ValueError(f"the adapter does not fit the rebuilt 16-bit base: {unexpected[:3]}")
    else:
        with torch.device("meta"):
            fresh = get_peft_model(type(hf)(copy.deepcopy(hf.config)), config)
        fresh.load_state_dict(state_dict, strict=False, assign=True)
        fresh.get_base_model().tie_weights()  # a tied lm_head follows the assigned embeddings
    merged = fresh.merge_and_unload(safe_merge=True)  # out of place: the assigned tensors are the training model's
    empty = [n for n, p in merged.named_parameters() if p.is_meta]
    if empty:
        raise ValueError(f"the weights to merge lack {empty[:3]}")
    merged.generation_config = copy.deepcopy(hf.generation_config)
    return merged


def save_adapter_folder(output_dir: str, peft_model: Any, state_dict: dict[str, torch.Tensor], tokenizer: Any,
                        card: str, dtype: Optional[torch.dtype] = None) -> None:
    """Write the adapter folder (rank 0 only): lit_sft's model card (completed by peft), the adapter's config and
    weights (cast to ``dtype`` if given), the tokenizer."""
    from lit_sft.export import follow_umask

    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write(card)
    adapter = adapter_state(peft_model, state_dict)
    if dtype is not None:
        adapter = {k: v.to(dtype) if v.is_floating_point() else v for k, v in adapter.items()}
    peft_model.save_pretrained(output_dir, state_dict=adapter, safe_serialization=True)
    follow_umask(output_dir)
    tokenizer.save_pretrained(output_dir)


def save_lora_export(output_dir: str, peft_model: Any, state_dict: dict[str, torch.Tensor], tokenizer: Any,
                     card: str, dtype: Optional[torch.dtype] = None, export_format: str = "compatible",
                     merge: bool = False, base_loader: Optional[Callable[[], torch.nn.Module]] = None) -> None:
    """The export of a LoRA run (rank 0 only): the adapter folder in ``output_dir`` and, with ``merge``, the merged
    model in ``output_dir/merged`` (see the module docstring)."""
    from lit_sft.export import save_hf_folder

    save_adapter_folder(output_dir, peft_model, state_dict, tokenizer, card, dtype)
    if merge:
        merged = merged_model(peft_model, state_dict, base_loader)
        merged.config.use_cache = True
        save_hf_folder(os.path.join(output_dir, MERGED_DIR), merged, merged.state_dict(), tokenizer, card, dtype,
                       export_format)


def load_adapter_weights(peft_model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's trained parameters (``peft_model.state_dict()`` keys) into ``peft_model``; other keys
    (the base's buffers a DeepSpeed checkpoint carries) are ignored.

    Raises:
        RuntimeError: the checkpoint lacks adapter parameters of this model (another ``model.peft``).
    """
    names = trainable_names(peft_model)
    missing = [n for n in names if n not in state_dict]
    if missing:
        raise RuntimeError(f"the checkpoint does not hold this model.peft's adapter: it lacks {missing[:3]} "
                           f"({len(missing)} of {len(names)}); export with the model.peft the run was trained with")
    peft_model.load_state_dict({n: state_dict[n] for n in names}, strict=False)
