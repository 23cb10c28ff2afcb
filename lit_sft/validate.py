"""``lit_sft validate``: the evaluation loss and token accuracy of a checkpoint or an exported model on a split.

It is LightningCLI's own ``validate`` subcommand (``Trainer.validate``, so devices, strategies and precision are the
``trainer:`` keys, as in ``fit``) over the same :class:`lit_sft.SFTModule` evaluation as during training:

* ``eval/loss``: summed token loss over summed supervised tokens of the whole split, all ranks together (one
  all-reduce: ``SFTModule.validation_step`` / ``on_validation_epoch_end``, the ``eval/loss`` of ``fit``);
* ``eval/mean_token_accuracy``: the share of those tokens the argmax predicts; ``eval/loss_tokens``: their count.

The split is ``data.dataset_test_split`` of ``data:`` (``data.do_eval`` is turned on), tokenized as ``fit`` does; the
training split is not read. The model: ``--ckpt_path`` (a ``step-NNNNNN.ckpt`` file or a DeepSpeed ZeRO checkpoint
folder: its weights, consolidated with :func:`lit_sft.export.checkpoint_state_dict` as ``lit_sft export`` does, go
into the architecture of ``model:`` right after it is built, by :class:`CheckpointWeights`), or without it whatever
``model:`` loads, e.g. an exported folder (``--model.model_name_or_path outputs/run``). Nothing is written: the results
are printed (Lightning's table, and one log line with full precision, :func:`summary`); the run's loggers and
checkpoints are left alone.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lit_sft.metrics import EVAL_LOSS, EVAL_LOSS_TOKENS, EVAL_MEAN_TOKEN_ACCURACY


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state, strict=True)``, also when the parameters are ZeRO-3 partitions (gathered with
    ``deepspeed.zero.GatheredParameters`` and re-partitioned from rank 0's copy).

    Raises:
        RuntimeError: keys or shapes that do not fit the model (PyTorch's message names them).
    """
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            model.load_state_dict(state, strict=True)
        return
    model.load_state_dict(state, strict=True)


class CheckpointWeights(Callback):
    """Puts a checkpoint's model weights into ``SFTModule.model`` before the strategy wraps the model.

    Lightning's ``ckpt_path`` restores through the strategy (a DeepSpeed folder only under the same DeepSpeed setup);
    here any checkpoint lit_sft writes, file or ZeRO folder, loads under any strategy: in ``setup`` (which runs before
    ``configure_model``) the module builds its model itself, then the consolidated weights are copied in.

    Args:
        ckpt_path: a ``step-NNNNNN.ckpt`` file or a DeepSpeed checkpoint folder.
    """

    def __init__(self, ckpt_path: str) -> None:
        self.ckpt_path = ckpt_path
        self.global_step: Optional[int] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lit_sft.export import checkpoint_state_dict

        state, self.global_step = checkpoint_state_dict(self.ckpt_path)
        strategy = trainer.strategy  # the contexts Lightning builds the model in (ZeRO-3: deepspeed.zero.Init)
        with strategy.tensor_init_context(), strategy.model_sharded_context(), \
                trainer.precision_plugin.module_init_context():
            pl_module.configure_model()  # idempotent: Lightning's own call then finds the model built
        load_full_state_dict(pl_module.model, state)


def summary(results: dict[str, float], model: str, split: str) -> str:
    """One line with the results at full precision (``SFTModule.validation_results``)."""
    return (f"validate {model} on split {split!r}: eval/loss {results[EVAL_LOSS]:.10g}, eval/mean_token_accuracy "
            f"{results[EVAL_MEAN_TOKEN_ACCURACY]:.10g} over {int(results[EVAL_LOSS_TOKENS])} supervised tokens")


def validate(trainer: L.Trainer, model: L.LightningModule, datamodule: Any, ckpt_path: Optional[str] = None,
             verbose: bool = True) -> dict[str, float]:
    """``trainer.validate(model, datamodule)`` with the weights of ``ckpt_path`` if given; logs :func:`summary`.

    Returns:
        ``{"eval/loss", "eval/mean_token_accuracy", "eval/loss_tokens"}`` as Python floats.
    """
    from lightning.pytorch.utilities import rank_zero_info

    if ckpt_path:
        trainer.callbacks.append(CheckpointWeights(ckpt_path))
    trainer.validate(model, datamodule=datamodule, verbose=verbose)
    results = dict(getattr(model, "validation_results", {}) or {})
    if results:
        name = ckpt_path or model.hparams.get("model_name_or_path") or "the configured model"
        rank_zero_info(summary(results, name, datamodule.hparams.dataset_test_split))
    return results
