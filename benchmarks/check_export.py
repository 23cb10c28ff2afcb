"""Reloads an exported folder with plain transformers and compares its logits with the probe's (LogitsProbe).

Usage: python benchmarks/check_export.py OUTPUT_DIR PROBE.pt
Prints one JSON line: max |diff|, the logits' max |value|, argmax agreement, and what the folder holds.
"""

import json
import os
import sys

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

out, probe_path = sys.argv[1], sys.argv[2]
probe = torch.load(probe_path)
model = AutoModelForCausalLM.from_pretrained(out, dtype="auto", attn_implementation="sdpa").cuda().eval()
with torch.no_grad():
    logits = model(input_ids=probe["input_ids"].cuda()).logits.float().cpu()
ref = probe["logits"]
tok = AutoTokenizer.from_pretrained(out)
gen = GenerationConfig.from_pretrained(out)
with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
    keys = list(f.keys())
    empty = [k for k in keys if f.get_slice(k).get_shape() in ([], [0])]
    dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in keys})
print("EXPORT", json.dumps({
    "max_abs_diff": (logits - ref).abs().max().item(), "max_abs_logit": ref.abs().max().item(),
    "argmax_agreement": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    "num_tensors": len(keys), "empty_tensors": empty, "dtypes": dtypes, "use_cache": model.config.use_cache,
    "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
    "generation_eos": gen.eos_token_id, "im_end_id": tok.convert_tokens_to_ids("<|im_end|>"),
    "files": sorted(os.listdir(out)),
}))
