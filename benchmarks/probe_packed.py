"""Probe (issue 8 item 11): do packed rows, positions restarting per row and no attention mask, give the same logits
and input-embedding gradients as the rows run one at a time?

Tiny Qwen2 (``tests/conftest.py`` TINY_QWEN2), fp32, train mode, ``use_cache=False``; 3 rows of 37, 100 and 64 random
tokens. For each attention backend the packed forward gets ``position_ids`` only ("pos"), and also the
``cu_seq_lens_q/k`` + ``max_length_q/k`` keys lit_sft's padding-free collator adds ("pos+cu"). Prints the max abs
difference of the logits and of ``d(sum(logits * w)) / d(inputs_embeds)`` against the separate rows.

    python benchmarks/probe_packed.py [cpu|cuda]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def main(device: str) -> None:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import TINY_QWEN2
    from lit_sft.attention import register_varlen_attention

    register_varlen_attention()
    torch.manual_seed(0)
    config = AutoConfig.for_model(**TINY_QWEN2)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = base.state_dict()
    lengths = [37, 100, 64]
    rows = [torch.randint(0, 1000, (n,)) for n in lengths]
    weights = torch.randn(sum(lengths), config.vocab_size, generator=torch.Generator().manual_seed(1)).to(device)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    print(f"transformers {transformers.__version__} torch {torch.__version__} device {device}")
    for impl in ("sdpa", "eager", "lit_sft_varlen"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=impl)
        model.load_state_dict(state)
        model.to(device).train()
        embed = model.get_input_embeddings()

        def run(ids: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
            x = embed(ids.to(device)).detach().requires_grad_(True)
            logits = model(inputs_embeds=x, use_cache=False, **kw).logits
            return logits, x

        separate_logits, separate_grads = [], []
        start = 0
        for ids in rows:
            logits, x = run(ids[None])  # one row alone (lit_sft_varlen: no cu_seq_lens = one row)
            (logits[0] * weights[start:start + len(ids)]).sum().backward()
            separate_logits.append(logits[0].detach())
            separate_grads.append(x.grad[0])
            start += len(ids)
        ref_logits, ref_grads = torch.cat(separate_logits), torch.cat(separate_grads)
        packed = torch.cat(rows)[None]
        pos = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
        variants = {"pos+cu": dict(position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths),
                                   max_length_k=max(lengths))}
        if impl != "lit_sft_varlen":
            variants = {"pos": dict(position_ids=pos), **variants}
        for name, kw in variants.items():
            try:
                logits, x = run(packed, **kw)
                (logits[0] * weights).sum().backward()
                print(f"PROBE {impl:15s} {name:7s} max|logits diff| {(logits[0] - ref_logits).abs().max().item():.3e}"
                      f"  max|embed grad diff| {(x.grad[0] - ref_grads).abs().max().item():.3e}"
                      f" (max|grad| {ref_grads.abs().max().item():.3e})")
            except Exception as e:  # report, do not stop the other backends
                print(f"PROBE {impl:15s} {name:7s} failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu"))
