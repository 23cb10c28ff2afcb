"""Render -> tokenize -> mask labels -> truncate: pure functions over one row.

Every function here takes a row (a ``dict``) and a Hugging Face tokenizer and returns plain Python lists, so the
whole label logic is testable without a Trainer. The token sequence is exactly what
``tokenizer.apply_chat_template(messages, tokenize=True)`` gives: the template is rendered to text once, and that
text is tokenized once (no per-turn re-tokenisation, so no drift at turn boundaries).

Label convention (the one transformers' ``ForCausalLMLoss`` and TRL use): ``labels[i]`` is the id at position ``i``
or ``IGNORE_INDEX`` (-100); the loss shifts them by one, so position ``i`` predicts ``labels[i + 1]``. We also set
``labels[0] = IGNORE_INDEX``: no position predicts a row's first token, so this changes no loss, and it makes rows
safe to concatenate (padding-free batches) and lets ``num_loss_tokens`` be a plain count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

IGNORE_INDEX = -100


class RowError(ValueError):
    """A dataset row that cannot be turned into a training example; the message names the row and the field."""


@dataclass(frozen=True)
class Example:
    """One tokenized row.

    Attributes:
        input_ids: token ids, length ``T`` (after truncation, ``T <= max_length``).
        labels: length ``T``; the target id where the token is supervised, ``IGNORE_INDEX`` elsewhere.
        truncated: whether the row was cut at ``max_length``.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_loss_tokens(self) -> int:
        """Number of supervised tokens (positions whose label is not ``IGNORE_INDEX``)."""
        return sum(label != IGNORE_INDEX for label in self.labels)


def _end_of_turn(tokenizer: Any) -> str:
    """The text that closes an assistant turn in the chat template: the tokenizer's EOS (``<|im_end|>`` for Qwen)."""
    if tokenizer.eos_token is None:
        raise RowError("the tokenizer has no eos_token; set `data.eos_token` to the template's end-of-turn token")
    return tokenizer.eos_token


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False, **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def _check_messages(messages: Any, row_index: int) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RowError(f"row {row_index}: field 'messages' must be a non-empty list of {{role, content}} dicts")
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowError(f"row {row_index}: messages[{turn}] must be a dict with 'role' and 'content'")
        if not isinstance(message["content"], str):
            raise RowError(f"row {row_index}: messages[{turn}]['content'] must be a string")
    return messages


