"""The training loader under Lightning's call order: ``iter()`` before ``set_epoch`` (a resumed run), with workers.

Lightning 2.6 creates the training loader's iterator in ``FitLoop.setup_data`` and, on a resumed run, only then calls
``set_epoch`` for the resumed epoch. A ``DataLoader`` with workers pulls batches from its batch sampler as soon as
its iterator exists; the loader must nevertheless yield the epoch set afterwards (these tests fail if it pulls at
``iter()`` time).
"""

from __future__ import annotations

import pytest
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import Dataset

from lit_sft.data.datamodule import _StepLoader
from lit_sft.data.sampler import StepBatchSampler


class _RowOf(Dataset):
    def __getitem__(self, item):
        return item.row


def _rows(batches):
    return [[item.row for item in mb] for mb in batches]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_set_after_iter_is_the_epoch_yielded(num_workers):
    nlt = list(range(1, 13))  # 12 rows, 2 x 2 per step: 3 steps per epoch
    global_step = {"value": 4}  # resumed after step 4: epoch 1, one step of it done
    sampler = StepBatchSampler(nlt, 2, 2, steps_done=lambda: global_step["value"])
    loader = _StepLoader(_RowOf(), batch_sampler=sampler, collate_fn=lambda rows: rows, num_workers=num_workers)
    iterator = iter(loader)  # FitLoop.setup_data
    _set_sampler_epoch(loader, 1)  # FitLoop.on_advance_start
    got = list(iterator)

    want = StepBatchSampler(nlt, 2, 2, steps_done=lambda: 4)
    want.set_epoch(1)
    assert got == _rows(want)
    assert len(got) == 4  # steps 2 and 3 of epoch 1, two micro-batches each


def test_sampler_refuses_an_epoch_the_run_has_passed():
    sampler = StepBatchSampler(list(range(1, 13)), 2, 2, steps_done=lambda: 4)  # epoch 0 has 3 steps
    with pytest.raises(RuntimeError, match="set_epoch"):
        next(iter(sampler))
