"""Render -> tokenize -> mask labels -> truncate: pure functions over one row.

Every function here takes a row (a ``dict``) and a Hugging Face tokenizer and returns plain Python lists, so the
whole label logic is testable without a Trainer. The token sequence is exactly what
``tokenizer.apply_chat_template(messages, tokenize=True, **template_kwargs)`` gives: the template is rendered to
text once, and that text is tokenized once (no per-turn re-tokenisation, so no drift at turn boundaries). Rows of
every format are first brought to TRL's shapes by :mod:`lit_sft.data.formats`.

Label convention (the one transformers' ``ForCausalLMLoss`` and TRL use): ``labels[i]`` is the id at position ``i``
or ``IGNORE_INDEX`` (-100); the loss shifts them by one, so position ``i`` predicts ``labels[i + 1]``. We also set
``labels[0] = IGNORE_INDEX``: no position predicts a row's first token, so this changes no loss, and it makes rows
safe to concatenate (padding-free batches) and lets ``num_loss_tokens`` be a plain count.

Which tokens of a turn are supervised (assistant-only loss, and the completion of a prompt/completion row): exactly
what the model generates for that turn at inference, i.e. the text after the generation prompt
(``render(messages[:i], add_generation_prompt=True)``, which ends with ``<|im_start|>assistant\\n``) up to and
including the end-of-turn token (the tokenizer's EOS, ``<|im_end|>``). Not the header (it is part of the prompt at
inference) and not the newline the template writes after ``<|im_end|>`` (generation stops at ``<|im_end|>``, so that
newline is never produced). The anchor, TRL's ``{% generation %}``-marked Qwen2.5 template
(``trl/chat_templates/qwen2_5_training.jinja``), marks ``'\\n' + content + '<|im_end|>\\n'``: the same tokens plus
two that the model never has to produce, the header's newline and the newline after ``<|im_end|>``
(``tests/data/test_labels_reference.py`` checks this on thousands of rows). The same rule holds for ``messages`` and
conversational ``prompt``/``completion`` rows, so the two formats give the same labels; plain ``prompt``/``completion``
rows supervise the completion text and the EOS appended to it.

A token that straddles the edge of a supervised span (characters on both sides: ``ĠParis`` after a prompt that ends
with a space, ``ĊĊ`` when assistant content starts with a newline and merges with the header's) is supervised: it
carries part of the answer, and masking it would silently drop that part. Such rows are reported as
``boundary_moved``.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from lit_sft.data.formats import KNOWN_ROLES, RowError, canonical_row, template_kwargs, to_messages

IGNORE_INDEX = -100

# Causes a row can carry (``Example.issues`` keys); :mod:`lit_sft.data.report` counts them and applies the policies.
BOUNDARY_MOVED = "boundary_moved"
NO_ASSISTANT_TURN = "no_assistant_turn"
ANSWER_TRUNCATED = "answer_truncated"
UNKNOWN_ROLE = "unknown_role"
UNRENDERED_CONTENT = "unrendered_content"

__all__ = ["IGNORE_INDEX", "RowError", "Example", "assistant_char_spans", "tokenize_messages",
           "tokenize_prompt_completion", "tokenize_text", "truncate", "tokenize_row"]


@dataclass(frozen=True)
class Example:
    """One tokenized row.

    Attributes:
        input_ids: token ids, length ``T`` (after truncation, ``T <= max_length``).
        labels: length ``T``; the target id where the token is supervised, ``IGNORE_INDEX`` elsewhere.
        truncated: whether truncation cut more than the template's trailing whitespace.
        answer_start: index of the first token of the first answer (assistant turn or completion), whatever the loss
            mode; ``None`` for ``text`` rows, rows without an answer, or a template whose turns cannot be located.
        core_length: number of tokens up to the last non-whitespace character; the tokens after it are the
            template's trailing whitespace (the newline after the final ``<|im_end|>``), which truncation may drop.
        issues: cause -> detail (see the cause names above), for the preprocessing report.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    answer_start: Optional[int] = None
    core_length: Optional[int] = None
    issues: dict[str, str] = field(default_factory=dict)

    @property
    def num_loss_tokens(self) -> int:
        """Number of supervised tokens (positions whose label is not ``IGNORE_INDEX``)."""
        return sum(label != IGNORE_INDEX for label in self.labels)


