"""Dataset formats of the field -> one canonical row (TRL's shapes), with a column map.

A row is brought to one of TRL's dataset shapes before it is rendered and tokenized (:mod:`lit_sft.data.tokenize`):

- ``messages``: a ``messages`` column of ``[{role, content}, ...]`` (OpenAI / TRL chat) -> ``{"messages"}``.
- ``sharegpt``: a ``conversations`` column of ``[{from, value}, ...]`` with ``from`` in ``human``/``gpt``/``system``/
  ``tool`` (Axolotl, LLaMA-Factory); an optional ``system`` column becomes the first turn -> ``{"messages"}``.
- ``prompt_completion``: ``prompt`` and ``completion`` columns, both message lists (TRL's conversational
  prompt/completion) or both strings -> ``{"prompt", "completion"}``.
- ``text``: a ``text`` column of strings -> ``{"text"}``.

``data.format: null`` detects the format from the column names, in the order of the table. Whatever the format,
message entries may use ``role``/``content`` or ShareGPT's ``from``/``value``; ShareGPT role names are mapped to the
chat roles (``human`` -> ``user``, ``gpt`` -> ``assistant``, ``observation`` -> ``tool``), as TRL's
``maybe_convert_to_chatml`` does for the keys (TRL keeps ``human``/``gpt``, which Qwen's templates do not render).

Columns the chat template takes are passed through to ``apply_chat_template`` when the dataset has them:
``tools`` (a list of JSON schemas, or one JSON string: TRL's convention, which avoids Arrow merging the schemas of
different rows), ``documents``, and ``chat_template_kwargs`` (a per-row dict, e.g. ``{"enable_thinking": false}``).

``data.columns`` maps a field name to the dataset's column name, e.g. ``{messages: chat}`` or
``{prompt: question, completion: answer}``.
"""

from __future__ import annotations

import json
from typing import Any, Optional

FORMAT_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
"""Required fields per format, in detection order."""

TEMPLATE_FIELDS = ("tools", "documents", "chat_template_kwargs")
"""Optional fields passed to ``apply_chat_template`` (as TRL passes ``tools`` and ``chat_template_kwargs``)."""

OPTIONAL_FIELDS = {"sharegpt": ("system",)}

FIELDS = tuple(sorted({f for fields in FORMAT_FIELDS.values() for f in fields} | set(TEMPLATE_FIELDS) | {"system"}))
"""Every field name ``data.columns`` may map."""

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "tool": "tool", "observation": "tool"}
"""ShareGPT ``from`` values -> chat roles (the names Axolotl and LLaMA-Factory read)."""

KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool")
"""Roles of the chat format that chat templates render (OpenAI's, as transformers documents them). Another role
(``human``/``gpt`` under ``role``, Llama 3.1's ``ipython``) is reported as ``unknown_role``
(``data.on_unknown_role``)."""


class RowError(ValueError):
    """A dataset row that cannot be turned into a training example; the message names the row and the field."""


def check_columns(columns: Optional[dict[str, str]]) -> None:
    """Refuse a ``data.columns`` key that is not a field name (listed in :data:`FIELDS`).

    Raises:
        ValueError: names ``data.columns``, the bad key and the valid ones.
    """
    for field in columns or {}:
        if field not in FIELDS:
            raise ValueError(f"data.columns: {field!r} is not a field name; the keys are the format's field names "
                             f"({', '.join(FIELDS)}) and the values your dataset's column names, e.g. "
                             "`data.columns: {messages: chat}`")


def resolve_fields(column_names: Any, fmt: Optional[str] = None,
                   columns: Optional[dict[str, str]] = None) -> tuple[str, dict[str, str]]:
    """Pick the format and map each of its fields to a dataset column.

    Args:
        column_names: the dataset's column names.
        fmt: ``data.format``; ``None`` detects it (first format of :data:`FORMAT_FIELDS` whose fields all exist).
        columns: ``data.columns``, field name -> column name.

    Returns:
        ``(format, {field: column})``, holding the format's fields and the optional / template fields present.

    Raises:
        ValueError: an unknown format or field, a mapped column that does not exist, or no format matches; the
            message lists the columns found and the keys that fix it.
    """
    check_columns(columns)
    column_names = list(column_names)
    mapping = {field: (columns or {}).get(field, field) for field in FIELDS}
    for field, column in (columns or {}).items():
        if column not in column_names:
            raise ValueError(f"data.columns: {field}: {column!r}, but the dataset has no column {column!r} "
                             f"(columns: {column_names})")
    present = {field for field, column in mapping.items() if column in column_names}
    if fmt is None:
        fmt = next((f for f, needed in FORMAT_FIELDS.items() if set(needed) <= present), None)
        if fmt is None:
            raise ValueError(
                f"cannot tell the dataset's format from its columns {column_names}: expected 'messages', "
                "'conversations' (ShareGPT), 'prompt' + 'completion', or 'text'; set `data.format` "
                f"({', '.join(FORMAT_FIELDS)}) and map your column names with `data.columns`, e.g. "
                "`data.columns: {messages: chat}`")
    elif fmt not in FORMAT_FIELDS:
        raise ValueError(f"data.format={fmt!r} is not a format; use one of {', '.join(FORMAT_FIELDS)} (or null to "
                         "detect it)")
    missing = [f for f in FORMAT_FIELDS[fmt] if f not in present]
    if missing:
        raise ValueError(f"data.format={fmt!r} needs the field(s) {missing}, but the dataset's columns are "
                         f"{column_names}; map them with `data.columns`, e.g. `data.columns: {{{missing[0]}: ...}}`")
    wanted = FORMAT_FIELDS[fmt] + OPTIONAL_FIELDS.get(fmt, ()) + TEMPLATE_FIELDS
    return fmt, {field: mapping[field] for field in wanted if field in present}


