"""DeepSpeed ZeRO for SFT, configured with the keys of the recipe's accelerate launcher config.

``accelerate``'s ZeRO-3 YAML (``zero_stage``, ``offload_optimizer_device``, ``offload_param_device``,
``zero3_init_flag``, ``zero3_save_16bit_model``) maps onto Lightning's ``DeepSpeedStrategy``; ``mixed_precision``,
``num_processes`` and ``num_machines`` are the Trainer's ``precision``, ``devices`` and ``num_nodes``.

Two settings are forced because the loss owns the normalisation (``lit_sft/loss.py``):
``managed_gradient_accumulation: false`` (our data module plans accumulation: every ``optimizer.step()`` is a
boundary, and ``backward`` neither reduces early nor divides by an accumulation count) and ``gradient_clipping`` from
``SFTModule.max_grad_norm`` (Lightning forbids ``trainer.gradient_clip_val`` under manual optimization).

Speed (issue 11, ``benchmarks/RESULTS.md`` section 3, measured on H200s with the Qwen2.5-1.5B recipe):

* **Parameters stay whole when they fit** (``zero3_partition_parameters: auto``). ZeRO-3 gathers and releases every
  module's parameters in each forward, recomputation and backward pass. For the 1.5B model that cost 0.9 s per
  micro-batch on 2 GPUs (ZeRO-3: 1.55 s forward+backward; with every parameter persistent, i.e. no gathers at all:
  1.47 s; ZeRO-2 on the same rows: 0.61 s) and saved 1.1 GiB per GPU (17.7 vs 18.8 GiB). With ``auto``, stage 3
  runs as DeepSpeed stage 2 (gradients and optimizer states partitioned exactly as in stage 3, parameters
  replicated) when there is nothing to partition (one GPU) or when the 16-bit weights take at most
  :data:`REPLICATE_MAX_SHARE` of one GPU's memory; larger models, and parameter offload, keep stage 3.
* **Fused AdamW** on GPU: the ``torch.optim.AdamW`` of ``configure_optimizers`` steps DeepSpeed's flat fp32
  partitions with PyTorch's fused kernel (one pass instead of a dozen foreach passes over 1.5B parameters).
* **Resume on another GPU count**: a DeepSpeed checkpoint written with another data-parallel world size is
  converted once with DeepSpeed's own ``ds_to_universal`` into ``<checkpoint>/checkpoint_universal`` and loaded with
  DeepSpeed's universal-checkpoint loader (:meth:`SFTDeepSpeedStrategy.load_checkpoint`); the resumed run keeps the
  checkpoint's parameter layout (:meth:`SFTDeepSpeedStrategy.check_resume`, called by the CLI before the model is
  built), since DeepSpeed 0.19 converts between world sizes but not between stage 2 and stage 3.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import re
import shutil
from contextlib import contextmanager
from typing import Any, Callable, Generator, Literal, Optional, Union

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info

log = logging.getLogger(__name__)

OffloadDevice = Literal["none", "cpu", "nvme"]

REPLICATE_MAX_SHARE = 0.10
"""``zero3_partition_parameters: auto`` keeps parameters whole when their 16-bit copy takes at most this share of
one GPU's memory (Qwen2.5-1.5B: 2.9 GiB = 2% of an H200; a 7B model: 10% of an H200, 18% of an 80 GB GPU)."""

UNIVERSAL_TAG = "checkpoint_universal"
_LIGHTNING_TAG = "checkpoint"  # Lightning's DeepSpeedStrategy.save_checkpoint writes <path>/checkpoint/
_OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def checkpoint_layout(path: str) -> Optional[tuple[int, bool]]:
    """``(data-parallel world size, parameters partitioned)`` of a DeepSpeed checkpoint folder written by Lightning
    (``<path>/checkpoint/``), read from its file names; ``None`` if ``path`` is not such a folder.

    ZeRO writes one ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per data-parallel rank; stage 3 also one
    ``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` per rank, stages 1-2 a single ``mp_rank_00_model_states.pt``.
    """
    folder = os.path.join(str(path), _LIGHTNING_TAG)
    if not os.path.isdir(folder):
        return None
    ranks = {int(m.group(1)) for name in os.listdir(folder) if (m := _OPTIM_FILE.search(name))}
    if not ranks:
        return None
    partitioned = bool(glob.glob(os.path.join(folder, "zero_pp_rank_*_model_states.pt")))
    return len(ranks), partitioned


def convert_command(path: str) -> str:
    """The shell command that converts a Lightning DeepSpeed checkpoint folder to DeepSpeed's universal format."""
    return (f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {os.path.join(path, _LIGHTNING_TAG)} "
            f"--output_folder {os.path.join(path, UNIVERSAL_TAG)} --inject_missing_state")


