"""An exported folder that transformers 4.x reads as transformers 5.x does (``run.export_format: compatible``).

transformers 5 writes two things that the newest 4.x (4.57) misreads, and many consumers of an SFT checkpoint
(vLLM, lighteval, mlx-lm, older evaluation stacks) still run 4.x:

- ``config.json``: RoPE lives in ``rope_parameters`` (``{"rope_theta": 1e6, "rope_type": "default"}``), where 4.x
  reads the top-level ``rope_theta`` and ``rope_scaling``. Without them 4.x silently builds the model with its
  default ``rope_theta = 10000.0``: a different model, no error.
- ``tokenizer_config.json``: the extra special tokens are a list under ``extra_special_tokens``, which 4.x expects
  to be a dict of named tokens (``AttributeError: 'list' object has no attribute 'keys'``); 4.x's name for the
  list is ``additional_special_tokens``.

:func:`write_compatible_keys` adds the 4.x spelling next to the 5.x one. transformers 5 reads both back to the same
values: it takes a legacy ``rope_scaling`` dict as ``rope_parameters`` and fills ``rope_theta`` into it from the
top-level key (``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict``), and it renames
``additional_special_tokens`` to ``extra_special_tokens`` on load (``PreTrainedTokenizerBase.__init__``).
``tests/test_export_compat.py`` loads such a folder in transformers 4.57 and compares every config value, the
logits and the chat-template token ids with transformers 5.
"""

from __future__ import annotations

import json
import os
from typing import Any

FORMATS = ("compatible", "transformers5")


def transformers4_config_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The keys transformers 4.x needs in ``config.json`` for the RoPE that ``config["rope_parameters"]`` describes.

    Returns ``{"rope_theta": float, "rope_scaling": dict | None}`` (plus ``partial_rotary_factor`` when set), or
    ``{}`` for a config without ``rope_parameters``. ``rope_scaling`` is the 4.x form: the parameters without
    ``rope_theta``, ``None`` for plain RoPE.

    Raises:
        ValueError: ``rope_parameters`` nested by layer type (e.g. Gemma 3's sliding/full attention), which 4.x
            spells with model-specific keys; the message names ``run.export_format``.
    """
    rope = config.get("rope_parameters")
    if not rope:
        return {}
    if any(isinstance(value, dict) for value in rope.values()):
        raise ValueError(
            f"run.export_format=compatible: this model's rope_parameters are set per layer type ({sorted(rope)}), "
            "which transformers 4.x spells with model-specific keys lit_sft does not write; set "
            "run.export_format: transformers5 (the folder then needs transformers >= 5 to load)")
    scaling = dict(rope)
    keys: dict[str, Any] = {"rope_theta": scaling.pop("rope_theta")}
    if "partial_rotary_factor" in scaling:
        keys["partial_rotary_factor"] = scaling.pop("partial_rotary_factor")
    keys["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" and len(scaling) <= 1 else scaling
    return keys


def transformers4_tokenizer_keys(tokenizer_config: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer_config.json`` with a list of extra special tokens under 4.x's name ``additional_special_tokens``
    (a dict of named tokens, which both versions read, is kept as it is)."""
    out = dict(tokenizer_config)
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):
        del out["extra_special_tokens"]
        out["additional_special_tokens"] = extra
    return out


def _rewrite_json(path: str, change: Any) -> None:
    if not os.path.isfile(path):
        return
    with open(path) as f:
        data = json.load(f)
    new = change(data)
    if new != data:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(new, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)


def write_compatible_keys(output_dir: str) -> None:
    """Add the transformers 4.x spelling to ``config.json`` and ``tokenizer_config.json`` in ``output_dir``.

    Raises:
        ValueError: see :func:`transformers4_config_keys`.
    """
    _rewrite_json(os.path.join(output_dir, "config.json"), lambda c: {**c, **transformers4_config_keys(c)})
    _rewrite_json(os.path.join(output_dir, "tokenizer_config.json"), transformers4_tokenizer_keys)
