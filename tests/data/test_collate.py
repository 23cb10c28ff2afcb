"""lit_sft.data.collate.PaddingCollator: padding from row lengths, so pad_token == eos_token keeps real EOS tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_sft.data.collate import PaddingCollator
from lit_sft.data.tokenize import IGNORE_INDEX, tokenize_messages, tokenize_text


@pytest.fixture(scope="module")
def pad_is_eos_tokenizer(qwen3_tokenizer):
    tokenizer = copy.deepcopy(qwen3_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert qwen3_tokenizer.pad_token == "<|endoftext|>"  # the shared fixture is untouched
    return tokenizer


def _rows(tokenizer) -> list[dict]:
    """Rows of different lengths that end with, or contain, real EOS (<|im_end|>) tokens; the last one is a filler."""
    examples = [
        tokenize_text(tokenizer, "Short."),
        tokenize_messages(tokenizer, [{"role": "user", "content": "What is 2 + 2?"},
                                      {"role": "assistant", "content": "4"}], assistant_only_loss=True),
        tokenize_text(tokenizer, "A somewhat longer plain text row, ending with the EOS token."),
        tokenize_text(tokenizer, "Filler row."),
    ]
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "supervised": True, "num_items_in_batch": 57,
             "last_in_step": False} for e in examples]
    rows[-1]["supervised"] = False
    return rows


def _expected(rows: list[dict], pad_id: int, width: int) -> dict[str, torch.Tensor]:
    """Hand-built batch from the row lengths alone."""
    input_ids = [[pad_id] * width for _ in rows]
    attention_mask = [[0] * width for _ in rows]
    labels = [[IGNORE_INDEX] * width for _ in rows]
    for i, row in enumerate(rows):
        for j in range(len(row["input_ids"])):
            input_ids[i][j] = row["input_ids"][j]
            attention_mask[i][j] = 1
            if row["supervised"]:
                labels[i][j] = row["labels"][j]
    return {k: torch.tensor(v) for k, v in
            dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels).items()}


@pytest.mark.parametrize("pad_to_multiple_of", [None, 16])
def test_pad_equal_to_eos_keeps_real_eos(pad_is_eos_tokenizer, pad_to_multiple_of):
    tokenizer = pad_is_eos_tokenizer
    eos = tokenizer.eos_token_id
    rows = _rows(tokenizer)
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(set(lengths)) == len(lengths)
    width = max(lengths) if pad_to_multiple_of is None else -(-max(lengths) // pad_to_multiple_of) * pad_to_multiple_of

    batch = PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of)(rows)
    expected = _expected(rows, tokenizer.pad_token_id, width)
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].dtype == torch.long and batch[key].shape == (len(rows), width)
        assert torch.equal(batch[key], expected[key]), key
    assert (batch["num_items_in_batch"], batch["last_in_step"]) == (57, False)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "num_items_in_batch", "last_in_step"}

    # every supervised row's real EOS (text rows end with it) is attended and is a target
    for i, row in enumerate(rows[:-1]):
        n = len(row["input_ids"])
        last_eos = max(j for j in range(n) if row["input_ids"][j] == eos)
        assert batch["attention_mask"][i, last_eos] == 1 and batch["labels"][i, last_eos] == eos
    # the filler row is attended but contributes no target
    assert batch["attention_mask"][-1].sum() == lengths[-1] and (batch["labels"][-1] == IGNORE_INDEX).all()
    # an id-based mask (input_ids != pad_token_id) would have dropped those EOS tokens: this batch tells them apart
    assert not torch.equal((batch["input_ids"] != tokenizer.pad_token_id).long(), batch["attention_mask"])


def test_batches_carry_exactly_the_keys_of_sft_batch():
    """Both collators return only keys that ``SFTBatch`` declares (no dead keys), with the declared shapes; evaluation
    rows (no planner fields) give batches without the step fields; mixture rows give ``source_ids`` per row."""
    from typing import get_type_hints

    from lit_sft.data.batch import SFTBatch
    from lit_sft.data.collate import PaddingFreeCollator

    declared = set(get_type_hints(SFTBatch))
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "source_ids": [1]},
            {"input_ids": [8, 9, 10, 11, 12], "labels": [-100, -100, 10, 11, 12], "seq_lengths": [2, 3],
             "source_ids": [0, 2]}]
    training = [{**r, "supervised": True, "num_items_in_batch": 9, "last_in_step": True} for r in rows]
    names = ("a", "b", "c")
    padded = PaddingCollator(0, source_names=names)(training)
    free = PaddingFreeCollator(source_names=names)(training)
    assert set(padded) <= declared and set(free) <= declared
    assert set(padded) == {"input_ids", "attention_mask", "labels", "num_items_in_batch", "last_in_step",
                           "source_ids", "source_names"}
    assert padded["source_ids"].tolist() == [1, 0, 2] and padded["source_names"] == names
    # padding-free: one entry per concatenated row (the packed item holds two rows)
    assert free["cu_seq_lens_q"].tolist() == [0, 3, 5, 8] and free["source_ids"].tolist() == [1, 0, 2]
    assert free["input_ids"].shape == free["labels"].shape == free["position_ids"].shape == (1, 8)
    evaluation = PaddingFreeCollator()([{k: r[k] for k in ("input_ids", "labels")} for r in rows])
    assert "num_items_in_batch" not in evaluation and "last_in_step" not in evaluation


def test_a_batch_without_the_step_fields_is_refused_by_name():
    from lit_sft.data.batch import check_training_batch

    batch = {"input_ids": torch.zeros(1, 3), "labels": torch.zeros(1, 3), "step_loss_tokens": 4}
    with pytest.raises(KeyError, match=r"lacks \['num_items_in_batch', 'last_in_step'\].*StepBatchSampler"):
        check_training_batch(batch)
    check_training_batch({**batch, "num_items_in_batch": 4, "last_in_step": True})
