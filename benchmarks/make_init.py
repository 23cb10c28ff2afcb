"""Writes a seeded random initialisation of a model config as a Hugging Face folder (bf16 safetensors), so that every
run of a scaling benchmark (any GPU count) starts from the very same weights.

    python benchmarks/make_init.py CONFIG_DIR OUT_DIR [SEED]
"""

from __future__ import annotations

import sys

import torch


def main(config_dir: str, out_dir: str, seed: int = 0) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(config_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    print(f"init: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters, seed {seed} -> {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
