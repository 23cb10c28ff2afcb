"""Evaluation during training (``lit_sft/evaluation.py``): scheduled in optimizer steps, only between optimizer
steps, and it never changes training.

Setup: 6 training rows, 1 row x 2 micro-batches per optimizer step (3 steps per epoch), 2 epochs, loader workers 2,
fp32 CPU; 3 evaluation rows. Lightning's own schedule (``val_check_interval``) counts micro-batches and zeroes the
gradients before validation, so a validation inside a step halves that step's gradient; here the weights after every
step must be bit-identical with and without evaluation, ``eval/loss`` must appear exactly at the due optimizer steps,
and its value must be the token mean of the evaluation rows under plain transformers.
"""

from __future__ import annotations

import os
import warnings

import lightning as L
import pytest
import torch
import yaml

from sft_helpers import (QWEN_TOKENIZER, StepRecorder, chat_rows, cpu_trainer, read_metrics_csv, save_tiny_model,
                         sft_data, sft_module, weight_digest, write_jsonl)

EPOCHS, STEPS_PER_EPOCH = 2, 3
LR = 1e-2
SETTINGS = dict(per_device_train_batch_size=1, gradient_accumulation_steps=2, per_device_eval_batch_size=2,
                num_workers=2)


class Record(L.Callback):
    """Weight digest after every optimizer step, and ``(global_step, eval/loss)`` after every validation."""

    def __init__(self) -> None:
        self.digests: dict[int, str] = {}
        self.validations: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        if trainer.global_step not in self.digests:
            self.digests[trainer.global_step] = weight_digest(module)

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self.validations.append((trainer.global_step, float(trainer.callback_metrics["eval/loss"])))


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluation")
    os.makedirs(tmp / "data")
    write_jsonl(str(tmp / "data" / "train.jsonl"), chat_rows(6, seed=4))
    test_rows = chat_rows(3, seed=5)
    write_jsonl(str(tmp / "data" / "test.jsonl"), test_rows)
    return {"data": str(tmp / "data"), "model": save_tiny_model(str(tmp / "init"), seed=2), "test_rows": test_rows,
            "tmp": tmp}


def _fit(paths, root, do_eval, callbacks=(), **trainer_kwargs):
    record, steps = Record(), StepRecorder()
    module = sft_module(paths["model"], learning_rate=LR)
    data = sft_data(paths["data"], do_eval=do_eval, **SETTINGS)
    trainer = cpu_trainer(root, [record, steps, *callbacks], max_epochs=EPOCHS, **trainer_kwargs)
    trainer.fit(module, data)
    return record, steps, module, trainer


@pytest.fixture(scope="module")
def no_eval(paths):
    """The reference: the same training without evaluation."""
    record, steps, module, trainer = _fit(paths, str(paths["tmp"] / "no_eval"), do_eval=False)
    assert trainer.global_step == EPOCHS * STEPS_PER_EPOCH
    return record, steps


def reference_val_loss(model, rows) -> float:
    """Token mean of transformers' own loss over ``rows`` (one unpadded row at a time, every target supervised)."""
    from lit_sft.data.loading import load_tokenizer

    tokenizer = load_tokenizer(QWEN_TOKENIZER)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([list(tokenizer.apply_chat_template(row["messages"], tokenize=True)["input_ids"])])
            out = model(input_ids=ids, labels=ids, use_cache=False)
            total += out.loss.double().item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / count


@pytest.mark.parametrize("strategy, eval_steps, due", [
    ("steps", 1, [1, 2, 3, 4, 5, 6]),  # after every optimizer step: the worst case for the old micro-batch schedule
    ("steps", 4, [4]),  # counted over the whole run, across the epoch boundary
    ("epoch", None, [3, 6]),
], ids=["steps1", "steps4", "epoch"])
def test_evaluation_never_changes_training(paths, no_eval, tmp_path, strategy, eval_steps, due):
    from lit_sft.evaluation import SFTEvaluation

    reference, reference_steps = no_eval
    record, steps, module, trainer = _fit(paths, str(tmp_path), do_eval=True,
                                          callbacks=[SFTEvaluation(strategy, eval_steps)], num_sanity_val_steps=2)
    assert [step for step, _ in record.validations] == due
    assert record.digests == reference.digests, "evaluation changed the weights"
    assert [s["train/grad_norm"] for s in steps.steps] == [s["train/grad_norm"] for s in reference_steps.steps]
    # the last evaluation ran on the final weights: compare it with plain transformers on the test rows
    if due[-1] == trainer.global_step:
        want = reference_val_loss(module.model, paths["test_rows"])
        print(f"\neval/loss {record.validations[-1][1]:.10f} vs transformers {want:.10f}")
        assert record.validations[-1][1] == pytest.approx(want, abs=1e-6, rel=0)


def test_lightning_defaults_validate_at_epoch_ends_only(paths, no_eval, tmp_path):
    """A library user's plain ``Trainer`` (no lit_sft callback): SFTModule adds the evaluation schedule itself."""
    reference, _ = no_eval
    record, _, _, _ = _fit(paths, str(tmp_path), do_eval=True)
    assert [step for step, _ in record.validations] == [3, 6]
    assert record.digests == reference.digests


