"""Attention for padding-free batches: rows concatenated into one sequence, attention never crossing rows.

A padding-free micro-batch is ``input_ids`` ``[1, N]`` holding rows of lengths ``T_1..T_B`` (``N = sum T_i``), with
``position_ids`` restarting at 0 for each row and ``cu_seq_lens_q/k = [0, T_1, T_1+T_2, ..., N]`` (int32), the
names transformers' ``FlashAttentionKwargs`` use, so every backend below receives them through the model's
``**kwargs``:

- ``flash_attention_2/3`` (flash-attn installed): transformers' varlen path.
- ``lit_sft_varlen`` (registered here with transformers' ``AttentionInterface``): PyTorch's own
  ``torch.nn.attention.varlen.varlen_attn`` on CUDA (FLOPs only within rows); on CPU, where that kernel does not
  run, an exact per-row ``scaled_dot_product_attention`` loop.
- ``sdpa`` and ``eager``: exact too when the model is called as training calls it, with no attention mask and
  ``use_cache=False``: transformers' ``masking_utils._preprocess_mask_arguments`` then looks for packed sequences
  (``find_packed_sequence_indices``: a new row wherever ``position_ids`` do not step by 1) and ``create_causal_mask``
  builds a block-diagonal causal mask. Measured with ``benchmarks/probe_packed_attention.py`` (tiny Qwen2, six rows,
  fp32 CPU, transformers 5.24, training mode): packed vs each row alone, max |logits diff| 3.6e-7 (sdpa) and 2.4e-7
  (eager), max |grad diff| 2.1e-6 and 1.7e-6 (largest gradient 7.3), the same level as ``lit_sft_varlen``
  (2.4e-7, 1.4e-6); on the H200 with transformers 5.17 (torch 2.11) fp32 gives 3.6e-7/3.3e-6 (sdpa) and
  3.0e-7/2.4e-6 (eager), and bf16 gives logits 0 and grads 0.031 for sdpa, eager and ``lit_sft_varlen`` alike (bf16
  rounding of the summed gradients). With the KV cache on (inference) transformers skips the detection and the rows
  attend across the concatenation (logits 0.74-0.80 apart); training never passes a cache.
  :func:`packed_rows_isolated_by_mask` re-checks this on the installed transformers, so the rule follows the
  library, not a version number. They hold a dense ``N x N`` mask and spend the FLOPs of the whole concatenation,
  so the varlen kernels stay the default.

Any other backend is refused for padding-free batches (:func:`check_isolates_rows`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

import torch
import torch.nn.functional as F

VARLEN = "lit_sft_varlen"
ISOLATING_BACKENDS = ("flash_attention_2", "flash_attention_3", VARLEN)  # read cu_seq_lens: rows never meet
MASK_BACKENDS = ("sdpa", "eager")  # exact through transformers' packed-sequence mask (see the module docstring)


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


@functools.lru_cache(maxsize=None)
def packed_rows_isolated_by_mask() -> bool:
    """Whether the installed transformers keeps padding-free rows apart for ``sdpa`` and ``eager`` in training.

    Checked, not assumed: a two-layer Qwen2 (random weights, fp32, CPU, ~50 ms) runs three rows of lengths 5, 1 and
    7 packed (``position_ids`` restarting per row, no attention mask, ``use_cache=False``, as ``SFTModule`` calls
    the model) and each row alone; the logits must agree to 1e-5 for both backends. This holds when
    ``transformers.masking_utils`` detects packed sequences from ``position_ids`` (``find_packed_sequence_indices``
    inside ``_preprocess_mask_arguments``; present in 4.57 and 5.24) and is false on versions without it. The mask
    code is device-independent Python, so the CPU check covers GPUs too.
    """
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401  (what finds the rows)
    except ImportError:
        return False
    config = AutoConfig.for_model("qwen2", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 64, (n,), generator=generator) for n in (5, 1, 7)]
    packed_ids = torch.cat(rows)[None]
    positions = torch.cat([torch.arange(len(r)) for r in rows])[None]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        for backend in ("sdpa", "eager"):
            model.set_attn_implementation(backend)
            alone = torch.cat([model(input_ids=r[None], use_cache=False).logits[0] for r in rows])
            packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits[0]
            if not torch.allclose(packed, alone, atol=1e-5, rtol=0):
                return False
    return True


def check_isolates_rows(attn_implementation: Optional[str]) -> None:
    """Refuse an attention backend that is not known to keep padding-free rows apart.

    Accepted: ``flash_attention_2/3`` and ``lit_sft_varlen`` (they read ``cu_seq_lens``), and ``sdpa``/``eager``
    when :func:`packed_rows_isolated_by_mask` holds for the installed transformers.

    Raises:
        ValueError: naming ``model.attn_implementation``, why the backend does not isolate rows, and the backends
            that work.
    """
    if attn_implementation in ISOLATING_BACKENDS:
        return
    if attn_implementation in MASK_BACKENDS and packed_rows_isolated_by_mask():
        return
    import transformers

    reason = (f"transformers {transformers.__version__} does not build a per-row mask from position_ids for it "
              "(transformers.masking_utils.find_packed_sequence_indices)" if attn_implementation in MASK_BACKENDS
              else "it is not known to read the row boundaries (cu_seq_lens) or position_ids")
    raise ValueError(
        f"model.attn_implementation={attn_implementation!r} would let the rows of a padding-free batch attend to each "
        f"other ({reason}), which data.padding_free and data.packing need to prevent; use model.attn_implementation: "
        f"{VARLEN} (PyTorch's varlen attention) or one of {list(ISOLATING_BACKENDS)}, or set data.padding_free: false "
        "and data.packing: false"
    )