def convert_to_universal(path: str, workers: int = 1) -> str:
    """Convert ``<path>/checkpoint`` with DeepSpeed's ``ds_to_universal`` into ``<path>/checkpoint_universal`` (once:
    an existing complete conversion is kept). ``ds_to_universal`` also writes ``<path>/latest_universal``, the tag
    file DeepSpeed's universal loader reads. The conversion goes to a temporary folder first and is renamed when
    complete, so an interrupted conversion is never loaded.

    Returns:
        The universal folder.
    """
    from deepspeed.checkpoint import ds_to_universal

    out = os.path.join(str(path), UNIVERSAL_TAG)
    if os.path.isfile(os.path.join(out, "zero", "optimizer_state.pt")):
        return out
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=os.path.join(str(path), _LIGHTNING_TAG), output_folder=tmp,
                              num_extract_workers=workers, num_merge_workers=workers, keep_temp_folder=False,
                              strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
    # The universal loader looks for the model-states file name of the *current* layout; provide both.
    files = {os.path.basename(f) for f in glob.glob(os.path.join(tmp, "*model_states.pt"))}
    for have, need in (("zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"),
                       ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")):
        if have in files and need not in files:
            shutil.copy2(os.path.join(tmp, have), os.path.join(tmp, need))
    os.replace(tmp, out)
    with open(os.path.join(str(path), "latest_universal"), "w") as f:
        f.write(UNIVERSAL_TAG)
    return out


def keep_parameters_whole(setting: Union[bool, str], world_size: int, num_parameters: Optional[Callable[[], int]],
                          device_memory: Optional[int], offload_param: bool = False,
                          resume_partitioned: Optional[bool] = None) -> Optional[str]:
    """Whether ZeRO stage 3 should keep parameters whole (run as stage 2), and why; ``None``: partition them.

    Args:
        setting: ``zero3_partition_parameters`` (``True``, ``False`` or ``"auto"``).
        world_size: data-parallel ranks.
        num_parameters: counts the model's parameters (called only when needed), or ``None`` if unknown.
        device_memory: one GPU's memory in bytes, ``None`` off GPU.
        offload_param: parameters are offloaded (needs stage 3).
        resume_partitioned: the layout of the checkpoint this run resumes from, if any (``auto`` keeps it).
    """
    if setting is True or offload_param or (setting == "auto" and resume_partitioned is True):
        return None
    if setting is False:
        return "zero3_partition_parameters: false"
    if resume_partitioned is False:
        return "as in the checkpoint this run resumes from"
    if world_size == 1:
        return "a single data-parallel rank has nothing to partition"
    if num_parameters is None or not device_memory:
        return None
    n = num_parameters()
    share = 2 * n / device_memory
    if share > REPLICATE_MAX_SHARE:
        return None
    return (f"the model's 16-bit weights ({2 * n / 2**30:.1f} GiB, {n / 1e9:.2f}B parameters) take {share:.1%} <= "
            f"{REPLICATE_MAX_SHARE:.0%} of a GPU's memory")


class SFTDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` with the recipe's launcher keys and defaults measured for this model size.

    Args:
        zero_stage: ZeRO stage (recipe: 3): 1 shards optimizer states, 2 also gradients, 3 also parameters.
        offload_optimizer_device: ``none``, ``cpu`` or ``nvme`` (recipe: none).
        offload_param_device: ``none``, ``cpu`` or ``nvme`` (recipe: none; stage 3 only).
        zero3_init_flag: build the model already partitioned (``deepspeed.zero.Init``), so no rank ever holds the
            full model (recipe: true). With ``false`` each rank builds the full model and DeepSpeed partitions it.
        zero3_save_16bit_model: gather 16-bit weights on save (``stage3_gather_16bit_weights_on_model_save``;
            recipe: true). The Hugging Face export always gathers full weights (``lit_sft/export.py``).
        zero3_partition_parameters: with ``zero_stage: 3``, whether parameters are partitioned too. ``auto``
            (default): not when there is a single data-parallel rank, nor when the model's 16-bit weights take at
            most :data:`REPLICATE_MAX_SHARE` of one GPU's memory (then DeepSpeed runs stage 2: gradients and
            optimizer states stay partitioned); ``true``: always (DeepSpeed stage 3); ``false``: never. The choice
            is logged. See the module docstring for the measurement behind ``auto``.
        stage3_param_persistence_threshold: DeepSpeed's ZeRO-3 parameter-fetch knob (``None``: DeepSpeed's default,
            1e5). Measured on 2 H200s with the 1.5B model: persisting every parameter (threshold 1e9) removed the
            816 all-gathers per step but left forward+backward at 1.47 s (1.55 s with the defaults), so the defaults
            stay; what pays is not partitioning (``zero3_partition_parameters``).
        stage3_prefetch_bucket_size: DeepSpeed's ZeRO-3 parameter-fetch knob (``None``: DeepSpeed's default, 5e7).
        stage3_max_live_parameters: DeepSpeed's ZeRO-3 parameter-fetch knob (``None``: DeepSpeed's default, 1e9).
        stage3_max_reuse_distance: DeepSpeed's ZeRO-3 parameter-fetch knob (``None``: DeepSpeed's default, 1e9).
        **kwargs: any other ``lightning.pytorch.strategies.DeepSpeedStrategy`` argument (``config``,
            ``reduce_bucket_size``, ``overlap_comm``, ``contiguous_gradients``, ...; Lightning's defaults).
    """

    def __init__(
        self,
        zero_stage: int = 3,
        offload_optimizer_device: OffloadDevice = "none",
        offload_param_device: OffloadDevice = "none",
        zero3_init_flag: bool = True,
        zero3_save_16bit_model: bool = True,
        zero3_partition_parameters: Union[bool, Literal["auto"]] = "auto",
        stage3_param_persistence_threshold: Optional[int] = None,
        stage3_prefetch_bucket_size: Optional[int] = None,
        stage3_max_live_parameters: Optional[int] = None,
        stage3_max_reuse_distance: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("logging_batch_size_per_gpu", "auto") == "auto":  # only feeds DeepSpeed's throughput printouts;
            kwargs["logging_batch_size_per_gpu"] = 1  # "auto" would build a train dataloader during model setup
        if zero3_partition_parameters not in (True, False, "auto"):
            raise ValueError(f"trainer.strategy.init_args.zero3_partition_parameters={zero3_partition_parameters!r}: "
                             "use auto, true or false")
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
        self.zero3_partition_parameters = zero3_partition_parameters
        self.stage3_knobs = {"stage3_param_persistence_threshold": stage3_param_persistence_threshold,
                             "stage3_prefetch_bucket_size": stage3_prefetch_bucket_size,
                             "stage3_max_live_parameters": stage3_max_live_parameters,
                             "stage3_max_reuse_distance": stage3_max_reuse_distance}
        self._partitioning_resolved = False
        self._resume_partitioned: Optional[bool] = None

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

    # -- ZeRO-3 parameter partitioning ------------------------------------------------------------------------------
    def _device_memory(self) -> Optional[int]:
        if self.root_device.type != "cuda":
            return None
        return torch.cuda.get_device_properties(self.root_device).total_memory

    def resolve_partitioning(self) -> None:
        """Apply ``zero3_partition_parameters`` (once, before the model is built): possibly run stage 3 as stage 2.

        The model size comes from the LightningModule's ``num_parameters()`` (``SFTModule`` counts them on the meta
        device without allocating); a module without it keeps stage 3 under ``auto`` unless there is one rank.
        """
        if self._partitioning_resolved:
            return
        self._partitioning_resolved = True
        zero = self.config.get("zero_optimization") or {}
        if zero.get("stage") != 3:
            return
        if zero.get("offload_param") and self.zero3_partition_parameters is False:
            raise ValueError("offload_param_device needs partitioned parameters: set "
                             "trainer.strategy.init_args.zero3_partition_parameters to auto or true")
        count = getattr(self.lightning_module, "num_parameters", None)
        reason = keep_parameters_whole(self.zero3_partition_parameters, self.world_size,
                                       count if callable(count) else None, self._device_memory(),
                                       bool(zero.get("offload_param")), self._resume_partitioned)
        if reason is None:
            rank_zero_info("ZeRO stage 3: parameters, gradients and optimizer states partitioned")
            return
        zero["stage"] = 2
        rank_zero_info(f"ZeRO stage 3 requested; parameters stay whole on every GPU ({reason}): DeepSpeed runs stage 2 "
                       "(gradients and optimizer states partitioned as in stage 3), which skips ZeRO-3's per-module "
                       "gather/release. trainer.strategy.init_args.zero3_partition_parameters: true partitions them.")

    @property
    def zero3_init(self) -> bool:
        """Whether ``configure_model`` runs inside ``deepspeed.zero.Init`` (ZeRO-3 with ``zero3_init_flag``)."""
        return self.zero_stage_3 and self.zero3_init_flag

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        self.resolve_partitioning()
        if self.zero3_init:
            with super().model_sharded_context():
                yield
        else:
            self._init_config_if_needed()
            yield

    def setup(self, trainer: Any) -> None:
        self.resolve_partitioning()
        super().setup(trainer)

    # -- optimizer -------------------------------------------------------------------------------------------------
    def _init_optimizers(self) -> Any:
        """``configure_optimizers``' optimizer, switched to PyTorch's fused Adam(W) kernel on GPU (same update
        rule; DeepSpeed steps it on its flat fp32 partitions, which live on the GPU unless the optimizer is
        offloaded)."""
        optimizer, scheduler = super()._init_optimizers()
        offloaded = bool((self.config.get("zero_optimization") or {}).get("offload_optimizer"))
        if (self.root_device.type == "cuda" and not offloaded
                and type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)):
            for group in optimizer.param_groups:
                group["fused"], group["foreach"] = True, False
            optimizer.defaults.update(fused=True, foreach=False)
        return optimizer, scheduler

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def check_resume(self, checkpoint_path: Optional[str]) -> None:
        """Before the model is built (the CLI calls it; with the Trainer API call it before ``trainer.fit`` when
        resuming on another GPU count): match the parameter layout of the checkpoint, say how it will be loaded, or
        refuse a combination that cannot be (with the fix or the command that converts).

        DeepSpeed 0.19's universal checkpoint re-partitions for any data-parallel world size, but only into the same
        parameter layout (a stage-3 conversion lacks what a stage-2 loader reads, and the reverse), so with
        ``zero3_partition_parameters: auto`` the resumed run keeps the checkpoint's layout.

        Raises:
            ValueError: the checkpoint has partitioned parameters and this run is not ZeRO-3, or its layout differs
                from an explicit ``zero3_partition_parameters``, or the world size differs with the optimizer on NVMe.
        """
        layout = checkpoint_layout(checkpoint_path) if checkpoint_path else None
        if layout is None:
            return
        world, partitioned = layout
        stage = (self.config.get("zero_optimization") or {}).get("stage")
        key = "trainer.strategy.init_args.zero3_partition_parameters"
        if partitioned and stage != 3:
            raise ValueError(f"{checkpoint_path} holds partitioned parameters (ZeRO-3); resume it with "
                             f"trainer.strategy.init_args.zero_stage: 3 (this run has zero_stage: {stage})")
        if stage == 3 and self.zero3_partition_parameters != "auto" and self.zero3_partition_parameters != partitioned:
            raise ValueError(f"{checkpoint_path} was written with {'partitioned' if partitioned else 'whole'} "
                             f"parameters; DeepSpeed cannot load it into the other layout: set {key}: "
                             f"{str(partitioned).lower()} (or auto) to resume it")
        if stage == 3:
            self._resume_partitioned = partitioned
        now = self.num_processes * self.num_nodes
        if world == now:
            return
        done = os.path.isfile(os.path.join(checkpoint_path, UNIVERSAL_TAG, "zero", "optimizer_state.pt"))
        nvme = ((self.config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device") == "nvme"
        if nvme and not done:
            raise ValueError(f"{checkpoint_path} was written by {world} data-parallel ranks and this run has {now}, "
                             f"with the optimizer offloaded to NVMe: convert it first with\n  "
                             f"{convert_command(checkpoint_path)}")
        rank_zero_info(f"{checkpoint_path} was written by {world} data-parallel rank(s), this run has {now}: loading "
                       f"DeepSpeed's universal checkpoint {'(already converted)' if done else '(converted at load: ' + convert_command(checkpoint_path) + ')'}")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Lightning's DeepSpeed load; a checkpoint written with another data-parallel world size goes through
        DeepSpeed's universal checkpoint: converted once by global rank 0 with :func:`convert_to_universal` (the
        other ranks wait), then loaded with ``load_universal_checkpoint``, which re-partitions the fp32 weights and
        Adam moments for this world size. The step counters, LR schedule and data position come from Lightning's
        part of the checkpoint as in any resume (the plan is global: same rows per step, same steps).

        Raises:
            ValueError: the checkpoint's parameter layout differs from this run's (see :meth:`check_resume`).
        """
        layout = None if self.load_full_weights else checkpoint_layout(str(checkpoint_path))
        if layout is None or layout == (self.world_size, self.zero_stage_3):
            return super().load_checkpoint(checkpoint_path, weights_only)
        world, partitioned = layout
        if partitioned != self.zero_stage_3:
            raise ValueError(f"{checkpoint_path} was written with {'partitioned' if partitioned else 'whole'} "
                             f"parameters and this run keeps them {'partitioned' if self.zero_stage_3 else 'whole'}; "
                             "DeepSpeed cannot load across layouts: set trainer.strategy.init_args."
                             f"zero3_partition_parameters: {str(partitioned).lower()}, or call "
                             "trainer.strategy.check_resume(path) before trainer.fit (the CLI does)")
        path = self.broadcast(str(checkpoint_path))
        if self.is_global_zero:
            convert_to_universal(path, workers=max(1, min(8, (os.cpu_count() or 1) // 4)))
        self.barrier("lit_sft_universal_checkpoint")
        engine = self.deepspeed_engine
        engine._config.load_universal_checkpoint = True
        try:
            return super().load_checkpoint(path, weights_only)
        finally:
            engine._config.load_universal_checkpoint = False
