"""DeepSpeed ZeRO for SFT, configured with the keys of the recipe's accelerate launcher config.

``accelerate``'s ZeRO-3 YAML (``zero_stage``, ``offload_optimizer_device``, ``offload_param_device``,
``zero3_init_flag``, ``zero3_save_16bit_model``) maps onto Lightning's ``DeepSpeedStrategy``; ``mixed_precision``,
``num_processes`` and ``num_machines`` are the Trainer's ``precision``, ``devices`` and ``num_nodes``.

Two settings are forced because the loss owns the normalisation (``lit_sft/loss.py``):
``managed_gradient_accumulation: false`` (our data module plans accumulation: every ``optimizer.step()`` is a
boundary, and ``backward`` neither reduces early nor divides by an accumulation count) and ``gradient_clipping`` from
``SFTModule.max_grad_norm`` (Lightning forbids ``trainer.gradient_clip_val`` under manual optimization).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Generator, Literal, Optional

from lightning.pytorch.strategies import DeepSpeedStrategy

OffloadDevice = Literal["none", "cpu", "nvme"]


class SFTDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` with the recipe's launcher keys.

    Args:
        zero_stage: ZeRO stage (recipe: 3): 1 shards optimizer states, 2 also gradients, 3 also parameters.
        offload_optimizer_device: ``none``, ``cpu`` or ``nvme`` (recipe: none).
        offload_param_device: ``none``, ``cpu`` or ``nvme`` (recipe: none; stage 3 only).
        zero3_init_flag: build the model already partitioned (``deepspeed.zero.Init``), so no rank ever holds the
            full model (recipe: true). With ``false`` each rank builds the full model and DeepSpeed partitions it.
        zero3_save_16bit_model: gather 16-bit weights on save (``stage3_gather_16bit_weights_on_model_save``;
            recipe: true). The Hugging Face export always gathers full weights (``lit_sft/export.py``).
        **kwargs: any other ``lightning.pytorch.strategies.DeepSpeedStrategy`` argument (``config``, buckets, ...).
    """

    def __init__(
        self,
        zero_stage: int = 3,
        offload_optimizer_device: OffloadDevice = "none",
        offload_param_device: OffloadDevice = "none",
        zero3_init_flag: bool = True,
        zero3_save_16bit_model: bool = True,
        stage3_param_persistence_threshold: Optional[int] = None,
        stage3_prefetch_bucket_size: Optional[int] = None,
        stage3_max_live_parameters: Optional[int] = None,
        stage3_max_reuse_distance: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("logging_batch_size_per_gpu", "auto") == "auto":  # only feeds DeepSpeed's throughput printouts;
            kwargs["logging_batch_size_per_gpu"] = 1  # "auto" would build a train dataloader during model setup
        super().__init__(
            stage=zero_stage,
            offload_optimizer=offload_optimizer_device != "none",
            offload_optimizer_device=offload_optimizer_device if offload_optimizer_device != "none" else "cpu",
            offload_parameters=offload_param_device != "none",
            offload_params_device=offload_param_device if offload_param_device != "none" else "cpu",
            **kwargs,
        )
        self.zero3_init_flag = zero3_init_flag
        self.zero3_save_16bit_model = zero3_save_16bit_model
        self.stage3_knobs = {"stage3_param_persistence_threshold": stage3_param_persistence_threshold,
                             "stage3_prefetch_bucket_size": stage3_prefetch_bucket_size,
                             "stage3_max_live_parameters": stage3_max_live_parameters,
                             "stage3_max_reuse_distance": stage3_max_reuse_distance}

    def _format_config(self) -> None:
        super()._format_config()
        self.config["managed_gradient_accumulation"] = False
        module = self.lightning_module
        max_grad_norm = getattr(module, "max_grad_norm", None) if module is not None else None
        self.config["gradient_clipping"] = float(max_grad_norm or 0.0)
        zero = self.config.setdefault("zero_optimization", {})
        zero["stage3_gather_16bit_weights_on_model_save"] = self.zero3_save_16bit_model
        for key, value in self.stage3_knobs.items():
            if value is not None:
                zero[key] = int(value)

    @property
    def zero3_init(self) -> bool:
        """Whether ``configure_model`` runs inside ``deepspeed.zero.Init`` (ZeRO-3 with ``zero3_init_flag``)."""
        return self.zero_stage_3 and self.zero3_init_flag

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        if self.zero3_init:
            with super().model_sharded_context():
                yield
        else:
            self._init_config_if_needed()
            yield
