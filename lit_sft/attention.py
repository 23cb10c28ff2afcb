"""Attention for padding-free batches: rows concatenated into one sequence, attention never crossing rows.

A padding-free micro-batch is ``input_ids`` ``[1, N]`` holding rows of lengths ``T_1..T_B`` (``N = sum T_i``), with
``position_ids`` restarting at 0 for each row and ``cu_seq_lens_q/k = [0, T_1, T_1+T_2, ..., N]`` (int32), the
names transformers' ``FlashAttentionKwargs`` use, so every backend below receives them through the model's
``**kwargs``:

- ``flash_attention_2/3`` (flash-attn installed): transformers' varlen path.
- ``lit_sft_varlen`` (registered here with transformers' ``AttentionInterface``): PyTorch's own
  ``torch.nn.attention.varlen.varlen_attn`` on CUDA (FLOPs only within rows); on CPU, where that kernel does not
  run, an exact per-row ``scaled_dot_product_attention`` loop.

``sdpa`` and ``eager`` do not isolate rows here: with transformers 5.24 a Qwen2 forward given packed
``position_ids`` and no mask attends across the concatenation (measured: logits of packed rows differ from the rows
alone by ~0.3). They, and any other backend, are refused for padding-free batches (:func:`check_isolates_rows`).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.nn.functional as F

VARLEN = "lit_sft_varlen"
ISOLATING_BACKENDS = ("flash_attention_2", "flash_attention_3", VARLEN)


def _varlen_kernel() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


def _per_row_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq: torch.Tensor,
                  scaling: Optional[float]) -> torch.Tensor:
    """q ``[N, H, D]``, k/v ``[N, H, D]`` (kv heads already repeated) -> ``[N, H, D]``, causal within each row."""
    out = torch.empty_like(q)
    bounds = cu_seq.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        rows = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [H, T, D]
        out[start:end] = F.scaled_dot_product_attention(*rows, is_causal=True, scale=scaling).transpose(0, 1)
    return out


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function for padding-free batches.

    Args:
        query: ``[1, H, N, D]``; key, value: ``[1, H_kv, N, D]`` (grouped-query attention allowed).
        attention_mask: must be ``None`` (padding-free batches carry no mask).
        kwargs: ``cu_seq_lens_q`` ``[B+1]`` int32 and ``max_length_q`` (int); without them the whole sequence is
            one row.

    Returns:
        ``(attn_output [1, N, H, D], None)`` as transformers' attention functions do.

    Raises:
        ValueError: a padded batch (an attention mask or batch size > 1) reached this backend.
    """
    if attention_mask is not None or query.shape[0] != 1:
        raise ValueError(f"attn_implementation={VARLEN!r} runs padding-free batches only: set data.padding_free: true")
    if dropout:
        raise ValueError(f"{VARLEN} does not implement attention dropout")
    n = query.shape[2]
    cu_seq = kwargs.get("cu_seq_lens_q")
    if cu_seq is None:
        cu_seq = torch.tensor([0, n], dtype=torch.int32, device=query.device)
    max_len = int(kwargs.get("max_length_q") or n)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [N, H, D]
    groups = q.shape[1] // k.shape[1]
    kernel = _varlen_kernel() if q.is_cuda else None
    if kernel is None:
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = _per_row_sdpa(q, k, v, cu_seq, scaling)
    else:
        params = inspect.signature(kernel).parameters
        extra: dict[str, Any] = {"scale": scaling}
        if "window_size" in params:
            extra["window_size"] = (-1, 0)  # causal
        else:
            extra["is_causal"] = True
        if groups > 1:
            if "enable_gqa" in params:
                extra["enable_gqa"] = True
            else:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        cu_seq = cu_seq.to(torch.int32)
        out = kernel(q, k, v, cu_seq, cu_seq, max_len, max_len, **extra)
    return out.unsqueeze(0), None


def register_varlen_attention() -> None:
    """Register ``lit_sft_varlen`` with transformers (attention function + flash-style mask: none when causal)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, flash_attention_mask)


def check_isolates_rows(attn_implementation: Optional[str]) -> None:
    """Refuse an attention backend that is not known to keep padding-free rows apart.

    Raises:
        ValueError: naming ``model.attn_implementation`` and the backends that work.
    """
    if attn_implementation not in ISOLATING_BACKENDS:
        raise ValueError(
            f"model.attn_implementation={attn_implementation!r} cannot be shown to keep the rows of a padding-free "
            f"batch apart (attention would cross rows), which data.padding_free and data.packing need; use "
            f"model.attn_implementation: {VARLEN} (PyTorch's varlen attention) or one of {list(ISOLATING_BACKENDS)}, "
            "or set data.padding_free: false and data.packing: false"
        )
