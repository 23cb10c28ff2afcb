"""The Trainer settings under which lit_sft's optimizer step is exact, checked before the model is built.

Every model key must hold under every strategy the CLI accepts: ``SFTModule.setup`` calls :func:`check_trainer`, so
a library user's own ``Trainer`` is checked as the CLI's is, before any weight is loaded.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

from lit_sft.strategy import SFTDeepSpeedStrategy


def check_trainer(trainer: L.Trainer) -> None:
    """Check that ``trainer``'s strategy and precision keep lit_sft's optimizer step exact.

    Exact: one device (``SingleDeviceStrategy``), ``DDPStrategy`` (gradients averaged over ranks, which the loss's
    ``world_size / tokens`` scale expects; ``clip_grad_norm_`` on the full, reduced gradients) and
    :class:`lit_sft.SFTDeepSpeedStrategy` (clips with ``model.max_grad_norm`` inside DeepSpeed's step and never divides
    by an accumulation count, see ``lit_sft/strategy.py``).

    Raises:
        ValueError: Lightning's own ``DeepSpeedStrategy`` (``deepspeed``, ``deepspeed_stage_3``, ...: it ignores
            ``model.max_grad_norm`` and manages accumulation itself); FSDP and other sharding strategies
            (``torch.nn.utils.clip_grad_norm_`` sees only the local shard, so clipping and ``grad_norm`` would be
            wrong); any other strategy (untested); ``precision: 16-mixed`` outside DeepSpeed (the gradients would be
            clipped while still multiplied by the GradScaler's scale).
    """
    strategy = trainer.strategy
    name = type(strategy).__name__
    use = ("use lit_sft.SFTDeepSpeedStrategy (e.g. trainer.strategy: {class_path: lit_sft.SFTDeepSpeedStrategy, "
           "init_args: {zero_stage: 3}}), ddp, or one device")
    if isinstance(strategy, DeepSpeedStrategy) and not isinstance(strategy, SFTDeepSpeedStrategy):
        raise ValueError(f"trainer.strategy={name} (Lightning's own DeepSpeed strategy) ignores model.max_grad_norm "
                         f"and manages gradient accumulation itself, so lit_sft's step would not be exact; {use}")
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy, SFTDeepSpeedStrategy)):
        raise ValueError(f"trainer.strategy={name} is not supported by lit_sft (with sharded parameters, "
                         f"clip_grad_norm_ sees only this rank's shard: model.max_grad_norm would be wrong); {use}")
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and not isinstance(strategy, SFTDeepSpeedStrategy):
        raise ValueError(f"trainer.precision={trainer.precision_plugin.precision!r} scales the loss with a GradScaler, "
                         "and lit_sft would clip the still-scaled gradients (model.max_grad_norm); use bf16-mixed "
                         "or 32-true, or lit_sft.SFTDeepSpeedStrategy")
