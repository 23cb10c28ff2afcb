"""The exported folder reads the same in transformers 4.x as in 5.x (``run.export_format: compatible``).

A second, small transformers 4.57 install (``pip install --target .venv-tf4``, reusing this environment's torch; see
:func:`transformers4`) loads each export in a subprocess (``tests/scripts/load_export.py``); this process loads it
with transformers 5. Compared: every config value transformers 5 reads (RoPE mapped: 4.x's ``rope_theta`` and
``rope_scaling`` against 5.x's ``rope_parameters``) and, beyond it, the inverse RoPE frequencies the model really
uses; the generation config; the chat-template rendering and its token ids; the fp32 logits (exactly).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SHARED_DATA
from sft_helpers import QWEN_TOKENIZER

TF4_PINS = ["transformers==4.57.*", "huggingface_hub>=0.34,<1.0", "tokenizers>=0.22,<=0.23.0"]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
QWEN25_CONFIG = os.path.join(SHARED_DATA, "qwen2.5-1.5b-instruct-config")
QWEN25_TOKENIZER = os.path.join(SHARED_DATA, "qwen2.5-tokenizer")


@pytest.fixture(scope="session")
def transformers4() -> str:
    """A folder holding transformers 4.57 (+ the huggingface_hub and tokenizers it needs), to put before this
    environment's packages on ``PYTHONPATH``: ``$LIT_SFT_TF4``, or ``.venv-tf4`` in the repository, installed once
    with pip (about 135 MB, ~30 s). Skips, saying why, when pip cannot install it (no package index)."""
    target = os.environ.get("LIT_SFT_TF4") or os.path.join(ROOT, ".venv-tf4")
    if not os.path.isdir(os.path.join(target, "transformers")):
        partial = target + ".partial"
        result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", partial,
                                 *TF4_PINS], capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            pytest.skip(f"cannot pip install {TF4_PINS} into {partial}: {result.stderr.strip()[-500:]}")
        os.replace(partial, target)
    return target


def _read_in_transformers4(tf4: str, folders: list[str], out: str) -> dict:
    """``{folder: what transformers 4.57 read}`` from one subprocess (``tests/scripts/load_export.py``)."""
    env = {**os.environ, "PYTHONPATH": tf4}  # before site-packages: transformers 4.57 with this environment's torch
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "load_export.py"), out, *folders],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=False)


def _export(tmp_path, name: str, base: str | None, model_config: dict, tokenizer_path: str, export_format: str):
    """A folder written by ``save_hf_folder`` (what the end of training calls) for a random-init model."""
    from lit_sft.data.loading import load_tokenizer
    from lit_sft.export import save_hf_folder
    from lit_sft.modeling import build_causal_lm

    torch.manual_seed(0)
    model, _ = build_causal_lm(base, torch_dtype="float32", attn_implementation="sdpa", random_init=True,
                               model_config=model_config)
    out = str(tmp_path / name)
    save_hf_folder(out, model, model.state_dict(), load_tokenizer(tokenizer_path), "card", None, export_format)
    return out


def _differences(v4: dict, v5: dict) -> list[str]:
    """What transformers 4.x read differently from transformers 5 (empty: the same model, tokens and settings)."""
    issues = [v4["error"]] if "error" in v4 else []
    if issues:
        return issues
    c4, c5 = dict(v4["config"]), dict(v5["config"])
    rope = dict(c5.pop("rope_parameters", None) or {})
    if rope:
        theta = rope.pop("rope_theta")
        if c4.get("rope_theta") != theta:
            issues.append(f"rope_theta: 4.x {c4.get('rope_theta')} != 5.x {theta}")
        scaling4 = {k: v for k, v in (c4.get("rope_scaling") or {}).items() if k != "type"}
        scaling5 = {} if rope.get("rope_type", "default") == "default" and len(rope) <= 1 else rope
        if scaling4 != scaling5:
            issues.append(f"rope_scaling: 4.x {scaling4} != 5.x {scaling5}")
    for key, value in c5.items():
        if key not in ("transformers_version", "_name_or_path") and c4.get(key, "<missing>") != value:
            issues.append(f"config.{key}: 4.x {c4.get(key, '<missing>')!r} != 5.x {value!r}")
    if v4["inv_freq"] is not None and not torch.equal(v4["inv_freq"], v5["inv_freq"]):
        issues.append(f"RoPE inv_freq differ by {(v4['inv_freq'] - v5['inv_freq']).abs().max().item():.3g}")
    g4, g5 = v4["generation"], v5["generation"]
    for key, value in g5.items():
        if value is not None and key != "transformers_version" and g4.get(key) != value:
            issues.append(f"generation.{key}: 4.x {g4.get(key)!r} != 5.x {value!r}")
    for key in ("rendered", "ids", "eos_token", "pad_token"):
        if v4[key] != v5[key]:
            issues.append(f"tokenizer {key} differs")
    if v4["logits"].shape != v5["logits"].shape or not torch.equal(v4["logits"], v5["logits"]):
        issues.append("logits differ")
    return issues


CASES = {
    "tiny-qwen2-rope1e6": (None, {"model_type": "qwen2", "vocab_size": 151936, "max_position_embeddings": 4096,
                                  "tie_word_embeddings": True, **TINY,
                                  "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, QWEN_TOKENIZER),
    "tiny-qwen2-yarn": (None, {"model_type": "qwen2", "vocab_size": 151936, "max_position_embeddings": 4096,
                               "tie_word_embeddings": False, **TINY,
                               "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                                   "original_max_position_embeddings": 1024}}, QWEN_TOKENIZER),
    "qwen2.5-1.5b-instruct-config": (QWEN25_CONFIG, TINY, QWEN25_TOKENIZER),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, transformers4):
    """Each case exported in both formats, read by transformers 5 here and by 4.57 in one subprocess."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "scripts"))
    from load_export import read

    tmp = tmp_path_factory.mktemp("compat")
    folders = {}
    for case, (base, model_config, tokenizer) in CASES.items():
        if base and not (os.path.isdir(base) and os.path.isdir(tokenizer)):
            continue  # ../shared/data is absent
        for fmt in ("compatible", "transformers5"):
            folders[case, fmt] = _export(tmp, f"{case}-{fmt}", base, model_config, tokenizer, fmt)
    v4 = _read_in_transformers4(transformers4, list(folders.values()), str(tmp / "v4.pt"))
    results = {}
    for key, folder in folders.items():
        v5: dict = {}
        read(folder, v5)
        results[key] = {"v5": v5, "v4": v4[folder]}
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_export_reads_the_same_in_transformers_4(exports, case):
    if (case, "compatible") not in exports:
        pytest.skip("../shared/data is absent")
    v4, v5 = exports[case, "compatible"]["v4"], exports[case, "compatible"]["v5"]
    assert "error" not in v4, v4.get("error")
    assert v4["transformers"].startswith("4.57") and v5["transformers"].startswith("5.")
    assert v5["config"]["rope_parameters"]["rope_theta"] == 1e6
    assert _differences(v4, v5) == []

    # The check is sharp: transformers' own format reads a different RoPE base in 4.x, and its tokenizer fails.
    plain4, plain5 = exports[case, "transformers5"]["v4"], exports[case, "transformers5"]["v5"]
    print(f"\n{case}, transformers5 format under 4.57: rope_theta {plain4['config'].get('rope_theta')}, "
          f"{plain4.get('error', 'no error')}")
    assert plain4["config"]["rope_theta"] == 10000.0 != plain5["config"]["rope_parameters"]["rope_theta"]
    assert "error" in plain4 or _differences(plain4, plain5)


def test_compatible_keys_are_the_4x_spelling():
    """Unit: the keys added for 4.x, and a per-layer-type RoPE refused with a message naming the key."""
    from lit_sft.export_compat import transformers4_config_keys, transformers4_tokenizer_keys

    assert transformers4_config_keys({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}) == {
        "rope_theta": 1e6, "rope_scaling": None}
    yarn = {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    assert transformers4_config_keys({"rope_parameters": yarn}) == {
        "rope_theta": 1e6, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}}
    assert transformers4_config_keys({"vocab_size": 3}) == {}
    with pytest.raises(ValueError, match="run.export_format: transformers5"):
        transformers4_config_keys({"rope_parameters": {"full_attention": {"rope_theta": 1e6},
                                                       "sliding_attention": {"rope_theta": 1e4}}})
    assert transformers4_tokenizer_keys({"extra_special_tokens": ["<a>"], "eos_token": "<b>"}) == {
        "additional_special_tokens": ["<a>"], "eos_token": "<b>"}
    named = {"extra_special_tokens": {"image_token": "<image>"}}
    assert transformers4_tokenizer_keys(named) == named
