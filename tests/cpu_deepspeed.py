"""Test-only: DeepSpeed ZeRO on CPU (gloo), so the ZeRO-3 paths run in CI without a GPU.

Lightning's ``DeepSpeedStrategy`` refuses a CPU accelerator. This subclass of our strategy (1) skips that check in
``setup_environment``, (2) skips the CUDA device-index validation in ``setup_distributed``, and (3) passes the local
rank as ``device_rank`` to ``deepspeed.initialize`` (``root_device.index`` is ``None`` on CPU). Nothing else changes.
"""

from __future__ import annotations

import argparse
from typing import Any

from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.fabric.utilities.seed import reset_seed

from lit_sft.strategy import SFTDeepSpeedStrategy


class CPUDeepSpeedStrategy(SFTDeepSpeedStrategy):
    """``SFTDeepSpeedStrategy`` that accepts ``accelerator="cpu"`` (process group backend: gloo)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
        import deepspeed

        params = filter(lambda p: p.requires_grad, model.parameters())
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=params, optimizer=optimizer, lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, ds_optimizer

    def _initialize_deepspeed_inference(self, model: Any) -> None:
        """Lightning's (``trainer.validate``), with the local rank as ``device_rank`` (``root_device.index`` is
        ``None`` on CPU)."""
        import deepspeed
        from lightning.pytorch.strategies.deepspeed import remove_module_hooks

        config = {"train_micro_batch_size_per_gpu": 1}
        if self.zero_stage_3:
            config.update({"zero_allow_untested_optimizer": self.config["zero_allow_untested_optimizer"],
                           "zero_optimization": self.config["zero_optimization"]})
        remove_module_hooks(model)
        self.model, _, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=config, model=model, optimizer=None,
            lr_scheduler=None, model_parameters=[], dist_init_required=False)
