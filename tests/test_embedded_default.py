"""README command 1 states what the embedded default trains (issue 9 item 13: "a few minutes" measured 9 min 07 s).

The README's figures were measured on the shipped ``configs/tiny_cpu.yaml``; this keeps the config and the sentence
that describes it in step: the optimizer steps and rows per step the data module actually plans.
"""

from __future__ import annotations

import os
import re

import yaml
from conftest import ROOT

from lit_sft import SFTDataModule


def test_readme_states_the_work_the_tiny_config_plans(monkeypatch):
    monkeypatch.chdir(ROOT)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    claim = re.search(r"Training is (\d+) optimizer steps of (\d+) rows .* about (\d+) CPU-seconds", readme, re.S)
    assert claim, "README command 1 must say how many steps of how many rows, and the measured CPU time"
    steps, rows, cpu_seconds = (int(g) for g in claim.groups())
    assert re.search(r"measured \d+ min \d+ s (and \d+ min \d+ s )?wall", readme)

    with open(os.path.join(ROOT, "configs", "tiny_cpu.yaml")) as f:
        config = yaml.safe_load(f)
    data = SFTDataModule(**config["data"])
    assert config["trainer"]["max_epochs"] == 1 and "max_steps" not in config["trainer"]
    assert data.optimizer_steps_per_epoch == steps
    assert config["data"]["per_device_train_batch_size"] * config["data"]["gradient_accumulation_steps"] == rows
    assert cpu_seconds <= 180  # "a few minutes" on 2 cores must stay true
