"""``train/loss/<source>`` of a dataset mixture is exact: per step, the token mean of each source's rows, across
gradient accumulation and data-parallel ranks, like ``train/loss``.

Two sources of chat rows with very different answer lengths are mixed (``data.dataset_mixture``); lit_sft trains 2
optimizer steps of 4 rows (1 process x 2 rows x 2 micro-batches, padded and padding-free; 2 gloo processes x 1 row x
2 micro-batches). The plain-PyTorch reference (``tests/sft_harness.py``) takes the mixture's rows in order, 4 per
step, and before each AdamW step computes, with transformers' own loss one row at a time, every source's summed
token loss over its supervised tokens. An average of per-micro-batch or per-rank means would differ from it by far
more than the tolerance (the rows' token counts differ ~20x).
"""

from __future__ import annotations

import json
import os
import re

import lightning as L
import pytest
import torch

from sft_harness import (EPS, LR, fit_lit_sft, global_token_mean, load_model, max_abs_diff, model_params, row_losses,
                         run_script, save_tiny_qwen2, token_ids, write_rows)

REL = 1e-5


class RecordSteps(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        metrics = getattr(module, "last_step_metrics", None)
        if metrics is not None and (not self.steps or self.steps[-1] is not metrics):
            self.steps.append(metrics)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lit_sft.data.mixture import SOURCE_COLUMN, as_mixture, load_mixture, source_names

    tmp = tmp_path_factory.mktemp("mix")
    short = write_rows(str(tmp / "short.jsonl"), [1, 3, 2, 5, 1, 4])
    long = write_rows(str(tmp / "long.jsonl"), [60, 25, 90, 40, 70])
    mixture = {"datasets": [{"id": str(tmp / "short.jsonl"), "weight": 0.5}, {"id": str(tmp / "long.jsonl")}],
               "seed": 5}
    rows = load_mixture(as_mixture(mixture))["train"]
    ids = token_ids(rows)
    sources = rows[SOURCE_COLUMN]
    assert len(ids) == 8 and set(sources) == {0, 1} and len(short) + len(long) == 11
    model_dir = save_tiny_qwen2(str(tmp / "model"), pretrain_on=ids[:2])  # rows' mean losses differ
    names = source_names(as_mixture(mixture))
    # plain PyTorch: per step (rows in mixture order, 4 per step), the per-source token means, then one AdamW step
    model = load_model(model_dir).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, betas=(0.9, 0.999), weight_decay=0.0)
    reference = []
    for start in (0, 4):
        step_ids, step_sources = ids[start:start + 4], sources[start:start + 4]
        with torch.no_grad():
            sums, counts = row_losses(model, step_ids)
        per_source = {}
        for k, name in enumerate(names):
            mine = [i for i, s in enumerate(step_sources) if s == k]
            if mine:
                per_source[f"train/loss/{name}"] = sum(sums[i].item() for i in mine) / sum(counts[i] for i in mine)
                row_means = sum(sums[i].item() / counts[i] for i in mine) / len(mine)
                if len(mine) > 1:  # a mean of row (or micro-batch) means would be caught
                    assert abs(row_means - per_source[f"train/loss/{name}"]) > 100 * REL * row_means
        per_source["train/loss"] = sum(s.item() for s in sums) / sum(counts)
        reference.append(per_source)
        optimizer.zero_grad()
        global_token_mean(model, step_ids).backward()
        optimizer.step()
    # both steps mix both sources
    assert all(len(step) == 3 for step in reference)
    return dict(tmp=tmp, mixture=mixture, model_dir=model_dir, reference=reference, names=names,
                params={n: p.detach().clone() for n, p in model.named_parameters()})


def _check(steps, reference, label):
    assert len(steps) == len(reference) == 2
    for s, (got, want) in enumerate(zip(steps, reference)):
        per_source = {k: v for k, v in got.items() if k.startswith("train/loss")}
        assert per_source.keys() == want.keys(), (label, s)
        for key, value in want.items():
            print(f"{label} step {s} {key}: {per_source[key]:.7f} vs reference {value:.7f}")
            assert abs(per_source[key] - value) <= REL * value, (label, s, key)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_per_source_loss_with_accumulation(setup, padding_free):
    record = RecordSteps()
    _, module = fit_lit_sft(setup["model_dir"], None, 2, 2, max_steps=2, callbacks=[record],
                            dataset_mixture=setup["mixture"], padding_free=padding_free)
    _check(record.steps, setup["reference"], "1 process, padding-free" if padding_free else "1 process")
    assert max_abs_diff(model_params(module), setup["params"]) < 1e-6


@pytest.mark.slow
def test_per_source_loss_across_two_processes(setup):
    out = setup["tmp"] / "ddp"
    run_script("tests/scripts/sft_run.py", "--model-dir", setup["model_dir"], "--dataset-mixture",
               json.dumps(setup["mixture"]), "--out", str(out), "--strategy", "ddp", "--devices", "2", "--micro", "1",
               "--accum", "2", "--max-steps", "2")
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    _check(report["steps"], setup["reference"], "2 processes")
    assert max_abs_diff(torch.load(os.path.join(out, "params.pt")), setup["params"]) < 1e-6


@pytest.mark.slow
def test_cli_mixture_overlay(tmp_path, monkeypatch, capsys):
    """``configs/mixture.yaml`` parses over the recipe; a mixture on the tiny config logs ``train/loss/<source>`` to
    the CSV log, with loader workers, and the model card names the mixture's datasets."""
    import yaml

    from conftest import ROOT
    from lit_sft.cli import main
    from sft_helpers import read_metrics_csv

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/qwen_zero3.yaml", "--config", "configs/mixture.yaml", "--print_config"])
    lines = [line for line in capsys.readouterr().out.splitlines() if not re.match(r"\[\d{4}-\d\d-\d\d ", line)]
    mixture = yaml.safe_load("\n".join(lines))["data"]["dataset_mixture"]
    assert [(s["config"], s["weight"]) for s in mixture["datasets"]] == [("math", 0.5), ("code", 1.0), ("science", 1.0)]
    overlay = tmp_path / "mix.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"dataset_mixture": {
        "datasets": [{"id": "data/tiny_math.jsonl", "weight": 0.25, "name": "quarter"},
                     {"id": "data/tiny_math.jsonl", "weight": 0.5, "name": "half"}], "seed": 1}}}))
    out = tmp_path / "run"
    main(["fit", "--config", "configs/tiny_cpu.yaml", "--config", str(overlay), "--trainer.max_steps", "2",
          "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false", "--data.num_workers", "2",
          "--run.output_dir", str(out)])
    metrics = read_metrics_csv(str(out / "logs" / "metrics.csv"))
    assert sorted(metrics) == [1, 2]
    for step in metrics.values():
        assert {"train/loss/quarter", "train/loss/half"} <= set(step)
        # the step's loss is the token-weighted mean of the sources' losses: between them
        low, high = sorted((step["train/loss/quarter"], step["train/loss/half"]))
        assert low - 1e-6 <= step["train/loss"] <= high + 1e-6
    assert "`data/tiny_math.jsonl`" in (out / "README.md").read_text()
