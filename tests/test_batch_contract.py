"""``SFTModule`` with a data module of one's own: batches are ``lit_sft.data.batch.SFTBatch``.

A batch without the step fields is refused with an error that names them; the same batches with them train, and the
logged step loss is the global token mean of the step's micro-batches (plain PyTorch reference:
``lit_sft.loss.token_loss_sum`` over full logits, before the update).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from sft_harness import load_model, save_tiny_qwen2
from torch.utils.data import DataLoader

from lit_sft import SFTModule
from lit_sft.loss import token_loss_sum


def _micro_batches(with_step_fields: bool) -> list[dict]:
    """One optimizer step of two padded micro-batches with different supervised-token counts."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for rows, length in ((2, 9), (1, 5)):
        input_ids = torch.randint(0, 1000, (rows, length), generator=g)
        labels = input_ids.clone()
        labels[0, :3] = -100
        batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels})
    if with_step_fields:
        total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for j, b in enumerate(batches):
            b.update(num_items_in_batch=total, last_in_step=j == len(batches) - 1)
    return batches


class OwnData(L.LightningDataModule):
    def __init__(self, batches: list[dict]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen2 trained a little on the first row, so that rows' mean losses differ."""
    first = _micro_batches(False)[0]["input_ids"][:1].tolist()
    return save_tiny_qwen2(str(tmp_path_factory.mktemp("own") / "model"), pretrain_on=first)


def _fit(model_dir: str, batches: list[dict]) -> SFTModule:
    module = SFTModule(model_dir, torch_dtype="float32", attn_implementation="sdpa", gradient_checkpointing=False,
                       learning_rate=1e-3)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, OwnData(batches))
    return module


def test_a_batch_without_the_step_fields_names_them(model_dir):
    with pytest.raises(KeyError, match=r"lacks \['num_items_in_batch', 'last_in_step'\]"):
        _fit(model_dir, _micro_batches(with_step_fields=False))


def test_own_batches_with_the_step_fields_train_on_the_global_token_mean(model_dir):
    batches = _micro_batches(with_step_fields=True)
    model = load_model(model_dir)
    with torch.no_grad():
        sums = [token_loss_sum(model(input_ids=b["input_ids"]).logits, b["labels"]) for b in batches]
    want = sum(s[0].item() for s in sums) / sum(int(s[1]) for s in sums)
    mean_of_means = sum(s[0].item() / int(s[1]) for s in sums) / len(sums)
    assert abs(mean_of_means - want) > 1e-3 * want  # the check below can tell the two apart
    module = _fit(model_dir, batches)
    assert module.last_step_metrics["train/step_loss_tokens"] == batches[0]["num_items_in_batch"]
    assert module.last_step_metrics["train/loss"] == pytest.approx(want, rel=1e-5)
