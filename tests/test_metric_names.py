"""Metric names and values as TRL's ``SFTTrainer`` logs them, so dashboards compare side by side.

TRL 1.16 runs the same tiny model on the same rows (one micro-batch of 2 rows per optimizer step, ``logging_steps=1``,
fp32 on CPU, file order), and its log history goes through transformers' own ``rewrite_logs`` (what ``WandbCallback``
sends: ``loss`` -> ``train/loss``). Every name TRL logs for a training step, except ``train/entropy``, must be one
lit_sft logs, with the same meaning: ``train/num_tokens`` the cumulative non-padding tokens (equal integers),
``train/mean_token_accuracy`` the share of supervised tokens predicted right (one micro-batch per step, so TRL's mean
over micro-batches is the step's token mean), ``train/epoch``, ``train/learning_rate``, ``train/grad_norm`` and
``train/loss``. Every name lit_sft logs is documented in ``lit_sft.metrics.METRICS`` and the README table.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from conftest import ROOT
from sft_helpers import QWEN_TOKENIZER, StepRecorder, chat_rows, cpu_trainer, save_tiny_model, sft_data, sft_module, \
    write_jsonl

STEPS, BATCH = 4, 2
HPARAMS = dict(learning_rate=5e-3, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
               warmup_ratio=0.25, max_grad_norm=1.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import lightning as L
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.integration_utils import rewrite_logs
    from trl import SFTConfig, SFTTrainer

    from lit_sft.data.loading import resolve_path

    tmp = tmp_path_factory.mktemp("metric_names")
    rows = chat_rows(STEPS * BATCH, seed=3)
    data = write_jsonl(str(tmp / "rows.jsonl"), rows)
    model_dir = save_tiny_model(str(tmp / "init"), seed=0)
    template = os.path.join(os.path.dirname(trl.__file__), "chat_templates", "qwen2_5.jinja")

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    tokenizer = AutoTokenizer.from_pretrained(resolve_path(QWEN_TOKENIZER))
    with open(template) as f:
        tokenizer.chat_template = f.read()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    args = SFTConfig(output_dir=str(tmp / "trl"), use_cpu=True, bf16=False, seed=42, max_steps=STEPS,
                     per_device_train_batch_size=BATCH, learning_rate=HPARAMS["learning_rate"],
                     lr_scheduler_type=HPARAMS["lr_scheduler_type"], lr_scheduler_kwargs=HPARAMS["lr_scheduler_kwargs"],
                     warmup_steps=HPARAMS["warmup_ratio"], max_grad_norm=1.0, logging_steps=1, report_to=[],
                     save_strategy="no", max_length=None, dataloader_num_workers=0, disable_tqdm=True)
    trainer = InOrder(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    trl_steps = [rewrite_logs({k: v for k, v in h.items() if k != "step"}) for h in trainer.state.log_history
                 if "loss" in h]

    L.seed_everything(42)
    recorder = StepRecorder()
    module = sft_module(model_dir, **HPARAMS)
    dm = sft_data(data, chat_template=template, max_length=None, shuffle=False, per_device_train_batch_size=BATCH,
                  gradient_accumulation_steps=1)
    cpu_trainer(str(tmp / "lit"), [recorder], max_epochs=1).fit(module, dm)
    lit_steps = [{k: v for k, v in step.items() if "/" in k} for step in recorder.steps]  # the logged metrics
    return trl_steps, lit_steps


@pytest.mark.slow
def test_trl_names_are_lit_sft_names_with_the_same_values(runs):
    trl_steps, lit_steps = runs
    assert len(trl_steps) == len(lit_steps) == STEPS
    trl_names = set(trl_steps[0]) - {"train/entropy"}  # TRL's entropy: not computed by lit_sft
    assert {"train/loss", "train/grad_norm", "train/learning_rate", "train/epoch", "train/mean_token_accuracy",
            "train/num_tokens"} <= trl_names  # what TRL 1.16 logs, through WandbCallback's rewrite
    missing = trl_names - set(lit_steps[0])
    assert not missing, f"TRL logs {sorted(missing)}, lit_sft does not"
    for i, (trl, lit) in enumerate(zip(trl_steps, lit_steps), start=1):
        print(f"step {i}: num_tokens trl {trl['train/num_tokens']:.0f} lit {lit['train/num_tokens']:.0f}, accuracy "
              f"trl {trl['train/mean_token_accuracy']:.6f} lit {lit['train/mean_token_accuracy']:.6f}")
        assert lit["train/num_tokens"] == trl["train/num_tokens"]  # cumulative, exact
        assert lit["train/mean_token_accuracy"] == pytest.approx(trl["train/mean_token_accuracy"], abs=1e-6)
        assert lit["train/epoch"] == pytest.approx(trl["train/epoch"], abs=1e-9)
        assert lit["train/learning_rate"] == pytest.approx(trl["train/learning_rate"], rel=1e-9)
        assert lit["train/loss"] == pytest.approx(trl["train/loss"], rel=1e-5)
        assert lit["train/grad_norm"] == pytest.approx(trl["train/grad_norm"], rel=1e-4)
    cumulative = [s["train/num_tokens"] for s in lit_steps]
    assert cumulative == [sum(s["train/step_tokens"] for s in lit_steps[:i + 1]) for i in range(STEPS)]


@pytest.mark.slow
def test_every_logged_name_is_documented(runs):
    from lit_sft.metrics import METRICS

    _, lit_steps = runs
    documented = {re.escape(name).replace("<source>", "[^/]+") for name in METRICS}
    for name in lit_steps[0]:
        assert any(re.fullmatch(pattern, name) for pattern in documented), f"{name} is not in lit_sft.metrics.METRICS"


def test_readme_table_lists_every_metric_with_its_unit():
    from lit_sft.metrics import METRICS

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    rows = dict(re.findall(r"^\| `([a-z_/<>]+)` \| ([^|]+?) \|", readme, flags=re.M))
    table = {name: unit for name, unit in rows.items() if name.startswith(("train/", "eval/"))}
    assert table == METRICS
    with open(os.path.join(ROOT, "lit_sft", "metrics.py")) as f:
        docstring = f.read().split('"""')[1]
    for name, unit in METRICS.items():
        assert f"| ``{name}`` | {unit} |" in docstring, name
