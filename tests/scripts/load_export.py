"""Load exported folders with whatever transformers is first on the path and save what it read.

    python tests/scripts/load_export.py OUT.pt FOLDER [FOLDER ...]

``OUT.pt`` maps each folder to: the transformers version, ``AutoConfig.from_pretrained(FOLDER).to_dict()``, the RoPE that
the model's rotary embedding actually uses (``inv_freq``), ``GenerationConfig.to_dict()``, the chat-template token
ids of a fixed conversation, and the fp32 logits of the model on them; or to ``{"error": message}`` when loading
fails (with what was read before). Run under transformers 4.x by
``tests/test_export_compat.py`` (``PYTHONPATH`` puts a 4.x install before the main environment's packages).
"""

from __future__ import annotations

import sys

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 * 6?"},
            {"role": "assistant", "content": "7 * 6 = 42."}]


def read(folder: str, into: dict) -> None:
    """Fill ``into`` with what this transformers reads from ``folder``, config first (kept if a later step fails)."""
    into["transformers"] = transformers.__version__
    into["config"] = AutoConfig.from_pretrained(folder).to_dict()
    into["generation"] = GenerationConfig.from_pretrained(folder).to_dict()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rotary = getattr(model.model, "rotary_emb", None)
    into["inv_freq"] = None if rotary is None else rotary.inv_freq.clone()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    into["rendered"] = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    into["ids"] = tokenizer(into["rendered"], add_special_tokens=False)["input_ids"]
    into["eos_token"], into["pad_token"] = tokenizer.eos_token, tokenizer.pad_token
    with torch.no_grad():
        into["logits"] = model(input_ids=torch.tensor([into["ids"]])).logits[0]


def main(out: str, *folders: str) -> None:
    results: dict = {}
    for folder in folders:
        results[folder] = {}
        try:
            read(folder, results[folder])
        except Exception as err:  # reported to the test, with what was read before it
            results[folder]["error"] = f"{type(err).__name__}: {err}"
    torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
