"""The optimizer step minimises the global token mean, however the step is cut into micro-batches.

lit_sft's loss (``lit_sft/loss.py``) back-propagates ``loss_sum * world_size / step_loss_tokens`` per micro-batch
and ``SFTModule`` steps after the step's last micro-batch. These tests train the same 4 rows (answers of very
different lengths) for ONE optimizer step through a real Lightning ``Trainer`` as 4x1, 1x4 and 2x2
(micro-batch rows x accumulation) and check, against a plain-PyTorch AdamW step on
``sum(token losses) / supervised tokens`` of the full batch (``tests/sft_harness.py``):
the gradients the optimizer sees, the parameters after the step, and that the naive mean of micro-batch means (a
common bug) would be caught. One more test checks clipping against ``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from sft_harness import (fit_lit_sft, global_token_mean, grads, load_model, max_abs_diff, model_params,
                         reference_adamw, row_losses, save_tiny_qwen2, token_ids, write_rows)

ANSWER_WORDS = [150, 1, 40, 6]  # supervised tokens per row differ ~8x
TOL = 1e-6


class GradRecorder(L.Callback):
    """Copies the gradients the optimizer is about to use (after ``SFTModule``'s clipping)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append(grads(pl_module.model))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("norm")
    rows = write_rows(str(tmp / "rows.jsonl"), ANSWER_WORDS)
    ids = token_ids(rows)
    model_dir = save_tiny_qwen2(str(tmp / "model"), pretrain_on=ids[:1])  # rows' mean losses now differ
    ref_params, ref_grads = reference_adamw(model_dir, [ids])
    return dict(data=str(tmp / "rows.jsonl"), model_dir=model_dir, ids=ids, ref_params=ref_params,
                ref_grad=ref_grads[0])


def _run(setup, micro, accum, max_grad_norm=None):
    recorder = GradRecorder()
    trainer, module = fit_lit_sft(setup["model_dir"], setup["data"], micro, accum, max_steps=1,
                                  max_grad_norm=max_grad_norm, callbacks=[recorder])
    assert trainer.global_step == 1 and len(recorder.grads) == 1
    return module, recorder.grads[0]


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all parameters."""
    num = sum(((a[k] - b[k]).double() ** 2).sum() for k in b)
    den = sum((b[k].double() ** 2).sum() for k in b)
    return float((num / den).sqrt())


def test_rows_have_very_different_token_counts(setup):
    counts = [len(r) - 1 for r in setup["ids"]]
    assert max(counts) > 5 * min(counts), counts


@pytest.mark.parametrize("micro,accum", [(4, 1), (1, 4), (2, 2)])
def test_one_step_equals_full_batch_token_mean(setup, micro, accum):
    module, grad = _run(setup, micro, accum)
    grad_diff = max_abs_diff(grad, setup["ref_grad"])
    param_diff = max_abs_diff(model_params(module), setup["ref_params"])
    print(f"{micro}x{accum}: max |grad - ref| = {grad_diff:.3e}, max |param - ref| = {param_diff:.3e}")
    assert grad_diff < TOL and param_diff < TOL
    # the step did move the weights (a zero learning rate would pass the comparison trivially)
    initial = {n: p.detach() for n, p in load_model(setup["model_dir"]).named_parameters()}
    assert max_abs_diff(model_params(module), initial) > 1e-3
    assert module.last_step_metrics["train/num_loss_tokens"] == sum(len(r) - 1 for r in setup["ids"])


@pytest.mark.parametrize("micro", [1, 2])
def test_naive_mean_of_micro_batch_means_differs(setup, micro):
    """The bug these tests exist for: averaging per-micro-batch means weighs short rows' tokens more. Its loss,
    gradient and AdamW update are all > 1% (update: >> TOL) away from the global token mean's."""
    model = load_model(setup["model_dir"]).train()
    ids = setup["ids"]
    correct = global_token_mean(model, ids)
    sums, counts = row_losses(model, ids)
    chunks = [range(i, i + micro) for i in range(0, len(ids), micro)]
    naive = torch.stack([sum(sums[i] for i in c) / sum(counts[i] for i in c) for c in chunks]).mean()
    assert abs(naive.item() - correct.item()) > 0.01 * correct.item()
    naive.backward()
    naive_grad = grads(model)
    assert _rel(naive_grad, setup["ref_grad"]) > 0.01
    # one AdamW step on the naive gradient lands far from the reference parameters
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, eps=1.0, weight_decay=0.0)
    optimizer.step()
    naive_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    gap = max_abs_diff(naive_params, setup["ref_params"])
    print(f"naive {micro}-row micro-batch means: loss {naive.item():.5f} vs {correct.item():.5f}, "
          f"relative grad error {_rel(naive_grad, setup['ref_grad']):.3f}, max |param - ref| {gap:.3e}")
    assert gap > 1000 * TOL
    assert max_abs_diff(init, setup["ref_params"]) > 1000 * TOL


def test_clipping_equals_clip_grad_norm_on_reference_gradient(setup):
    norm = torch.nn.utils.get_total_norm(list(setup["ref_grad"].values())).item()  # as clip_grad_norm_ computes it
    max_norm = norm / 4  # clipping is active
    module, grad = _run(setup, 2, 2, max_grad_norm=max_norm)
    ref_params, ref_grads = reference_adamw(setup["model_dir"], [setup["ids"]], max_grad_norm=max_norm)
    grad_diff, param_diff = max_abs_diff(grad, ref_grads[0]), max_abs_diff(model_params(module), ref_params)
    print(f"clipped to {max_norm:.4g} (norm {norm:.4g}): max |grad - ref| = {grad_diff:.3e}, "
          f"max |param - ref| = {param_diff:.3e}, logged grad_norm {module.last_step_metrics['train/grad_norm']:.6g}")
    assert grad_diff < TOL and param_diff < TOL
    assert module.last_step_metrics["train/grad_norm"] == pytest.approx(norm, rel=1e-6)
    assert max_abs_diff(ref_grads[0], setup["ref_grad"]) > 1000 * TOL  # clipping changed the gradient