def to_messages(entries: Any, field: str, row_index: int) -> list[dict]:
    """Copy a list of message dicts, reading ShareGPT's ``from``/``value`` as ``role``/``content``.

    Entries keep their other keys (``tool_calls``, ``name``, ...). ``content`` may be ``None`` only in an assistant
    turn with ``tool_calls``.

    Raises:
        RowError: not a non-empty list of dicts with a role and a string content; names the row and the field.
    """
    if not isinstance(entries, list) or not entries:
        raise RowError(f"row {row_index}: field {field!r} must be a non-empty list of {{role, content}} dicts")
    messages = []
    for turn, entry in enumerate(entries):
        if isinstance(entry, dict) and "role" not in entry and "from" in entry:
            entry = {("role" if k == "from" else "content" if k == "value" else k): v for k, v in entry.items()}
            entry["role"] = SHAREGPT_ROLES.get(entry["role"], entry["role"])
        if not isinstance(entry, dict) or "role" not in entry or "content" not in entry:
            raise RowError(f"row {row_index}: {field}[{turn}] must be a dict with 'role' and 'content' "
                           "(or ShareGPT's 'from' and 'value')")
        if not isinstance(entry["content"], str) and not (entry["content"] is None and entry.get("tool_calls")):
            raise RowError(f"row {row_index}: {field}[{turn}]['content'] must be a string")
        messages.append(dict(entry))
    return messages


def _template_fields(row: dict, fields: dict[str, str], row_index: int) -> dict[str, Any]:
    extra = {}
    for field in TEMPLATE_FIELDS:
        value = row.get(fields.get(field, field))
        if isinstance(value, str) and field in ("tools", "documents"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise RowError(f"row {row_index}: field {field!r} is a string but not JSON ({err})") from None
        if value is not None:
            extra[field] = value
    return extra


def canonical_row(row: dict, fmt: Optional[str] = None, fields: Optional[dict[str, str]] = None,
                  row_index: int = -1) -> dict[str, Any]:
    """Bring one row to TRL's shape: ``{"messages"}``, ``{"prompt", "completion"}`` or ``{"text"}``.

    Template fields present (``tools``, ``documents``, ``chat_template_kwargs``) are carried along.

    Args:
        row: the dataset row.
        fmt, fields: from :func:`resolve_fields`; ``None`` detects them from this row's non-null fields.
        row_index: the row's index, for error messages.

    Raises:
        RowError: the row has none of the formats' fields, or a field is malformed.
    """
    if fmt is None or fields is None:
        try:
            fmt, fields = resolve_fields([k for k, v in row.items() if v is not None], fmt)
        except ValueError as err:
            raise RowError(f"row {row_index}: expected a 'messages' field (chat), 'conversations' (ShareGPT), "
                           f"'prompt' + 'completion', or 'text'; found fields {sorted(row)} ({err})") from None
    out = _template_fields(row, fields, row_index)
    if fmt in ("messages", "sharegpt"):
        field = FORMAT_FIELDS[fmt][0]
        messages = to_messages(row.get(fields[field]), field, row_index)
        system = row.get(fields.get("system", "system")) if fmt == "sharegpt" else None
        if system:
            messages = [{"role": "system", "content": system}] + messages
        out["messages"] = messages
    elif fmt == "prompt_completion":
        prompt, completion = row.get(fields["prompt"]), row.get(fields["completion"])
        if isinstance(prompt, list) and isinstance(completion, list):
            out["prompt"] = to_messages(prompt, "prompt", row_index)
            out["completion"] = to_messages(completion, "completion", row_index)
        elif isinstance(prompt, str) and isinstance(completion, str):
            out["prompt"], out["completion"] = prompt, completion
        else:
            raise RowError(f"row {row_index}: 'prompt' and 'completion' must both be strings or both lists of "
                           "messages")
    else:
        text = row.get(fields["text"])
        if not isinstance(text, str) or not text:
            raise RowError(f"row {row_index}: field 'text' must be a non-empty string")
        out["text"] = text
    return out


def template_kwargs(row: dict, chat_template_kwargs: Optional[dict] = None) -> dict[str, Any]:
    """``apply_chat_template`` keyword arguments for a canonical row: ``data.chat_template_kwargs``, then the row's
    ``tools`` / ``documents`` and its own ``chat_template_kwargs`` (``None`` values, Arrow's fill, are dropped)."""
    kwargs = dict(chat_template_kwargs or {})
    kwargs.update({k: row[k] for k in ("tools", "documents") if row.get(k) is not None})
    kwargs.update(row.get("chat_template_kwargs") or {})
    return {k: v for k, v in kwargs.items() if v is not None}
