"""Strategies and precisions under which a model key would silently not hold are refused before the model is built
(``lit_sft/supported.py``), for library users' own Trainers as for the CLI.

Lightning's stock ``DeepSpeedStrategy`` (``--trainer.strategy deepspeed_stage_3``) ignored ``model.max_grad_norm``
(weights 0.25 away from the clipped reference with ``max_grad_norm: 0.05``); FSDP's sharded parameters make
``clip_grad_norm_`` see one shard; ``16-mixed`` would clip gradients still multiplied by the GradScaler's scale.
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy

from sft_helpers import chat_rows, cpu_trainer, save_tiny_model, sft_data, sft_module, write_jsonl


class StockCPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's own ``DeepSpeedStrategy`` (not lit_sft's) made to accept a CPU, as ``tests/cpu_deepspeed.py``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, ds_optimizer


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("supported")
    return {"data": write_jsonl(str(tmp / "rows.jsonl"), chat_rows(4)), "model": save_tiny_model(str(tmp / "m"))}


def _refused(paths, tmp_path, match, **trainer_kwargs):
    module = sft_module(paths["model"], max_grad_norm=0.05)
    trainer = cpu_trainer(str(tmp_path), max_steps=1, **trainer_kwargs)
    with pytest.raises(ValueError, match=match):
        trainer.fit(module, sft_data(paths["data"]))
    assert module.model is None, "refused only after the model was built"


def test_stock_deepspeed_is_refused_naming_ours(paths, tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29517")
    _refused(paths, tmp_path, r"lit_sft\.SFTDeepSpeedStrategy", strategy=StockCPUDeepSpeedStrategy(stage=3))


def test_sharding_strategies_are_refused():
    """FSDP needs a GPU in Lightning, so the check itself is called (``SFTModule.setup`` calls it on any Trainer)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    from lit_sft.supported import check_trainer

    for strategy in (FSDPStrategy(), ModelParallelStrategy()):
        with pytest.raises(ValueError, match=type(strategy).__name__ + r" is not supported.*max_grad_norm"):
            check_trainer(SimpleNamespace(strategy=strategy, precision_plugin=None))
    check_trainer(SimpleNamespace(strategy=SingleDeviceStrategy("cpu"), precision_plugin=None))


def test_gradscaler_precision_is_refused(paths, tmp_path):
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    _refused(paths, tmp_path, r"16-mixed.*GradScaler", plugins=[plugin], precision=None)