def test_micro_batch_val_check_interval_is_refused(paths, tmp_path):
    """``trainer.val_check_interval: 3`` with 2 micro-batches per step validated inside steps 2, 5 (and wiped their
    gradients); it is refused, naming the keys to use."""
    with pytest.raises(ValueError, match="eval_steps"):
        _fit(paths, str(tmp_path), do_eval=True, val_check_interval=3)


def test_no_evaluation_requests_no_loader_and_warns_nothing(paths, no_eval, tmp_path):
    """With ``do_eval: false`` the validation loader is never requested (Lightning warned "Total length of `list`
    across ranks is zero" for the empty one)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(paths, str(tmp_path), do_eval=False, max_steps=1)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "across ranks is zero" in m], messages


def test_eval_batches_give_every_rank_the_same_count():
    from lit_sft.data.datamodule import eval_batches

    for rows, batch, world in [(5, 1, 2), (7, 2, 3), (1, 4, 4), (8, 2, 2)]:
        per_rank = [eval_batches(rows, batch, world, rank) for rank in range(world)]
        assert len({len(b) for b in per_rank}) == 1
        supervised = sorted(r for b in per_rank for mb in b for r, sup in mb if sup)
        assert supervised == list(range(rows))  # every row exactly once over all ranks
        assert all(len(mb) <= batch for b in per_rank for mb in b)


def test_cli_eval_strategy_steps_with_overlay(paths, no_eval, tmp_path, monkeypatch):
    """``lit_sft fit --config base.yaml --config eval.yaml`` with ``run.eval_strategy: steps``, ``run.eval_steps: 2``:
    ``eval/loss`` in ``metrics.csv`` at optimizer steps 2, 4, 6 only, and every step's training metrics exactly those
    of the run without evaluation."""
    from lit_sft.cli import main

    _, reference_steps = no_eval
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    base = {
        "seed_everything": 0,
        "run": {"output_dir": str(out), "save_strategy": "no", "report_to": ["csv"]},
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_epochs": EPOCHS,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"model_name_or_path": paths["model"], "torch_dtype": "float32", "attn_implementation": "sdpa",
                  "gradient_checkpointing": False, "learning_rate": LR, "warmup_ratio": 0.05},
        "data": {"dataset_name": paths["data"], "tokenizer_name_or_path": QWEN_TOKENIZER, "max_length": 128,
                 **SETTINGS},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({"run": {"eval_strategy": "steps", "eval_steps": 2}}))
    main(["fit", "--config", "base.yaml", "--config", "eval.yaml"])
    logged = read_metrics_csv(str(out / "logs" / "metrics.csv"))
    assert sorted(step for step, m in logged.items() if "eval/loss" in m) == [2, 4, 6]
    for want in reference_steps.steps:
        got = logged[want["global_step"]]
        assert got["train/loss"] == want["train/loss"] and got["train/grad_norm"] == want["train/grad_norm"]


# -- eval/loss across data-parallel ranks -----------------------------------------------------------------------------
# 5 evaluation rows with answers of very different lengths, 1 row per evaluation batch: under 2 ranks rank 0 evaluates
# rows 0, 2, 4 (long) and rank 1 rows 1, 3 (short) plus a filler batch, so both run 3 forwards. eval/loss must be the
# token mean over all 5 rows (the single-process value), not a mean of the ranks' means.
EVAL_ANSWER_WORDS = [150, 1, 60, 4, 100]


@pytest.fixture(scope="module")
def dp_setup(tmp_path_factory):
    from sft_harness import run_script, save_tiny_qwen2, write_rows

    tmp = tmp_path_factory.mktemp("eval_dp")
    os.makedirs(tmp / "data")
    write_rows(str(tmp / "data" / "train.jsonl"), [5, 9, 3, 7])
    write_rows(str(tmp / "data" / "test.jsonl"), EVAL_ANSWER_WORDS)
    model_dir = save_tiny_qwen2(str(tmp / "model"))
    args = ("--model-dir", model_dir, "--data", str(tmp / "data"))
    run_script("tests/scripts/eval_run.py", *args, "--out", str(tmp / "single"), "--devices", "1")
    return {"tmp": tmp, "args": args, "single": _reports(tmp / "single")}


def _reports(folder):
    import json

    return [json.loads((folder / name).read_text()) for name in sorted(os.listdir(folder))]


@pytest.mark.slow
def test_val_loss_is_the_token_mean_over_ranks(dp_setup):
    from sft_harness import run_script

    out = dp_setup["tmp"] / "ddp"
    run_script("tests/scripts/eval_run.py", *dp_setup["args"], "--out", str(out), "--devices", "2")
    (single,), ranks = dp_setup["single"], _reports(out)
    assert [r["world_size"] for r in ranks] == [2, 2] and single["global_step"] == 1
    assert single["batches"] == 5
    assert [r["batches"] for r in ranks] == [3, 3]  # each rank evaluates its share, padded to the same count
    assert sum(r["tokens"] for r in ranks) == single["tokens"]
    assert ranks[0]["tokens"] > 5 * ranks[1]["tokens"]  # a mean of the ranks' means would be far off
    print(f"\neval/loss: 1 process {single['val_loss']:.8f}, 2 processes {ranks[0]['val_loss']:.8f}")
    assert ranks[0]["val_loss"] == ranks[1]["val_loss"]
    assert ranks[0]["val_loss"] == pytest.approx(single["val_loss"], abs=1e-6, rel=0)
