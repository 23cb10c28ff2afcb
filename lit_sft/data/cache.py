"""The tokenization cache key: ``datasets`` reuses a tokenized split only when the data, the tokenizer, the settings
and the labelling code are all unchanged.

``datasets.Dataset.map`` fingerprints a transform by pickling the function and its ``fn_kwargs``; it pickles a
module-level function by its name, so an edit of the code that produces labels (lit_sft's own, after an upgrade)
would silently reuse stale cached labels. It also pickles the whole tokenizer for every ``map``, which takes seconds.
:func:`cache_fingerprint` replaces that with an explicit key, passed to ``map`` as ``new_fingerprint``.
"""

from __future__ import annotations

import hashlib
import importlib
from typing import Any

LABELLING_MODULES = ("lit_sft.data.formats", "lit_sft.data.tokenize")
"""The modules whose code turns a row into ``input_ids``/``labels`` (:func:`preprocessing_version` hashes them)."""


def preprocessing_version(extra: str = "") -> str:
    """A hash of the labelling code: the source files of :data:`LABELLING_MODULES`, plus ``extra`` (the caller's own
    code, e.g. the source of its ``map`` function)."""
    digest = hashlib.sha256(extra.encode())
    for name in LABELLING_MODULES:
        with open(importlib.import_module(name).__file__, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What of a tokenizer decides the tokens and labels: its class, its whole fast-tokenizer definition
    (``backend_tokenizer.to_str()``: vocabulary, merges, normalizer, pre-tokenizer, added tokens), its chat template
    and its special tokens (the EOS closes assistant turns). Falls back to ``datasets``' pickle hash for a tokenizer
    without a fast backend."""
    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return Hasher.hash(tokenizer)
    return Hasher.hash([type(tokenizer).__name__, backend.to_str(), tokenizer.chat_template,
                        {k: str(v) for k, v in tokenizer.special_tokens_map.items()}])


def cache_fingerprint(dataset_fingerprint: str, tokenizer: Any, code: str, **settings: Any) -> str:
    """The ``new_fingerprint`` of the tokenizing ``map``.

    Args:
        dataset_fingerprint: the input dataset's ``_fingerprint`` (its content and the transforms before).
        tokenizer: see :func:`tokenizer_fingerprint`.
        code: the source of the ``map`` function; with :data:`LABELLING_MODULES`, it makes the labelling code part of
            the key (:func:`preprocessing_version`).
        settings: every other argument of the ``map`` function (max_length, loss modes, format, columns, ...).
    """
    from datasets.fingerprint import Hasher

    return Hasher.hash([dataset_fingerprint, tokenizer_fingerprint(tokenizer), preprocessing_version(code), settings])