def _end_of_turn(tokenizer: Any) -> str:
    """The text that closes an assistant turn in the chat template: the tokenizer's EOS (``<|im_end|>`` for Qwen)."""
    if tokenizer.eos_token is None:
        raise RowError("the tokenizer has no eos_token; set `data.eos_token` to the template's end-of-turn token")
    return tokenizer.eos_token


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False,
            template_kwargs: Optional[dict] = None, row_index: int = -1) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **(template_kwargs or {}))
    except Exception as err:  # jinja's TemplateError (raise_exception), or a TypeError on a field of the wrong type
        raise RowError(f"row {row_index}: the chat template cannot render {len(messages)} message(s) with roles "
                       f"{[m.get('role') for m in messages]}: {type(err).__name__}: {err}") from err


_PROBE = {"role": "user", "content": "lit_sft-probe-user-turn"}


def _turn_start(tokenizer: Any, messages: list[dict], i: int, text: str, kwargs: dict, row_index: int) -> int:
    """Where the model starts generating turn ``i``: the end of ``render(messages[:i], add_generation_prompt=True)``.

    transformers refuses to render an empty conversation, so for ``i == 0`` (a conversation that opens with an
    assistant turn) the conversation is rendered behind a probe user turn, and the start is where the rendering after
    the probe's generation prompt begins in ``text``.
    """
    if i > 0:
        prefix = _render(tokenizer, messages[:i], True, kwargs, row_index)
        if text.startswith(prefix):
            return len(prefix)
    else:
        prefix = _render(tokenizer, [_PROBE], True, kwargs, row_index)
        probed = _render(tokenizer, [_PROBE] + messages, False, kwargs, row_index)
        rest = probed[len(prefix):]
        if probed.startswith(prefix) and text.endswith(rest):
            return len(text) - len(rest)
    raise RowError(
        f"row {row_index}: the chat template renders messages[:{i}] + generation prompt differently from the start "
        "of the full conversation, so the assistant turn cannot be located; use a prefix-preserving template "
        "(`data.chat_template`) or set `assistant_only_loss: false` / `completion_only_loss: false`"
    )


def _turn_end(tokenizer: Any, messages: list[dict], i: int, start: int, text: str, kwargs: dict,
              row_index: int) -> int:
    """End (exclusive) of assistant turn ``i``: just past its end-of-turn token.

    The turn's own rendering, ``render(messages[:i + 1])``, bounds the search, so end-of-turn text inside the content
    (``"<|im_end|>"`` written by a user) is not taken for the real one. Templates that render a final turn differently
    (Qwen3 adds an empty think block) fall back to the first end-of-turn after the content.
    """
    end_of_turn = _end_of_turn(tokenizer)
    upto = text if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], False, kwargs, row_index)
    if text.startswith(upto):
        end = text.rfind(end_of_turn, start, len(upto))
    else:
        content = messages[i].get("content") or ""
        found = text.find(content, start)
        end = text.find(end_of_turn, found + len(content) if found >= 0 else start)
    if end < start:
        raise RowError(f"row {row_index}: assistant turn {i} has no end-of-turn token {end_of_turn!r}")
    return end + len(end_of_turn)


def assistant_char_spans(tokenizer: Any, messages: list[dict], text: str, row_index: int = -1,
                         template_kwargs: Optional[dict] = None, first_turn: int = 0) -> list[tuple[int, int]]:
    """Character spans of the assistant turns ``messages[first_turn:]`` in ``text`` (the rendering of ``messages``).

    Works with stock templates that have no ``{% generation %}`` markers (Qwen2.5's has none), by rendering
    prefixes: each span runs from the end of ``render(messages[:i], add_generation_prompt=True)`` to just past the
    turn's end-of-turn token (see the module docstring for why these are the supervised tokens).

    Returns:
        ``[(start, end), ...]`` character offsets into ``text``, one per assistant turn, in order.

    Raises:
        RowError: the template is not prefix-preserving for this conversation, or a turn has no end-of-turn token.
    """
    kwargs = template_kwargs or {}
    spans = []
    for i in range(first_turn, len(messages)):
        if messages[i]["role"] == "assistant":
            start = _turn_start(tokenizer, messages, i, text, kwargs, row_index)
            spans.append((start, _turn_end(tokenizer, messages, i, start, text, kwargs, row_index)))
    return spans


