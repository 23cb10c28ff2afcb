"""``SFTModule``: the transformers causal LM, the token-normalised SFT loss, AdamW and the recipe's schedule."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, Optional, Union

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_sft.guard import NonFiniteError, nonfinite_step_message
from lit_sft.data.batch import PADDING_FREE_KEYS, SFTBatch, check_training_batch
from lit_sft.lora import (add_adapters, adapter_checkpoint_record, base_causal_lm, check_adapter_checkpoint,
                          check_load_in_4bit, dropout_bytes_per_token, lora_config, lora_matmul_params,
                          quantization_config)
from lit_sft.loss import LossSums, backward_scale, chunked_token_loss_sum, token_sources
from lit_sft.metrics import (EPOCH, EVAL_LOSS, EVAL_LOSS_TOKENS, EVAL_MEAN_TOKEN_ACCURACY, GRAD_NORM, LEARNING_RATE,
                             LOSS, MFU, TOKENS_PER_S, StepMetrics, device_peak_flops, matmul_params, training_flops)
from lit_sft.modeling import (activation_bytes_per_token, apply_liger_kernels, auto_checkpointed_layers,
                              build_causal_lm, check_random_init, count_parameters, decoder_layers,
                              set_checkpointed_layers)
from lit_sft.optim import adamw, check_scheduler, lr_scheduler
from lit_sft.validation import InputError, check_ranges

# Checkpoints are taken after the optimizer step on purpose (resume continues from the next step).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class SFTModule(L.LightningModule):
    """Supervised fine-tuning of a transformers causal LM.

    Optimization is manual so that the module owns the step: every training batch is one micro-batch, an
    :class:`lit_sft.data.batch.SFTBatch`; it back-propagates ``loss_sum * world_size / num_items_in_batch`` (see
    ``lit_sft/loss.py``) and, after the step's last micro-batch (``batch["last_in_step"]``), clips, steps AdamW and
    the LR schedule, and logs the step's metrics (``lit_sft/metrics.py``). ``trainer.global_step`` therefore
    counts optimizer steps.

    Args:
        model_name_or_path: hub id or local folder of the base model (recipe: ``Qwen/Qwen2.5-1.5B-Instruct``);
            ``pkg://package/dir`` names a folder inside an installed package; ``None`` builds from ``model_config``.
        model_revision: hub revision (recipe: ``main``).
        torch_dtype: dtype the weights are loaded in (recipe: ``bfloat16``).
        attn_implementation: ``flash_attention_2`` (recipe; without flash-attn it falls back, with a warning, to
            ``sdpa`` for padded batches or to ``lit_sft_varlen``, PyTorch's varlen attention, for padding-free ones),
            ``lit_sft_varlen``, ``sdpa`` or ``eager`` (the last two keep padding-free rows apart through
            transformers' packed-sequence mask; see ``lit_sft/attention.py``).
        random_init: build the architecture with random weights instead of loading them (benchmarks, smoke tests).
        model_config: overrides of the model config (e.g. a tiny ``num_hidden_layers``), or, without
            ``model_name_or_path``, the whole config including ``model_type``.
        peft: train LoRA adapters on the frozen base instead of every weight: peft's ``LoraConfig`` fields
            (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``modules_to_save``, ``use_rslora``,
            ``use_dora``, ...) plus ``method: lora``; ``None`` (default): full fine-tuning. Same data, loss and
            optimizer step; checkpoints hold the adapter and its optimizer state only (the base is rebuilt from
            ``model_name_or_path``). See ``lit_sft/lora.py`` and ``configs/qwen_lora.yaml``.
        load_in_4bit: QLoRA: load the base in 4 bits with bitsandbytes (NF4, double quantisation, bf16 compute);
            needs ``peft``, a CUDA GPU and bitsandbytes; not with partitioned ZeRO-3 parameters.
        use_liger_kernel: Liger's Triton kernels, including the fused linear cross-entropy that never materialises
            the ``[tokens, vocab]`` logits (recipe: true; GPU only, a warning on CPU).
        gradient_checkpointing: recompute activations in the backward pass (recipe: true).
        gradient_checkpointing_layers: with ``gradient_checkpointing``, how many decoder layers recompute: ``all``
            (default: the recipe's, every layer), a number, or ``auto``: as few as fit the GPU's memory for the
            largest micro-batch (``data.max_tokens_per_micro_batch``, else rows x ``max_length``), sized at the start
            of training from the free memory, the Adam moments still to be allocated, a 10% reserve and the
            activation bytes per token of :func:`lit_sft.modeling.activation_bytes_per_token`; the choice is
            logged. The loss and gradients are the same either way; only speed and memory differ.
        gradient_checkpointing_kwargs: passed to ``gradient_checkpointing_enable`` (recipe: ``use_reentrant: false``).
        learning_rate: peak learning rate of AdamW (recipe: 5e-5).
        lr_scheduler_type: a transformers scheduler name (recipe: ``cosine_with_min_lr``).
        lr_scheduler_kwargs: its extra arguments (recipe: ``{min_lr_rate: 0.1}``); ``None``: the recipe's
            ``{min_lr_rate: 0.1}`` for ``cosine_with_min_lr``, none for other schedules.
        warmup_ratio: share of the optimizer steps spent in linear warmup, rounded up (recipe: 0.05).
        weight_decay: AdamW weight decay on matrices (transformers' default: 0).
        adam_beta1: AdamW's beta1 (transformers' default: 0.9).
        adam_beta2: AdamW's beta2 (transformers' default: 0.999).
        adam_epsilon: AdamW's epsilon (transformers' default: 1e-8).
        max_grad_norm: clip the global gradient norm to this (transformers' default: 1.0; 0 or ``None``: no clip).
        loss_chunk_size: positions per chunk of the chunked cross-entropy (the path without Liger).
        mfu_peak_tflops: one device's peak TFLOP/s for the MFU metric; default: the device's dense bf16 datasheet
            rate (``lit_sft.metrics.PEAK_BF16_TFLOPS``), none on CPU.
        max_nonfinite_steps: optimizer steps with a non-finite (NaN/inf) loss or gradient norm that are skipped (no
            weight update; the LR schedule advances) before training stops with ``lit_sft.guard.NonFiniteError``
            naming the step. Default 0: the first one stops the run (the last checkpoint stays the last finite
            state). Steps that fp16 loss scaling skips by itself are not counted. Under DeepSpeed, a step the engine
            applied despite a non-finite gradient norm always stops the run.
    """

    def __init__(
        self,
        model_name_or_path: Optional[str] = None,
        model_revision: Optional[str] = "main",
        torch_dtype: str = "bfloat16",
        attn_implementation: Optional[str] = "flash_attention_2",
        random_init: bool = False,
        model_config: Optional[dict[str, Any]] = None,
        peft: Optional[dict[str, Any]] = None,
        load_in_4bit: bool = False,
        use_liger_kernel: bool = False,
        gradient_checkpointing: bool = True,
        gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None,
        gradient_checkpointing_layers: Union[int, Literal["all", "auto"]] = "all",
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
        max_nonfinite_steps: int = 0,
    ) -> None:
        super().__init__()
        check_ranges("model", locals())
        if model_name_or_path is None and not (model_config or {}).get("model_type"):
            raise ValueError("set model.model_name_or_path, or model.model_config with a 'model_type' key")
        if lr_scheduler_kwargs is None:
            lr_scheduler_kwargs = {"min_lr_rate": 0.1} if lr_scheduler_type == "cosine_with_min_lr" else {}
        check_scheduler(lr_scheduler_type, lr_scheduler_kwargs)
        check_load_in_4bit(load_in_4bit, peft)
        self.adapter_config = None
        if peft:
            if random_init or model_name_or_path is None:
                raise ValueError("model.peft trains adapters on a pretrained base that checkpoints do not hold (resume "
                                 "and export rebuild it from model.model_name_or_path): set model_name_or_path to a "
                                 "folder or hub id and random_init: false (save a random model with save_pretrained "
                                 "to train adapters on one)")
            self.adapter_config = lora_config(peft, model_name_or_path, model_revision)
            self.strict_loading = False  # a checkpoint holds the adapter only (checked in on_load_checkpoint)
        check_random_init(model_name_or_path, random_init)
        self.lr_scheduler_kwargs = lr_scheduler_kwargs
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.max_grad_norm = max_grad_norm
        self.max_nonfinite_steps = max_nonfinite_steps
        self._nonfinite_steps = 0
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

    def setup(self, stage: str) -> None:
        """Refuse, before the model is built, a trainer under which the model keys would not hold exactly (see
        :func:`lit_sft.supported.check_trainer`)."""
        if stage == "fit":
            from lit_sft.supported import check_trainer

            check_trainer(self.trainer)

    def configure_model(self) -> None:
        """Build the model; under ZeRO-3 it is born partitioned and pretrained weights load into the shards."""
        if self.model is not None:
            return
        hp = self.hparams
        strategy = self._trainer.strategy if self._trainer is not None else None
        zero3_init = self.zero3 and getattr(strategy, "zero3_init", True)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        quantization = None
        if hp.load_in_4bit:
            if self.zero3 or (strategy is not None and strategy.root_device.type != "cuda"):
                raise ValueError("model.load_in_4bit (QLoRA) runs on CUDA GPUs with whole parameters: use one GPU, "
                                 "ddp, or DeepSpeed with zero_stage <= 2 (or zero3_partition_parameters: false)")
            quantization = quantization_config()
        self.model, self._hf_ds_config = build_causal_lm(
            hp.model_name_or_path, hp.model_revision, hp.torch_dtype, hp.attn_implementation, hp.random_init,
            hp.model_config, zero3_config=strategy.config if zero3_init else None,
            padding_free=bool(getattr(datamodule, "padding_free", False)), quantization_config=quantization,
        )
        self.model.config.use_cache = False
        self.model.train()  # from_pretrained returns eval mode, and Lightning keeps submodules' modes as they are
        if hp.gradient_checkpointing:
            kwargs = hp.gradient_checkpointing_kwargs or {"use_reentrant": False}
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if isinstance(hp.gradient_checkpointing_layers, int):
                set_checkpointed_layers(self.model, hp.gradient_checkpointing_layers)
        self.fused_loss = apply_liger_kernels(self.model, hp.use_liger_kernel)
        matmuls = matmul_params(self.model)
        if self.adapter_config is not None:  # model.peft: the base freezes, peft's adapters train
            deepspeed = isinstance(strategy, DeepSpeedStrategy)
            self.model = add_adapters(self.model, self.adapter_config, deepspeed, hp.load_in_4bit,
                                      hp.gradient_checkpointing, self.fused_loss)
            if deepspeed:  # DeepSpeed writes module states itself: leave the frozen base out of its checkpoints
                strategy.exclude_frozen_parameters = True
            matmuls = lora_matmul_params(self.model)
        config = self.model.config
        self._flops_args = (matmuls, config.num_hidden_layers, config.hidden_size)

    def num_parameters(self) -> int:
        """Parameters of the configured model, counted without building it (the strategy sizes ZeRO with it)."""
        hp = self.hparams
        return count_parameters(hp.model_name_or_path, hp.model_revision, hp.model_config)

    def on_fit_start(self) -> None:
        peak = self.hparams.mfu_peak_tflops
        self.step_metrics.peak_flops = peak * 1e12 if peak else device_peak_flops(self.device)
        self.step_metrics.world_size, self.step_metrics.rank = self.trainer.world_size, self.trainer.global_rank
        datamodule = getattr(self.trainer, "datamodule", None)
        self._steps_per_epoch = getattr(datamodule, "optimizer_steps_per_epoch", None)
        self._log_batch_path(datamodule)
        if self.hparams.gradient_checkpointing and self.hparams.gradient_checkpointing_layers == "auto":
            self._auto_checkpointed_layers(datamodule)

    def _micro_batch_tokens(self, datamodule: Any) -> Optional[int]:
        """The largest micro-batch in tokens: the token budget, else rows x ``max_length`` (``None``: unknown)."""
        dh = getattr(datamodule, "hparams", {}) or {}
        if getattr(datamodule, "padding_free", False) and dh.get("max_tokens_per_micro_batch"):
            return int(dh["max_tokens_per_micro_batch"])
        if dh.get("max_length") and dh.get("per_device_train_batch_size"):
            return int(dh["max_length"]) * int(dh["per_device_train_batch_size"])
        return None

    def _log_batch_path(self, datamodule: Any) -> None:
        """One line saying which batch layout trains (issue 11: the fast path is the default)."""
        dh = getattr(datamodule, "hparams", None)
        if dh is None:
            return
        rows = dh.get("per_device_train_batch_size", 0) * dh.get("gradient_accumulation_steps", 1) * self.trainer.world_size
        attn = getattr(self.model.config, "_attn_implementation", None)
        if getattr(datamodule, "padding_free", False):
            budget = dh.get("max_tokens_per_micro_batch")
            fill = f"micro-batches filled up to {budget} tokens" if budget else "micro-batches of rows"
            rank_zero_info(f"Batches: padding-free ({fill}, attention {attn} within each row), {rows} rows per "
                           "optimizer step; data.padding_free: false returns to padded batches")
        else:
            rank_zero_info(f"Batches: padded to the longest row of each micro-batch of "
                           f"{dh.get('per_device_train_batch_size')} rows, {rows} rows per optimizer step "
                           "(data.padding_free: true trains the same rows per step, same loss, without padding)")

    def _auto_checkpointed_layers(self, datamodule: Any) -> None:
        """``gradient_checkpointing_layers: auto``: recompute as few decoder layers as the GPU's memory allows."""
        layers = decoder_layers(self.model)
        tokens = self._micro_batch_tokens(datamodule)
        if self.device.type != "cuda" or not tokens:
            rank_zero_info("gradient_checkpointing_layers: auto: every decoder layer recomputes (no GPU memory or "
                           "micro-batch size to size against)")
            return
        stored, kept = activation_bytes_per_token(self.model.config, self.fused_loss)
        if self.adapter_config is not None:
            stored += dropout_bytes_per_token(self.model, len(layers))
        free, total = torch.cuda.mem_get_info(self.device)
        numel = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters() if p.requires_grad)
        shards = self.trainer.world_size if isinstance(self.trainer.strategy, DeepSpeedStrategy) else 1
        later = 8 * -(-numel // shards) + 4 * -(-numel // shards) + 2 * numel  # Adam moments, fp32 + 16-bit grads
        budget = free - later - total // 10 - 2 * tokens * stored  # 10% reserve; backward transients
        count = auto_checkpointed_layers(len(layers), tokens, stored, kept, budget)
        count = int(self.trainer.strategy.reduce(torch.tensor(count, device=self.device), reduce_op="max"))
        set_checkpointed_layers(self.model, count)
        rank_zero_info(f"gradient_checkpointing_layers: auto: {count} of {len(layers)} decoder layers recompute "
                       f"(micro-batches up to {tokens} tokens, {stored / 1024:.1f} KiB per token per stored layer, "
                       f"{budget / 2**30:.1f} GiB for activations)")

    @staticmethod
    def sequence_lengths(batch: SFTBatch) -> torch.Tensor:
        """``[R]`` lengths of the rows in a micro-batch: from ``cu_seq_lens_q`` (padding-free) or the rows of
        ``attention_mask`` (padded)."""
        if "cu_seq_lens_q" in batch:
            return batch["cu_seq_lens_q"].diff()
        if "attention_mask" in batch:
            return batch["attention_mask"].sum(-1)
        return torch.full((batch["input_ids"].shape[0],), batch["input_ids"].shape[1])

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        """The causal LM's forward: ``input_ids`` ``[B, T]`` -> output with ``logits`` ``[B, T, V]``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)

    def loss_sums(self, batch: SFTBatch) -> LossSums:
        """Summed token loss of a micro-batch and its counts (:class:`lit_sft.loss.LossSums`).

        With Liger's fused linear cross-entropy the model computes the loss itself without logits; passing
        ``num_items_in_batch=1`` makes transformers/Liger return the sum (they divide the summed loss by it; the
        step's real ``num_items_in_batch`` is applied by the caller), and ``return_token_accuracy=True`` makes Liger
        count argmax hits in the same pass. Liger returns no per-token losses, so there is no per-source loss then.
        Otherwise the base model's hidden states go through :func:`lit_sft.loss.chunked_token_loss_sum`, which
        never holds more than ``loss_chunk_size`` positions of logits, and with mixture sources
        (``batch["source_ids"]``) also sums the loss per source.
        """
        labels = batch["labels"]
        packed = {k: batch[k] for k in PADDING_FREE_KEYS if k in batch}
        if self.fused_loss:
            if "source_ids" in batch:
                rank_zero_warn("train/loss/<source> is not logged: Liger's fused cross-entropy "
                               "(model.use_liger_kernel: true) returns only the total loss; set "
                               "model.use_liger_kernel: false for per-source losses")
            out = self(batch["input_ids"], batch.get("attention_mask"), labels=labels, num_items_in_batch=1,
                       return_token_accuracy=True, skip_logits=True, **packed)  # fused in evaluation too
            num_loss_tokens = (labels[:, 1:] != -100).sum()
            accuracy = getattr(out, "token_accuracy", None)  # Liger: correct / supervised, without logits
            num_correct = None if accuracy is None else (accuracy.detach().float() * num_loss_tokens).round().long()
            return LossSums(out.loss.float(), num_loss_tokens, num_correct)
        decoder = base_causal_lm(self.model).base_model  # the decoder stack, under the adapters if any
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False,
                         **packed).last_hidden_state
        chunk, num_chunks = self.hparams.loss_chunk_size, None
        if self.zero3 and self.trainer.world_size > 1:  # ZeRO-3 gathers lm_head at each call: same count on all ranks
            mine = ((labels[:, 1:] != -100).sum() + chunk - 1).div(chunk, rounding_mode="floor").clamp(min=1)
            num_chunks = int(self.trainer.strategy.reduce(mine, reduce_op="max"))  # one host sync, not two
        sources, num_sources = None, 0
        if "source_ids" in batch:  # mixture: each position's source, for train/loss/<source>
            seq_lens = self.sequence_lengths(batch) if "cu_seq_lens_q" in batch else None
            sources = token_sources(batch["source_ids"], labels.shape, seq_lens)
            num_sources = len(batch["source_names"])
        lm_head = self.model.get_output_embeddings()
        reentrant = self.zero3 and not lm_head.weight.requires_grad  # LoRA under ZeRO-3: see chunked_token_loss_sum
        if reentrant and torch.is_grad_enabled() and not hidden.requires_grad:  # an adapter on lm_head alone
            hidden = hidden.detach().requires_grad_()  # reentrant recomputation needs an input that requires grad
        return chunked_token_loss_sum(hidden, lm_head, labels, chunk, num_chunks, sources, num_sources, reentrant)

    # -- training ------------------------------------------------------------------------------------------------
    def training_step(self, batch: SFTBatch, batch_idx: int) -> None:
        """One micro-batch: back-propagate its share of the step's token-mean loss; after the step's last
        micro-batch, the optimizer step.

        Raises:
            KeyError: the batch lacks a key of :class:`lit_sft.data.batch.SFTBatch` (a data module of your own).
        """
        check_training_batch(batch)
        self.step_metrics.start_clock()
        sums = self.loss_sums(batch)
        self.manual_backward(sums.loss_sum * backward_scale(batch["num_items_in_batch"], self.trainer.world_size))
        seq_lens = self.sequence_lengths(batch)
        flops = training_flops(seq_lens, *self._flops_args)
        self.step_metrics.add(sums, seq_lens.sum(), batch["input_ids"].numel(), flops, batch.get("source_names"))
        if batch["last_in_step"]:
            self._optimizer_step()

    def _optimizer_step(self) -> None:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        lr = optimizer.param_groups[0]["lr"]
        strategy = self.trainer.strategy
        engine = getattr(strategy, "deepspeed_engine", None) if isinstance(strategy, DeepSpeedStrategy) else None
        # fp16 loss scaling skips overflowing steps by itself (GradScaler, DeepSpeed's loss scaler): not ours to count
        loss_scaled = (getattr(self.trainer.precision_plugin, "scaler", None) is not None
                       or (engine is not None and engine.fp16_enabled()))
        grad_norm, updated = None, True
        if engine is None:  # DeepSpeed clips inside its step
            params = [p for p in self.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf"))
            if not loss_scaled and not bool(torch.isfinite(grad_norm)):
                for p in params:  # AdamW leaves parameters without a gradient untouched: the step is skipped
                    p.grad = None
                updated = False
        skipped_before = engine.skipped_steps if engine is not None else 0
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        if engine is not None:
            grad_norm = engine.get_global_grad_norm()  # inf when DeepSpeed skipped the step (invalid norm)
            updated = engine.skipped_steps == skipped_before
        metrics = self.step_metrics.reduce(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
        metrics[GRAD_NORM] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics[LEARNING_RATE] = lr
        metrics[EPOCH] = self.global_step / self._steps_per_epoch if self._steps_per_epoch else float("nan")
        norm = None if grad_norm is None or loss_scaled else float(grad_norm)
        finite = math.isfinite(metrics["train/loss"]) and (norm is None or math.isfinite(norm))
        previous = getattr(self, "last_step_metrics", None)
        self.log_step(metrics)
        if finite:
            return
        self._nonfinite_steps += 1
        message = nonfinite_step_message(self.global_step, metrics["train/loss"], norm, self._nonfinite_steps,
                                         self.max_nonfinite_steps, updated)
        if updated or self._nonfinite_steps > self.max_nonfinite_steps:
            raise NonFiniteError(message)
        rank_zero_warn(message)
        if previous is not None:
            self.last_step_metrics = previous  # the model card reports the last finite step

    def log_step(self, metrics: dict[str, float]) -> None:
        """Show the step's metrics in the progress bar and write them to every logger every
        ``trainer.log_every_n_steps`` optimizer steps, at ``step = global_step``."""
        self.last_step_metrics = metrics
        shown = (LOSS, TOKENS_PER_S) + ((MFU,) if self.step_metrics.peak_flops else ())
        for key in shown:  # as logged: a non-finite loss shows as nan (MFU only where the device's peak is known)
            self.log(key.split("/")[1], metrics[key], prog_bar=True, logger=False, on_step=True, on_epoch=False)
        every = self.trainer.log_every_n_steps
        if every and self.global_step % every == 0:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)

    # -- evaluation ----------------------------------------------------------------------------------------------
    def configure_callbacks(self) -> list[L.Callback]:
        """The loop's defaults when the trainer has none of its own: :class:`lit_sft.evaluation.SFTEvaluation`
        (validation only between optimizer steps, scheduled in optimizer steps), :class:`lit_sft.loss_curve.LossCurve`
        (the loss history kept in checkpoints, ``loss.png``) and, in place of Lightning's stock
        progress bar (which counts micro-batches), :class:`lit_sft.progress.SFTProgressBar` (optimizer steps)."""
        from lit_sft.console import quiet_known_noise
        from lit_sft.evaluation import SFTEvaluation
        from lit_sft.loss_curve import LossCurve
        from lit_sft.progress import replace_stock_progress_bar

        quiet_known_noise()  # again: a warnings.catch_warnings() block around lit_sft's import may have reset it
        trainer = self.trainer
        callbacks: list[L.Callback] = []
        if not any(isinstance(c, SFTEvaluation) for c in trainer.callbacks):
            callbacks.append(SFTEvaluation())
        if not any(isinstance(c, LossCurve) for c in trainer.callbacks):
            callbacks.append(LossCurve())
        callbacks += replace_stock_progress_bar(trainer)
        return callbacks

    def on_validation_model_zero_grad(self) -> None:
        """Lightning zeroes gradients before validation; here validation may only start between optimizer steps
        (:class:`lit_sft.evaluation.SFTEvaluation`), where there is nothing to zero.

        Raises:
            RuntimeError: a gradient is pending (validation inside an accumulation window would wipe it).
        """
        if any(p.grad is not None for p in self.parameters()):
            raise RuntimeError(
                f"validation started inside an accumulation window (optimizer step {self.global_step + 1} has pending "
                "gradients, which it would wipe); schedule evaluation with lit_sft.evaluation.SFTEvaluation "
                "(run.eval_strategy / run.eval_steps), not with trainer.val_check_interval")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss_sum, num_loss_tokens, num_correct, *_ = self.loss_sums(batch)
        if num_correct is None:  # a loss path without logits: no accuracy (every rank takes the same path)
            self._val_accuracy = False
        correct = num_correct.double() if num_correct is not None else torch.zeros((), dtype=torch.float64,
                                                                                   device=loss_sum.device)
        sums = torch.stack([loss_sum.detach().double(), num_loss_tokens.double(), correct.to(loss_sum.device)])
        self._val_sums = sums if self._val_sums is None else self._val_sums + sums

    def on_validation_epoch_end(self) -> None:
        """``eval/loss``: summed token loss over summed supervised tokens of the whole evaluation set, all ranks
        together (one all-reduce; every rank gets the same value); ``eval/mean_token_accuracy``: the share of those tokens
        the argmax predicts (``nan`` without logits, e.g. Liger's fused loss). ``eval/loss`` is shown in the progress
        bar and given to callbacks (``monitor=EVAL_LOSS``). During ``fit`` they are written to the loggers at
        ``step = global_step`` (optimizer steps), like the training metrics; in ``trainer.validate`` (``lit_sft
        validate``) they are Lightning's logged results (the printed table, the return value). Also kept, as Python
        floats, in ``validation_results``."""
        sums = self._val_sums if self._val_sums is not None else torch.zeros(3, dtype=torch.float64, device=self.device)
        self._val_sums = None
        has_accuracy, self._val_accuracy = getattr(self, "_val_accuracy", True), True
        loss_sum, tokens, correct = self.trainer.strategy.reduce(sums, reduce_op="sum").tolist()
        if tokens == 0:
            return
        value = loss_sum / tokens
        results = {EVAL_LOSS: value, EVAL_MEAN_TOKEN_ACCURACY: correct / tokens if has_accuracy else float("nan"),
                   EVAL_LOSS_TOKENS: tokens}
        self.validation_results = results
        fitting = self.trainer.state.fn == "fit"
        if fitting:
            self.log(EVAL_LOSS, value, prog_bar=True, logger=False, sync_dist=False)
        else:  # Lightning's results table and return value (already reduced; lit_sft validate has no logger)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"You called `self.log\('eval/.*no logger configured")
                warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('eval/.*sync_dist")
                for key in (EVAL_LOSS, EVAL_MEAN_TOKEN_ACCURACY, EVAL_LOSS_TOKENS):
                    self.log(key, results[key], prog_bar=key == EVAL_LOSS, logger=True, sync_dist=False)
        if fitting and not self.trainer.sanity_checking:
            for logger in self.loggers:
                logger.log_metrics(results, step=self.global_step)

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
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``nn.Module.state_dict``; with ``model.peft``, of the model only the trained parameters: the frozen base
        (tied copies such as ``lm_head.weight`` included) is rebuilt from ``model_name_or_path``. This is what
        Lightning's checkpoints and DeepSpeed's module states hold (DeepSpeed's ``exclude_frozen_parameters`` alone
        keeps a tied frozen weight, since ``named_parameters`` lists it once)."""
        state = super().state_dict(*args, **kwargs)
        if self.adapter_config is None or self.model is None:
            return state
        prefix = kwargs.get("prefix", "") + "model."
        trained = {prefix + name for name, p in self.model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k.startswith(prefix) and k not in trained]:
            del state[key]
        return state

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds the step metrics' state and, with ``model.peft``, the record of the trained adapter
        (``checkpoint["lit_sft_adapter"]``, checked on load)."""
        checkpoint["lit_sft_metrics"] = {**self.step_metrics.state_dict(), "nonfinite_steps": self._nonfinite_steps}
        if self.adapter_config is not None:
            checkpoint["lit_sft_adapter"] = adapter_checkpoint_record(self.model, self.adapter_config)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; a checkpoint written for another architecture (``model.model_config``,
        ``model.model_name_or_path`` changed since) is refused with the settings to restore.

        Raises:
            InputError: naming the first mismatched tensors (a ``ValueError``; PyTorch raises a ``RuntimeError``).
        """
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as err:
            found = [line.strip() for line in str(err).splitlines()[1:] if line.strip()][:2]
            raise InputError(f"the checkpoint's weights do not fit the model as configured ({'; '.join(found)}): "
                             "it was written with other model settings (model.model_config, model_name_or_path); "
                             "set them back to resume it, or train in a new run.output_dir") from err

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores the step metrics' state. An adapter checkpoint must hold this run's adapter (the frozen base
        is this run's, rebuilt from ``model_name_or_path``).

        Raises:
            ValueError: an adapter checkpoint without ``model.peft``, or the reverse, or another adapter shape.
        """
        if self.adapter_config is not None:
            check_adapter_checkpoint(checkpoint, self.model, self.adapter_config)
        elif "lit_sft_adapter" in checkpoint:
            raise ValueError("this checkpoint holds a LoRA adapter, not full weights: resume it with the model.peft "
                             "it was trained with (its hyper_parameters hold it)")
        state = dict(checkpoint.get("lit_sft_metrics", {}))
        self._nonfinite_steps = int(state.pop("nonfinite_steps", 0))
        self.step_metrics.load_state_dict(state)
