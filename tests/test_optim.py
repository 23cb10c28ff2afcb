"""The learning rate of every optimizer step of a real Trainer run is transformers' schedule for the same settings.

The reference is computed independently of ``lit_sft/optim.py``: ``transformers.get_scheduler`` on a dummy
optimizer stepped once per optimizer step, with the warmup length from transformers' own
``TrainingArguments(warmup_steps=0.05).get_warmup_steps`` (a ratio, rounded up). 22 steps make the rounding matter:
22 x 0.05 = 1.1 warmup steps, which is 2 rounded up and 1 rounded or truncated.
"""

from __future__ import annotations

import math

import pytest
import torch

from sft_helpers import StepRecorder, chat_rows, cpu_trainer, save_tiny_model, sft_data, sft_module, write_jsonl

PEAK_LR, WARMUP_RATIO, MIN_LR_RATE = 1e-3, 0.05, 0.1
ROWS, EPOCHS = 11, 2  # one row per optimizer step: 22 steps over two epochs


def reference_lrs(total: int) -> list[float]:
    """LR at each of ``total`` optimizer steps, as transformers' ``Trainer`` schedules it."""
    from transformers import TrainingArguments, get_scheduler

    args = TrainingArguments(output_dir="unused", warmup_steps=WARMUP_RATIO, learning_rate=PEAK_LR, report_to=[],
                             lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": MIN_LR_RATE})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(total),
                              num_training_steps=total, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_reference_is_sensitive_to_warmup_rounding():
    """Guards the choice of 22 steps: ceil and round give different warmups, so a rounding bug changes the LRs."""
    from transformers import TrainingArguments

    total = ROWS * EPOCHS
    assert TrainingArguments(output_dir="unused", warmup_steps=WARMUP_RATIO).get_warmup_steps(total) == 2
    assert round(total * WARMUP_RATIO) == int(total * WARMUP_RATIO) == 1


def test_lr_of_every_step_matches_transformers(tmp_path):
    data = write_jsonl(str(tmp_path / "rows.jsonl"), chat_rows(ROWS, seed=3))
    model = save_tiny_model(str(tmp_path / "init"))
    recorder = StepRecorder()
    module = sft_module(model, learning_rate=PEAK_LR, warmup_ratio=WARMUP_RATIO,
                        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": MIN_LR_RATE},
                        weight_decay=0.01)  # two parameter groups (decay / no decay): both must follow the schedule
    trainer = cpu_trainer(str(tmp_path), [recorder], max_epochs=EPOCHS)
    trainer.fit(module, sft_data(data, per_device_train_batch_size=1, gradient_accumulation_steps=1))

    total = ROWS * EPOCHS
    want = reference_lrs(total)
    assert trainer.global_step == total and recorder.column("global_step") == list(range(1, total + 1))
    assert all(recorder.column("train_mode"))  # from_pretrained returns eval mode; training must not stay in it
    seen = recorder.column("lrs")  # what the optimizer held when it stepped, every parameter group
    assert all(len(groups) == 2 for groups in seen)
    diff = max(abs(lr - w) for groups, w in zip(seen, want) for lr in groups)
    logged = recorder.column("train/learning_rate")  # what lit_sft logged for the step
    logged_diff = max(abs(lr - w) for lr, w in zip(logged, want))
    print(f"\nmax |LR - transformers| over {total} steps: optimizer {diff:.3g}, logged {logged_diff:.3g}")
    assert diff <= 1e-12 and logged_diff <= 1e-12
    # The shape itself: linear warmup over 2 steps from 0, peak at step 3, cosine down towards 10% of the peak.
    assert seen[0][0] == 0.0 and seen[1][0] == pytest.approx(PEAK_LR / 2) and seen[2][0] == PEAK_LR
    assert PEAK_LR * MIN_LR_RATE < seen[-1][0] < seen[-2][0]
    assert math.isclose(want[-1], PEAK_LR * (MIN_LR_RATE + (1 - MIN_LR_RATE) * 0.5 * (1 + math.cos(math.pi * 19 / 20))))