def _covering_tokens(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> tuple[list[bool], bool]:
    """Which tokens overlap a span, and whether any such token also reaches outside it (a moved boundary)."""
    starts, ends = [a for a, _ in offsets], [b for _, b in offsets]
    inside, moved = [False] * len(offsets), False
    for s, e in spans:
        first, last = bisect.bisect_right(ends, s), bisect.bisect_left(starts, e) - 1  # first end > s, last start < e
        if first > last:
            continue
        inside[first: last + 1] = [True] * (last + 1 - first)
        moved = moved or starts[first] < s or ends[last] > e
    return inside, moved


def _finish(text: str, input_ids: list[int], offsets: list[tuple[int, int]],
            spans: Optional[list[tuple[int, int]]], supervise_spans: bool, issues: dict[str, str]) -> Example:
    """Labels from the answer spans (or every token), ``labels[0]`` masked, and the fields the report needs."""
    inside, moved = _covering_tokens(offsets, spans) if spans is not None else ([], False)
    if supervise_spans:
        labels = [tok if sup else IGNORE_INDEX for tok, sup in zip(input_ids, inside)]
        if moved:
            issues[BOUNDARY_MOVED] = "a token straddles the start or end of the answer and is supervised"
    else:
        labels = list(input_ids)
    if labels:
        labels[0] = IGNORE_INDEX
    answer_start = inside.index(True) if True in inside else None
    core_end = len(text.rstrip())
    core_length = len(offsets)
    while core_length and offsets[core_length - 1][0] >= core_end:  # the trailing whitespace tokens
        core_length -= 1
    return Example(input_ids, labels, answer_start=answer_start, core_length=core_length, issues=issues)


_WHITESPACE = re.compile(r"\s+")


def _first_missing(text: str, pieces: list[str], flatten: bool) -> Optional[int]:
    """Index of the first of ``pieces`` not found in ``text`` in order (greedy leftmost, which finds an in-order
    embedding whenever one exists), optionally ignoring whitespace; ``None`` when all are found."""
    if flatten:
        text, pieces = _WHITESPACE.sub("", text), [_WHITESPACE.sub("", piece) for piece in pieces]
    cursor = 0
    for k, piece in enumerate(pieces):
        found = text.find(piece, cursor)
        if found < 0:
            return k
        cursor = found + len(piece)
    return None


def unrendered_content(messages: list[dict], text: str, template_kwargs: Optional[dict] = None) -> Optional[str]:
    """The first piece of the row that the template left out of ``text``, or ``None`` when all of it is there.

    Checks, ignoring whitespace (templates strip and re-indent): each message's content and tool-call names, in
    order; each tool's name (``tools``) and each document's text (``documents``).
    """
    pieces, where = [], []
    for i, message in enumerate(messages):
        pieces.append(message.get("content") or "")
        where.append(f"the content of messages[{i}] (role {message['role']!r})")
        for call in message.get("tool_calls") or []:
            function = call.get("function", call) if isinstance(call, dict) else {}
            pieces.append(str(function.get("name") or ""))
            where.append(f"a tool call of messages[{i}] ({function.get('name')!r})")
    kwargs = template_kwargs or {}
    for t, tool in enumerate(kwargs.get("tools") or []):
        name = (tool.get("function", tool) if isinstance(tool, dict) else {}).get("name")
        if name and _first_missing(text, [str(name)], flatten=False) is not None:
            return f"tools[{t}] ({name!r}) is not in the rendered text: the template does not render tools"
    for d, document in enumerate(kwargs.get("documents") or []):
        body = document.get("text") or document.get("content") if isinstance(document, dict) else document
        if body and _first_missing(text, [str(body)], flatten=True) is not None:
            return f"documents[{d}] is not in the rendered text: the template does not render documents"
    if _first_missing(text, pieces, flatten=False) is None:  # the common case, without rewriting the text
        return None
    missing = _first_missing(text, pieces, flatten=True)
    return None if missing is None else f"{where[missing]} is not in the rendered text"


def _conversation(tokenizer: Any, messages: list[dict], supervise: str, first_turn: int, row_index: int,
                  template_kwargs: Optional[dict]) -> Example:
    """Tokenize a conversation; ``supervise`` is ``"all"`` or ``"assistant"`` (turns ``first_turn`` onwards)."""
    kwargs = template_kwargs or {}
    text = _render(tokenizer, messages, False, kwargs, row_index)
    issues: dict[str, str] = {}
    unknown = sorted({m["role"] for m in messages} - set(KNOWN_ROLES))
    if unknown:
        hint = " (ShareGPT's names: set `data.format: sharegpt`)" if set(unknown) & {"human", "gpt"} else ""
        issues[UNKNOWN_ROLE] = f"role(s) {unknown} are not chat roles {list(KNOWN_ROLES)}{hint}"
    missing = unrendered_content(messages, text, kwargs)
    if missing:
        issues[UNRENDERED_CONTENT] = missing
    if not any(m["role"] == "assistant" for m in messages[first_turn:]):
        where = "the completion" if first_turn else "the conversation"
        issues[NO_ASSISTANT_TURN] = f"{where} has no assistant turn (roles {[m['role'] for m in messages]})"
    try:
        spans = assistant_char_spans(tokenizer, messages, text, row_index, kwargs, first_turn)
    except RowError:
        if supervise != "all":
            raise
        spans = None  # all tokens are supervised anyway; only the answer's position is unknown
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _finish(text, list(encoding["input_ids"]), list(encoding["offset_mapping"]), spans,
                   supervise != "all", issues)


def tokenize_messages(tokenizer: Any, messages: list[dict], assistant_only_loss: bool = False, row_index: int = -1,
                      chat_template_kwargs: Optional[dict] = None) -> Example:
    """Render a conversation with the tokenizer's chat template, tokenize it, and build labels.

    Args:
        tokenizer: a transformers tokenizer with a chat template and offsets support (any fast tokenizer).
        messages: ``[{"role": ..., "content": ...}, ...]`` (ShareGPT's ``from``/``value`` are read too).
        assistant_only_loss: if ``False`` (the recipe's default, as TRL's ``SFTTrainer`` on ``messages``), every token
            is supervised; if ``True``, only assistant turns (see the module docstring for which tokens).
        row_index: the row's index in the dataset, used in error messages.
        chat_template_kwargs: extra keyword arguments for ``apply_chat_template`` (``tools``, ``documents``,
            ``enable_thinking``, ...).

    Returns:
        An :class:`Example` with ``input_ids == apply_chat_template(messages, tokenize=True)["input_ids"]``; a
        conversation without an assistant turn carries the ``no_assistant_turn`` issue (and, with
        ``assistant_only_loss``, no supervised token).

    Raises:
        RowError: malformed ``messages``, or (``assistant_only_loss``) a template that cannot locate assistant turns.
    """
    messages = to_messages(messages, "messages", row_index)
    return _conversation(tokenizer, messages, "assistant" if assistant_only_loss else "all", 0, row_index,
                         chat_template_kwargs)


def _ends_with(text: str, end_of_turn: str) -> bool:
    return text.rstrip().endswith(end_of_turn)


def tokenize_prompt_completion(tokenizer: Any, prompt: Any, completion: Any, completion_only_loss: bool = True,
                               row_index: int = -1, chat_template_kwargs: Optional[dict] = None,
                               assistant_only_loss: bool = False) -> Example:
    """Tokenize a prompt/completion row; with ``completion_only_loss`` only the completion is supervised.

    Conversational rows (message lists) are the conversation ``prompt + completion``, labelled by the module's rule:
    with ``completion_only_loss`` the completion's assistant turns are supervised, exactly as the same conversation
    as a ``messages`` row with ``assistant_only_loss`` supervises them (TRL supervises everything past
    ``render(prompt, add_generation_prompt=True)``, which adds the newline after ``<|im_end|>``). Without it,
    ``assistant_only_loss`` supervises every assistant turn, else every token. Plain strings are
    ``prompt + completion + EOS`` (no EOS is added to a completion that already ends with it); the completion's span
    starts at the first character of the completion.

    Raises:
        RowError: a field of the wrong type, or a template that cannot locate the completion.
    """
    if isinstance(prompt, list) and isinstance(completion, list):
        prompt, completion = to_messages(prompt, "prompt", row_index), to_messages(completion, "completion", row_index)
        supervise = "assistant" if completion_only_loss or assistant_only_loss else "all"
        first_turn = len(prompt) if completion_only_loss else 0
        return _conversation(tokenizer, prompt + completion, supervise, first_turn, row_index, chat_template_kwargs)
    if not (isinstance(prompt, str) and isinstance(completion, str)):
        raise RowError(f"row {row_index}: 'prompt' and 'completion' must both be strings or both lists of messages")
    end_of_turn = _end_of_turn(tokenizer)
    text = prompt + completion + ("" if _ends_with(completion, end_of_turn) else end_of_turn)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _finish(text, list(encoding["input_ids"]), list(encoding["offset_mapping"]),
                   [(len(prompt), len(text))], completion_only_loss, {})


def tokenize_text(tokenizer: Any, text: Any, row_index: int = -1) -> Example:
    """Tokenize a plain ``text`` row, every token supervised; EOS is appended unless the text already ends with it
    (trailing whitespace aside: a pre-rendered chat ends with ``<|im_end|>\\n``), as TRL's ``add_eos`` does.

    Raises:
        RowError: ``text`` is not a non-empty string.
    """
    if not isinstance(text, str) or not text:
        raise RowError(f"row {row_index}: field 'text' must be a non-empty string")
    end_of_turn = _end_of_turn(tokenizer)
    text = text if _ends_with(text, end_of_turn) else text + end_of_turn
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _finish(text, list(encoding["input_ids"]), list(encoding["offset_mapping"]), None, False, {})


def truncate(example: Example, max_length: Optional[int]) -> Example:
    """Keep the first ``max_length`` tokens (TRL's ``truncation_mode="keep_start"``).

    No EOS is added to a cut row: the model is not taught to stop where the data did not stop. A row longer than
    ``max_length`` only by the template's trailing whitespace (the newline after the final ``<|im_end|>``) fits: it
    is cut but not marked ``truncated`` (so ``truncation: drop`` keeps it). A row whose answer is cut away entirely
    gets the ``answer_truncated`` issue. ``max_length=None`` keeps the row whole.
    """
    if max_length is None or len(example.input_ids) <= max_length:
        return example
    issues = dict(example.issues)
    if example.answer_start is not None and example.answer_start >= max_length:
        issues[ANSWER_TRUNCATED] = (f"the answer starts at token {example.answer_start}, at or past "
                                    f"max_length={max_length}: only the prompt is left")
    fits = example.core_length is not None and example.core_length <= max_length
    return replace(example, input_ids=example.input_ids[:max_length], labels=example.labels[:max_length],
                   truncated=not fits, issues=issues)


def tokenize_row(
    row: dict,
    tokenizer: Any,
    max_length: Optional[int],
    assistant_only_loss: bool = False,
    completion_only_loss: bool = True,
    row_index: int = -1,
    fmt: Optional[str] = None,
    fields: Optional[dict[str, str]] = None,
    chat_template_kwargs: Optional[dict] = None,
) -> Example:
    """Bring the row to its canonical shape (:func:`lit_sft.data.formats.canonical_row`), tokenize, truncate.

    Args:
        fmt, fields: the format and column map from :func:`lit_sft.data.formats.resolve_fields`; ``None`` detects
            them from this row's fields.
        chat_template_kwargs: ``data.chat_template_kwargs``, passed to every ``apply_chat_template`` call.

    Raises:
        RowError: the row has none of the supported fields, or a field is malformed.
    """
    row = canonical_row(row, fmt, fields, row_index)
    kwargs = template_kwargs(row, chat_template_kwargs)
    if "messages" in row:
        example = tokenize_messages(tokenizer, row["messages"], assistant_only_loss, row_index, kwargs)
    elif "prompt" in row:
        example = tokenize_prompt_completion(tokenizer, row["prompt"], row["completion"], completion_only_loss,
                                             row_index, kwargs, assistant_only_loss)
    else:
        example = tokenize_text(tokenizer, row["text"], row_index)
    return truncate(example, max_length)