def assistant_char_spans(tokenizer: Any, messages: list[dict], text: str, row_index: int = -1) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in ``text`` (the full rendering of ``messages``).

    Works with stock templates that have no ``{% generation %}`` markers (Qwen2.5's has none): for each assistant
    turn ``i``, the rendering of ``messages[:i]`` with the generation prompt must be a prefix of ``text``; the
    assistant span starts right after it and ends after the first end-of-turn token (the tokenizer's EOS) that
    follows. So the span holds the assistant content plus ``<|im_end|>``, and not the ``<|im_start|>assistant\\n``
    header nor the newline after the end-of-turn token.

    Returns:
        ``[(start, end), ...]`` character offsets into ``text``, one per assistant turn, in order.

    Raises:
        RowError: the template is not prefix-stable for this conversation, or an assistant turn has no end-of-turn.
    """
    end_of_turn = _end_of_turn(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        if not text.startswith(prefix):
            raise RowError(
                f"row {row_index}: the chat template renders messages[:{i}] + generation prompt differently from the "
                "start of the full conversation, so assistant spans cannot be located; use a template with "
                "{% generation %} markers or set `assistant_only_loss: false`"
            )
        end = text.find(end_of_turn, len(prefix))
        if end < 0:
            raise RowError(f"row {row_index}: assistant turn {i} has no end-of-turn token {end_of_turn!r}")
        spans.append((len(prefix), end + len(end_of_turn)))
    return spans


def tokenize_messages(
    tokenizer: Any,
    messages: list[dict],
    assistant_only_loss: bool = False,
    row_index: int = -1,
    chat_template_kwargs: Optional[dict] = None,
) -> Example:
    """Render a conversation with the tokenizer's chat template, tokenize it, and build labels.

    Args:
        tokenizer: a transformers tokenizer with a chat template and offsets support (any fast tokenizer).
        messages: ``[{"role": ..., "content": ...}, ...]``.
        assistant_only_loss: if ``False`` (the recipe's default, as TRL's ``SFTTrainer`` on ``messages``), every token
            is supervised; if ``True``, only assistant turns, each including its end-of-turn token.
        row_index: the row's index in the dataset, used in error messages.
        chat_template_kwargs: extra keyword arguments for ``apply_chat_template``.

    Returns:
        An :class:`Example` with ``input_ids == apply_chat_template(messages, tokenize=True)["input_ids"]``.

    Raises:
        RowError: malformed ``messages``, a template that cannot locate assistant spans, or no assistant turn
            with ``assistant_only_loss``.
    """
    messages = _check_messages(messages, row_index)
    text = _render(tokenizer, messages, **(chat_template_kwargs or {}))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=assistant_only_loss)
    input_ids = list(encoding["input_ids"])
    if not assistant_only_loss:
        labels = list(input_ids)
    else:
        spans = assistant_char_spans(tokenizer, messages, text, row_index)
        if not spans:
            raise RowError(f"row {row_index}: assistant_only_loss is set but 'messages' has no assistant turn")
        labels = [IGNORE_INDEX] * len(input_ids)
        for t, (start, end) in enumerate(encoding["offset_mapping"]):
            if any(s <= start and end <= e and end > start for s, e in spans):
                labels[t] = input_ids[t]
    if labels:
        labels[0] = IGNORE_INDEX
    return Example(input_ids, labels)


def tokenize_prompt_completion(
    tokenizer: Any, prompt: Any, completion: Any, completion_only_loss: bool = True, row_index: int = -1
) -> Example:
    """Tokenize a prompt/completion row; with ``completion_only_loss`` only the completion is supervised.

    Conversational rows (``prompt`` and ``completion`` are lists of messages) are rendered with the chat template
    (the prompt with the generation prompt); plain strings are tokenized as is and EOS is appended to the
    completion. The completion's tokens are those of ``render(prompt + completion)`` past ``render(prompt)``.

    Raises:
        RowError: a field of the wrong type, or a template for which ``render(prompt)`` is not a prefix.
    """
    if isinstance(prompt, list) and isinstance(completion, list):
        prompt_text = _render(tokenizer, _check_messages(prompt, row_index), add_generation_prompt=True)
        full_text = _render(tokenizer, _check_messages(prompt + completion, row_index))
    elif isinstance(prompt, str) and isinstance(completion, str):
        prompt_text, full_text = prompt, prompt + completion + _end_of_turn(tokenizer)
    else:
        raise RowError(f"row {row_index}: 'prompt' and 'completion' must both be strings or both lists of messages")
    if not full_text.startswith(prompt_text):
        raise RowError(f"row {row_index}: the rendered prompt is not a prefix of the rendered prompt + completion")
    encoding = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = list(input_ids)
    if completion_only_loss:
        labels = [tok if start >= len(prompt_text) else IGNORE_INDEX
                  for tok, (start, _) in zip(input_ids, encoding["offset_mapping"])]
    if labels:
        labels[0] = IGNORE_INDEX
    return Example(input_ids, labels)


def tokenize_text(tokenizer: Any, text: Any, row_index: int = -1) -> Example:
    """Tokenize a plain ``text`` row with EOS appended; every token is supervised.

    Raises:
        RowError: ``text`` is not a non-empty string.
    """
    if not isinstance(text, str) or not text:
        raise RowError(f"row {row_index}: field 'text' must be a non-empty string")
    input_ids = list(tokenizer(text + _end_of_turn(tokenizer), add_special_tokens=False)["input_ids"])
    labels = list(input_ids)
    labels[0] = IGNORE_INDEX
    return Example(input_ids, labels)


def truncate(example: Example, max_length: Optional[int]) -> Example:
    """Keep the first ``max_length`` tokens (TRL's ``truncation_mode="keep_start"``).

    No EOS is added to a cut row: the model is not taught to stop where the data did not stop.
    ``max_length=None`` keeps the row whole.
    """
    if max_length is None or len(example.input_ids) <= max_length:
        return example
    return Example(example.input_ids[:max_length], example.labels[:max_length], truncated=True)


def tokenize_row(
    row: dict,
    tokenizer: Any,
    max_length: Optional[int],
    assistant_only_loss: bool = False,
    completion_only_loss: bool = True,
    row_index: int = -1,
) -> Example:
    """Dispatch on the row's format (``messages``, ``prompt``/``completion``, or ``text``), then truncate.

    Raises:
        RowError: the row has none of the supported fields, or a field is malformed.
    """
    if row.get("messages") is not None:
        example = tokenize_messages(tokenizer, row["messages"], assistant_only_loss, row_index)
    elif row.get("prompt") is not None and row.get("completion") is not None:
        example = tokenize_prompt_completion(
            tokenizer, row["prompt"], row["completion"], completion_only_loss, row_index
        )
    elif row.get("text") is not None:
        example = tokenize_text(tokenizer, row["text"], row_index)
    else:
        raise RowError(
            f"row {row_index}: expected a 'messages' field (chat), 'prompt' + 'completion', or 'text'; "
            f"found fields {sorted(row)}"
        )
    return truncate(example, max_length)
