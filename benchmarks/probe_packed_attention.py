"""Probe: does an attention backend keep the rows of a padding-free batch apart in training mode?

A padding-free micro-batch is ``input_ids`` ``[1, N]`` (rows concatenated) with ``position_ids`` restarting at 0 per
row and no attention mask (``lit_sft.data.collate.PaddingFreeCollator``). For each backend this prints
max |packed - separate| of the logits and of the parameter gradients of the summed token loss, where "separate" is
each row run alone (batch of one, no padding). Training passes ``use_cache=False`` (``SFTModule.forward``,
``SFTModule.loss_sums``); the ``use_cache=True`` rows show the inference path for contrast, where transformers'
``masking_utils`` does not look for packed sequences.

    python benchmarks/probe_packed_attention.py                       # CPU, fp32
    python benchmarks/probe_packed_attention.py --device cuda --dtype bfloat16

On CUDA with 16-bit weights both sides carry rounding noise: compare a backend's number with the contamination
level (the ``use_cache=True`` rows, ~0.1-1) and with the other backends, not with zero. ``lit_sft_varlen`` needs a
16-bit dtype on CUDA (PyTorch's varlen kernel); ``flash_attention_2`` is probed when flash-attn is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from lit_sft.attention import VARLEN, packed_rows_isolated_by_mask, register_varlen_attention
from lit_sft.data.collate import PaddingFreeCollator

LENGTHS = (9, 31, 4, 17, 1, 23)
TINY_QWEN2 = dict(model_type="qwen2", vocab_size=3000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=True)
_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _loss_and_grads(model: torch.nn.Module, batches: list[dict], use_cache: bool) -> tuple[torch.Tensor, dict]:
    """Logits ``[N, V]`` of the rows (concatenated) and the gradients of the summed token loss."""
    model.zero_grad(set_to_none=True)
    logits, total = [], 0.0
    for batch in batches:
        extra = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items() if k in _KEYS}
        out = model(input_ids=batch["input_ids"].to(model.device), use_cache=use_cache, **extra).logits[0]
        labels = batch["labels"][0].to(model.device)
        total = total + torch.nn.functional.cross_entropy(out[:-1].float(), labels[1:], ignore_index=-100,
                                                          reduction="sum")
        logits.append(out.detach().float())
    total.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(logits), grads


def probe(device: str, dtype: torch.dtype, backends: list[str], seed: int = 0) -> list[dict]:
    """One record per (backend, use_cache): max |packed - separate| for logits and gradients."""
    register_varlen_attention()
    torch.manual_seed(seed)
    config = AutoConfig.for_model(**TINY_QWEN2)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device).train()
    rows = []
    for n in LENGTHS:
        ids = torch.randint(0, TINY_QWEN2["vocab_size"], (n,)).tolist()
        rows.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    collate = PaddingFreeCollator()
    packed = [collate(rows)]
    separate = [collate([row]) for row in rows]  # a batch of one row: no packing to detect
    records = []
    for backend in backends:
        model.set_attn_implementation(backend)
        for use_cache in (False, True):
            if backend == VARLEN and use_cache:
                continue  # varlen reads cu_seq_lens and needs no mask: the cache changes nothing
            ref_logits, ref_grads = _loss_and_grads(model, separate, use_cache=False)
            logits, grads = _loss_and_grads(model, packed, use_cache=use_cache)
            grad_diff = max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
            records.append({"backend": backend, "use_cache": use_cache,
                            "max_abs_logits_diff": (logits - ref_logits).abs().max().item(),
                            "max_abs_grad_diff": grad_diff,
                            "max_abs_grad": max(g.abs().max().item() for g in ref_grads.values())})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    backends = ["sdpa", "eager"]
    if args.device == "cpu" or dtype != torch.float32:
        backends.append(VARLEN)
    if importlib.util.find_spec("flash_attn") is not None and args.device != "cpu" and dtype != torch.float32:
        backends.append("flash_attention_2")
    print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__, "device": args.device,
                      "dtype": args.dtype, "rows": LENGTHS,
                      "packed_rows_isolated_by_mask": packed_rows_isolated_by_mask()}))
    for record in probe(args.device, dtype, backends):
        print(json.dumps(record))


if __name__ == "__main__":
    main()
