"""``SFTModule``: the transformers causal LM, the token-normalised SFT loss, AdamW and the recipe's schedule."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from lit_sft.loss import backward_scale, chunked_token_loss_sum
from lit_sft.metrics import StepMetrics, device_peak_flops, matmul_params, training_flops
from lit_sft.modeling import apply_liger_kernels, build_causal_lm
from lit_sft.optim import adamw, check_scheduler, lr_scheduler
from lit_sft.validation import check_ranges


# Padding-free batches (lit_sft/data/collate.py PaddingFreeCollator) pass these to the model's attention.
_PADDING_FREE_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# Checkpoints are taken after the optimizer step on purpose (resume continues from the next step).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class SFTModule(L.LightningModule):
    """Supervised fine-tuning of a transformers causal LM.

    Optimization is manual so that the module owns the step: every training batch is one micro-batch; it
    back-propagates ``loss_sum * world_size / step_loss_tokens`` (see ``lit_sft/loss.py``) and, after the step's
    last micro-batch (``batch["last_in_step"]``), clips, steps AdamW and the LR schedule, and logs the step's
    metrics (``lit_sft/metrics.py``). ``trainer.global_step`` therefore counts optimizer steps.

    Args:
        model_name_or_path: hub id or local folder of the base model (recipe: ``Qwen/Qwen2.5-1.5B-Instruct``);
            ``pkg://package/dir`` names a folder inside an installed package; ``None`` builds from ``model_config``.
        model_revision: hub revision (recipe: ``main``).
        torch_dtype: dtype the weights are loaded in (recipe: ``bfloat16``).
        attn_implementation: ``flash_attention_2`` (recipe; without flash-attn it falls back, with a warning, to
            ``sdpa`` for padded batches or to ``lit_sft_varlen``, PyTorch's varlen attention, for padding-free ones),
            ``lit_sft_varlen``, ``sdpa`` or ``eager`` (the last two only with padded batches).
        random_init: build the architecture with random weights instead of loading them (benchmarks, smoke tests).
        model_config: overrides of the model config (e.g. a tiny ``num_hidden_layers``), or, without
            ``model_name_or_path``, the whole config including ``model_type``.
        use_liger_kernel: Liger's Triton kernels, including the fused linear cross-entropy that never materialises
            the ``[tokens, vocab]`` logits (recipe: true; GPU only, a warning on CPU).
        gradient_checkpointing: recompute activations in the backward pass (recipe: true).
        gradient_checkpointing_kwargs: passed to ``gradient_checkpointing_enable`` (recipe: ``use_reentrant: false``).
        learning_rate: peak learning rate of AdamW (recipe: 5e-5).
        lr_scheduler_type: a transformers scheduler name (recipe: ``cosine_with_min_lr``).
        lr_scheduler_kwargs: its extra arguments (recipe: ``{min_lr_rate: 0.1}``); ``None``: the recipe's
            ``{min_lr_rate: 0.1}`` for ``cosine_with_min_lr``, none for other schedules.
        warmup_ratio: share of the optimizer steps spent in linear warmup, rounded up (recipe: 0.05).
        weight_decay: AdamW weight decay on matrices (transformers' default: 0).
        adam_beta1, adam_beta2, adam_epsilon: AdamW constants (transformers' defaults).
        max_grad_norm: clip the global gradient norm to this (transformers' default: 1.0; 0 or ``None``: no clip).
        loss_chunk_size: positions per chunk of the chunked cross-entropy (the path without Liger).
        mfu_peak_tflops: one device's peak TFLOP/s for the MFU metric; default: the device's dense bf16 datasheet
            rate (``lit_sft.metrics.PEAK_BF16_TFLOPS``), none on CPU.
    """

    def __init__(
        self,
        model_name_or_path: Optional[str] = None,
        model_revision: Optional[str] = "main",
        torch_dtype: str = "bfloat16",
        attn_implementation: Optional[str] = "flash_attention_2",
        random_init: bool = False,
        model_config: Optional[dict[str, Any]] = None,
        use_liger_kernel: bool = False,
        gradient_checkpointing: bool = True,
        gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None,
        learning_rate: float = 5e-5,
        lr_scheduler_type: str = "cosine_with_min_lr",
        lr_scheduler_kwargs: Optional[dict[str, Any]] = None,
        warmup_ratio: float = 0.05,
        weight_decay: float = 0.0,
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        adam_epsilon: float = 1e-8,
        max_grad_norm: Optional[float] = 1.0,
        loss_chunk_size: int = 4096,
        mfu_peak_tflops: Optional[float] = None,
    ) -> None:
        super().__init__()
        check_ranges("model", locals())
        if model_name_or_path is None and not (model_config or {}).get("model_type"):
            raise ValueError("set model.model_name_or_path, or model.model_config with a 'model_type' key")
        if lr_scheduler_kwargs is None:
            lr_scheduler_kwargs = {"min_lr_rate": 0.1} if lr_scheduler_type == "cosine_with_min_lr" else {}
        check_scheduler(lr_scheduler_type, lr_scheduler_kwargs)
        self.lr_scheduler_kwargs = lr_scheduler_kwargs
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.max_grad_norm = max_grad_norm
        self.model: Optional[torch.nn.Module] = None
        self.fused_loss = False
        self.step_metrics = StepMetrics()
        self._hf_ds_config: Any = None
        self._val_sums: Optional[torch.Tensor] = None
        self._steps_per_epoch: Optional[int] = None

    # -- model ---------------------------------------------------------------------------------------------------
    @property
    def zero3(self) -> bool:
        """Whether the model is partitioned with DeepSpeed ZeRO stage 3."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        return isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3

    def configure_model(self) -> None:
        """Build the model; under ZeRO-3 it is born partitioned and pretrained weights load into the shards."""
        if self.model is not None:
            return
        hp = self.hparams
        strategy = self._trainer.strategy if self._trainer is not None else None
        zero3_init = self.zero3 and getattr(strategy, "zero3_init", True)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        self.model, self._hf_ds_config = build_causal_lm(
            hp.model_name_or_path, hp.model_revision, hp.torch_dtype, hp.attn_implementation, hp.random_init,
            hp.model_config, zero3_config=strategy.config if zero3_init else None,
            padding_free=bool(getattr(datamodule, "padding_free", False)),
        )
        self.model.config.use_cache = False
        self.model.train()  # from_pretrained returns eval mode, and Lightning keeps submodules' modes as they are
        if hp.gradient_checkpointing:
            kwargs = hp.gradient_checkpointing_kwargs or {"use_reentrant": False}
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.fused_loss = apply_liger_kernels(self.model, hp.use_liger_kernel)
        config = self.model.config
        self._flops_args = (matmul_params(self.model), config.num_hidden_layers, config.hidden_size)

    def on_fit_start(self) -> None:
        peak = self.hparams.mfu_peak_tflops
        self.step_metrics.peak_flops = peak * 1e12 if peak else device_peak_flops(self.device)
        self.step_metrics.world_size = self.trainer.world_size
        datamodule = getattr(self.trainer, "datamodule", None)
        self._steps_per_epoch = getattr(datamodule, "optimizer_steps_per_epoch", None)

    @staticmethod
    def sequence_lengths(batch: dict[str, Any]) -> torch.Tensor:
        """``[B]`` lengths of the sequences in a micro-batch: from ``cu_seq_lens_q`` (padding-free) or the rows of
        ``attention_mask`` (padded)."""
        if "cu_seq_lens_q" in batch:
            return batch["cu_seq_lens_q"].diff()
        if "attention_mask" in batch:
            return batch["attention_mask"].sum(-1)
        return torch.full((batch["input_ids"].shape[0],), batch["input_ids"].shape[1])

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        """The causal LM's forward: ``input_ids`` ``[B, T]`` -> output with ``logits`` ``[B, T, V]``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)

    def loss_sums(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Summed token loss of a micro-batch: ``(loss_sum, num_loss_tokens, num_correct or None)``.

        With Liger's fused linear cross-entropy the model computes the loss itself without logits; passing
        ``num_items_in_batch=1`` makes transformers/Liger return the sum (they divide the summed loss by it), and
        ``return_token_accuracy=True`` makes Liger count argmax hits in the same pass.
        Otherwise the base model's hidden states go through :func:`lit_sft.loss.chunked_token_loss_sum`, which
        never holds more than ``loss_chunk_size`` positions of logits.
        """
        labels = batch["labels"]
        packed = {k: batch[k] for k in _PADDING_FREE_KEYS if k in batch}
        if self.fused_loss:
            out = self(batch["input_ids"], batch.get("attention_mask"), labels=labels, num_items_in_batch=1,
                       return_token_accuracy=True, skip_logits=True, **packed)  # fused in evaluation too
            num_loss_tokens = (labels[:, 1:] != -100).sum()
            accuracy = getattr(out, "token_accuracy", None)  # Liger: correct / supervised, without logits
            num_correct = None if accuracy is None else (accuracy.detach().float() * num_loss_tokens).round().long()
            return out.loss.float(), num_loss_tokens, num_correct
        hidden = self.model.base_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                       use_cache=False, **packed).last_hidden_state
        chunk, num_chunks = self.hparams.loss_chunk_size, None
        if self.zero3 and self.trainer.world_size > 1:  # ZeRO-3 gathers lm_head at each call: same count on all ranks
            mine = torch.tensor(max(1, -(-int((labels[:, 1:] != -100).sum()) // chunk)), device=hidden.device)
            num_chunks = int(self.trainer.strategy.reduce(mine, reduce_op="max"))
        return chunked_token_loss_sum(hidden, self.model.get_output_embeddings(), labels, chunk, num_chunks)

    # -- training ------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.step_metrics.start_clock()
        loss_sum, num_loss_tokens, num_correct = self.loss_sums(batch)
        self.manual_backward(loss_sum * backward_scale(batch["step_loss_tokens"], self.trainer.world_size))
        seq_lens = self.sequence_lengths(batch)
        flops = training_flops(seq_lens, *self._flops_args)
        self.step_metrics.add(loss_sum, num_loss_tokens, num_correct, seq_lens.sum(), batch["input_ids"].numel(), flops)
        if batch["last_in_step"]:
            self._optimizer_step()

    def _optimizer_step(self) -> None:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = None
        if not isinstance(self.trainer.strategy, DeepSpeedStrategy):  # DeepSpeed clips inside its step
            params = [p for p in self.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        if grad_norm is None:
            grad_norm = self.trainer.strategy.deepspeed_engine.get_global_grad_norm()
        metrics = self.step_metrics.reduce(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
        metrics["train/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["train/learning_rate"] = lr
        metrics["train/epoch"] = self.global_step / self._steps_per_epoch if self._steps_per_epoch else float("nan")
        self.log_step(metrics)

    def log_step(self, metrics: dict[str, float]) -> None:
        """Show the step's metrics in the progress bar and write them to every logger every
        ``trainer.log_every_n_steps`` optimizer steps, at ``step = global_step``."""
        self.last_step_metrics = metrics
        for key in ("train/loss", "train/tokens_per_s", "train/mfu"):
            if metrics[key] != metrics[key]:  # nan: e.g. no known peak FLOP/s on this device
                continue
            self.log(key.split("/")[1], metrics[key], prog_bar=True, logger=False, on_step=True, on_epoch=False)
        every = self.trainer.log_every_n_steps
        if every and self.global_step % every == 0:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)

    # -- evaluation ----------------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss_sum, num_loss_tokens, _ = self.loss_sums(batch)
        sums = torch.stack([loss_sum.detach().double(), num_loss_tokens.double()])
        self._val_sums = sums if self._val_sums is None else self._val_sums + sums

    def on_validation_epoch_end(self) -> None:
        if self._val_sums is None:
            return
        loss_sum, tokens = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum").tolist()
        self._val_sums = None
        self.log("val/loss", loss_sum / max(tokens, 1.0), prog_bar=True, sync_dist=False, rank_zero_only=True)

    # -- optimizer -----------------------------------------------------------------------------------------------
    def num_training_steps(self) -> int:
        """Optimizer steps of the run: ``trainer.max_steps`` if set, else steps per epoch x ``max_epochs``.

        Raises:
            RuntimeError: the trainer has no ``SFTDataModule``-like datamodule and no ``max_steps``.
        """
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "optimizer_steps_per_epoch"):
            raise RuntimeError("SFTModule needs trainer.max_steps or an SFTDataModule to size the LR schedule")
        return datamodule.optimizer_steps_per_epoch * max(trainer.max_epochs or 1, 1)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = adamw(self.model, hp.learning_rate, hp.weight_decay, (hp.adam_beta1, hp.adam_beta2),
                          hp.adam_epsilon)
        scheduler = lr_scheduler(optimizer, hp.lr_scheduler_type, self.num_training_steps(), hp.warmup_ratio,
                                 self.lr_scheduler_kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoint ----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lit_sft_metrics"] = self.step_metrics.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.step_metrics.load_state_dict(checkpoint.get("lit_sft_metrics", {}))
