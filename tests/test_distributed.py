"""Data parallelism does not change the optimizer step: 2 processes = 1 process with the same rows per step.

7 rows with answers of very different lengths, in file order, 2 optimizer steps of 4 + 3 rows. With 2 ranks x
micro-batch 1 x accumulation 2, the planner balances the ranks' compute, but with 2 rows per rank and one row far
longer than the others their token counts still differ ~2x, and in the short last step one rank runs a filler
micro-batch (:func:`rank_rows`). Each 2-process run (``tests/scripts/sft_run.py``, gloo on CPU) must end with the
parameters of the single-process run (micro-batch 4, in this process) and of the plain-PyTorch reference
(``tests/sft_harness.py``) within 1e-6, through DDP and DeepSpeed ZeRO-2 (ZeRO-3: ``tests/test_zero3.py``). A
normalisation by each rank's own tokens (averaging the ranks' token means) would land >> 1e-6 away. The logged
``train/rank_token_imbalance`` is checked against the plan's tokens per rank.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from sft_harness import (fit_lit_sft, global_token_mean, max_abs_diff, model_params, reference_adamw, run_script,
                         save_tiny_qwen2, token_ids, write_rows)

from lit_sft.data.sampler import plan_epoch

ANSWER_WORDS = [150, 1, 60, 4, 100, 2, 30]
TOL = 1e-6


def _plan(ids, max_tokens_per_micro_batch=None):
    """lit_sft's plan for 2 ranks x 1 row x 2 micro-batches, rows in file order (every token is supervised)."""
    return plan_epoch([len(r) - 1 for r in ids], 1, 2, 2, seed=0, epoch=0, shuffle=False,
                      lengths=[len(r) for r in ids], max_tokens_per_micro_batch=max_tokens_per_micro_batch,
                      padded=max_tokens_per_micro_batch is None)


def rank_rows(ids):
    """Rows per (step, rank) under 2 ranks x 1 row x 2 micro-batches, as lit_sft's planner deals them."""
    return [[[ids[r] for mb in rank if not mb.filler for r in mb.rows] for rank in step.micro_batches]
            for step in _plan(ids)]


def rank_token_imbalance(ids, step, max_tokens_per_micro_batch=None):
    """max / mean over ranks of the tokens a rank runs in ``step`` (fillers included: they are computed)."""
    plan = _plan(ids, max_tokens_per_micro_batch)[step]
    tokens = [sum(len(ids[r]) for mb in rank for r in mb.rows) for rank in plan.micro_batches]
    return max(tokens) / (sum(tokens) / len(tokens))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    rows = write_rows(str(tmp / "rows.jsonl"), ANSWER_WORDS)
    model_dir = save_tiny_qwen2(str(tmp / "model"))
    ids = token_ids(rows)
    reference, _ = reference_adamw(model_dir, [ids[:4], ids[4:]])
    _, module = fit_lit_sft(model_dir, str(tmp / "rows.jsonl"), 4, 1, max_steps=2)
    return dict(tmp=tmp, data=str(tmp / "rows.jsonl"), model_dir=model_dir, ids=ids, reference=reference,
                single=model_params(module))


def test_single_process_matches_reference(setup):
    diff = max_abs_diff(setup["single"], setup["reference"])
    print(f"single process (2 steps) vs plain PyTorch: max |param diff| = {diff:.3e}")
    assert diff < TOL


def test_ranks_hold_very_different_token_counts(setup):
    tokens = [[sum(len(r) - 1 for r in rank) for rank in step] for step in rank_rows(setup["ids"])]
    assert all(max(step) > 1.5 * min(step) for step in tokens), tokens


def test_per_rank_token_mean_would_be_caught(setup):
    """Averaging the ranks' own token means (what DDP gives a per-rank-normalised loss) moves the parameters far
    beyond the tolerance: the comparisons below can see a wrong normalisation."""
    def mean_of_rank_means(model, ranks):
        return torch.stack([global_token_mean(model, rows) for rows in ranks]).mean()

    naive, _ = reference_adamw(setup["model_dir"], rank_rows(setup["ids"]), loss=mean_of_rank_means)
    gap = max_abs_diff(naive, setup["reference"])
    print(f"per-rank token means: max |param - reference| = {gap:.3e}")
    assert gap > 1000 * TOL


@pytest.mark.slow
@pytest.mark.parametrize("strategy,extra", [
    ("ddp", ()), ("zero2", ()),
    # padding-free micro-batches of <= 128 tokens (a longer row goes alone): rows are dealt to ranks by compute
    # and each rank's rows packed; a rank with fewer micro-batches splits one or runs a filler
    ("ddp", ("--padding-free", "--max-tokens-per-micro-batch", "128")),
], ids=["ddp", "zero2", "ddp-token-budget"])
def test_two_processes_equal_single_process(setup, strategy, extra):
    out = setup["tmp"] / (strategy + "".join(extra))
    run_script("tests/scripts/sft_run.py", "--model-dir", setup["model_dir"], "--data", setup["data"], "--out",
               str(out), "--strategy", strategy, "--devices", "2", "--micro", "1", "--accum", "2", "--max-steps", "2",
               *extra)
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["global_step"] == 2
    assert report["last_step_metrics"]["train/step_loss_tokens"] == sum(len(r) - 1 for r in setup["ids"][4:])
    budget = int(extra[-1]) if extra else None
    for step, metrics in enumerate(report["steps"]):
        assert metrics["train/rank_token_imbalance"] == pytest.approx(
            rank_token_imbalance(setup["ids"], step, budget), rel=1e-12)
    params = torch.load(os.path.join(out, "params.pt"))
    to_single, to_reference = max_abs_diff(params, setup["single"]), max_abs_diff(params, setup["reference"])
    print(f"{strategy} {' '.join(extra)} x2: max |param diff| vs single process = {to_single:.3e}, "
          f"vs plain PyTorch = {to_reference:.3e}")
    assert to_single < TOL and to_reference < TOL
