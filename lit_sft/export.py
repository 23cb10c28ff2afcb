"""Hugging Face export: full weights gathered from ZeRO-3, tokenizer, configs and a model card; optional hub push.

The folder reloads with plain ``transformers.AutoModelForCausalLM.from_pretrained(output_dir)``:
``model.safetensors`` (full weights, tied embeddings kept tied by ``save_pretrained``), ``config.json`` with
``use_cache: true``, ``generation_config.json`` whose EOS is the chat template's end-of-turn token, the tokenizer
files, and ``README.md`` (the model card).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_sft.guard import NonFiniteError, nonfinite_tensors

log = logging.getLogger(__name__)


def gather_state_dict(trainer: L.Trainer, module: L.LightningModule) -> Optional[dict[str, torch.Tensor]]:
    """Full state dict of ``module.model`` on global rank 0 (``None`` elsewhere). A collective under ZeRO-3.

    Under ZeRO-3 this is DeepSpeed's own ``_zero3_consolidated_16bit_state_dict`` (what accelerate calls for
    ``zero3_save_16bit_model``): parameters are gathered one module at a time, so no rank holds more than the
    full model once, in the training dtype (bf16 under ``bf16-mixed``).
    """
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        full = strategy.deepspeed_engine._zero3_consolidated_16bit_state_dict()
        if not trainer.is_global_zero:
            return None
        return {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
    if not trainer.is_global_zero:
        return None
    return {k: v.detach().cpu() for k, v in module.model.state_dict().items()}


def generation_eos_ids(model_config: Any, tokenizer: Any, existing: Any = None) -> list[int]:
    """EOS ids for ``generation_config.json``: the template's end-of-turn token (the tokenizer's EOS) first, then
    any other EOS the base model declared (Qwen: ``[<|im_end|>, <|endoftext|>]``)."""
    ids = [tokenizer.eos_token_id]
    for value in (existing, getattr(model_config, "eos_token_id", None)):
        for i in ([value] if isinstance(value, int) else list(value or [])):
            if i not in ids:
                ids.append(i)
    return ids


def model_card(module: L.LightningModule, datamodule: Any, metrics: dict[str, float]) -> str:
    """A model card (``README.md``) with hub metadata, the recipe's hyper-parameters, final loss and versions."""
    import huggingface_hub
    import transformers
    from huggingface_hub import ModelCardData

    import lit_sft

    mh, dh = dict(module.hparams), dict(getattr(datamodule, "hparams", {}) or {})
    base = mh.get("model_name_or_path")
    dataset = dh.get("dataset_name")

    def hub_id(name: Any) -> Optional[str]:  # local paths are not hub ids: keep them out of the card's metadata
        return name if name and not os.path.exists(name) else None

    data = ModelCardData(base_model=hub_id(base), datasets=[hub_id(dataset)] if hub_id(dataset) else None,
                         library_name="transformers", tags=["lit_sft", "sft"], pipeline_tag="text-generation")
    keys = ["learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio", "weight_decay",
            "max_grad_norm", "torch_dtype", "gradient_checkpointing", "use_liger_kernel"]
    dkeys = ["max_length", "per_device_train_batch_size", "gradient_accumulation_steps", "assistant_only_loss",
             "packing", "seed"]
    config = getattr(getattr(module, "model", None), "config", None)
    model_type = str(getattr(config, "model_type", "model"))
    mh["lr_scheduler_kwargs"] = getattr(module, "lr_scheduler_kwargs", mh.get("lr_scheduler_kwargs"))
    rows = [f"| {k} | {mh.get(k)} |" for k in keys] + [f"| {k} | {dh.get(k)} |" for k in dkeys]
    versions = {"lit_sft": lit_sft.__version__, "torch": torch.__version__, "lightning": L.__version__,
                "transformers": transformers.__version__, "huggingface_hub": huggingface_hub.__version__}
    try:
        import deepspeed

        versions["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    body = "\n".join([
        f"# {os.path.basename(str(base or 'model'))} fine-tuned with lit_sft", "",
        f"Supervised fine-tuning of {f'`{base}`' if base else 'a randomly initialised ' + model_type}"
        f"{' (random init)' if base and mh.get('random_init') else ''} on `{dh.get('dataset_name')}` with lit_sft "
        "(PyTorch Lightning).", "",
        "## Hyper-parameters", "", "| key | value |", "|---|---|", *rows, "",
        "## Results", "",
        f"- optimizer steps: {int(metrics.get('global_step', 0))}",
        f"- final training loss (token mean of the last step): {metrics.get('train/loss', float('nan')):.4f}", "",
        "## Framework versions", "", *[f"- {k}: {v}" for k, v in versions.items()], "",
    ])
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def save_hf_folder(output_dir: str, model: Any, state_dict: dict[str, torch.Tensor], tokenizer: Any,
                   card: str, dtype: Optional[torch.dtype] = None) -> None:
    """Write the folder (rank 0 only): weights as safetensors, configs, tokenizer, model card."""
    os.makedirs(output_dir, exist_ok=True)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.config.use_cache = True
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.eos_token_id = generation_eos_ids(model.config, tokenizer, generation_config.eos_token_id)
        generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
    follow_umask(output_dir)
    tokenizer.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write(card)
    model.config.use_cache = False


def current_umask() -> int:
    """The process umask, read from ``/proc/self/status`` where possible (``os.umask`` must set it to read it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: str) -> None:
    """Give the ``*.safetensors`` files of ``folder`` the mode of any new file (``0666 & ~umask``, 0644 usually).

    safetensors (0.4+, Rust) writes each file through a ``tempfile::NamedTempFile`` in the same folder, created 0600,
    and renames it, so ``model.safetensors`` would stay readable by its owner only while every other file of the
    folder follows the umask (other users of a shared cluster folder could not load the model).
    """
    mode = 0o666 & ~current_umask()
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            os.chmod(os.path.join(folder, name), mode)


def push_folder(output_dir: str, hub_model_id: str, private: Optional[bool] = None, blocking: bool = True) -> Any:
    """Upload ``output_dir`` (minus training checkpoints and logs) to the hub repo ``hub_model_id``.

    Never raises: if the hub is unreachable it warns and leaves every local file in place. ``HF_ENDPOINT`` is read
    at call time. Returns the ``CommitInfo`` (or a ``Future`` with ``blocking=False``), or ``None`` on failure.
    """
    from huggingface_hub import HfApi

    try:
        api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"))
        api.create_repo(hub_model_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=hub_model_id, folder_path=output_dir, run_as_future=not blocking,
                                 ignore_patterns=["checkpoints/*", "logs/*", "wandb/*", "*.ckpt"],
                                 commit_message="lit_sft: upload model")
    except Exception as err:  # the hub being down must never cost a run its local files
        rank_zero_warn(f"push_to_hub to {hub_model_id!r} failed ({type(err).__name__}: {err}); "
                       f"the model stays in {output_dir}")
        return None


class HFExport(L.Callback):
    """Writes the Hugging Face folder at the end of training (and at each checkpoint with ``every_save``).

    Args:
        output_dir: where the folder goes (the run's ``output_dir``).
        push_to_hub: upload the folder with huggingface_hub.
        hub_model_id: ``user/name`` of the hub repo (required with ``push_to_hub``).
        hub_strategy: ``end`` pushes once at the end; ``every_save`` also exports and pushes at every checkpoint.
        hub_private_repo: create the repo private.
        save_steps: the checkpoint interval, used by ``every_save``.
        export_dtype: cast the weights on export (``bfloat16``, ``float16``, ``float32``); ``None`` keeps the
            training dtype (16-bit under ``bf16-mixed`` with DeepSpeed).

    Raises:
        ValueError: ``push_to_hub`` without ``hub_model_id``.
    """

    def __init__(self, output_dir: str, push_to_hub: bool = False, hub_model_id: Optional[str] = None,
                 hub_strategy: Literal["every_save", "end"] = "every_save", hub_private_repo: Optional[bool] = None,
                 save_steps: Optional[int] = None, export_dtype: Optional[str] = None) -> None:
        if push_to_hub and not hub_model_id:
            raise ValueError("push_to_hub=true needs hub_model_id (e.g. 'my-user/Qwen2.5-1.5B-Open-R1-Distill')")
        self.output_dir, self.push_to_hub, self.hub_model_id = output_dir, push_to_hub, hub_model_id
        self.hub_strategy, self.hub_private_repo, self.save_steps = hub_strategy, hub_private_repo, save_steps
        self.export_dtype = getattr(torch, export_dtype) if export_dtype else None

    def export(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Gather and write the folder (collective: every rank must call it)."""
        state_dict = gather_state_dict(trainer, module)
        bad = trainer.strategy.broadcast(nonfinite_tensors(state_dict.items()) if trainer.is_global_zero else None)
        if bad:
            raise NonFiniteError(f"refusing to export to {self.output_dir}: weights are not finite ({', '.join(bad)}) "
                                 f"at optimizer step {trainer.global_step}; the last checkpoint is kept")
        if trainer.is_global_zero:
            metrics = dict(getattr(module, "last_step_metrics", {}) or {})
            metrics["global_step"] = trainer.global_step
            card = model_card(module, trainer.datamodule, metrics)
            save_hf_folder(self.output_dir, module.model, state_dict, trainer.datamodule.tokenizer, card,
                           self.export_dtype)
            rank_zero_info(f"Hugging Face model written to {self.output_dir}")
        trainer.strategy.barrier("lit_sft_export")

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        """With ``push_to_hub`` and ``hub_strategy: every_save``: at every ``save_steps``-th optimizer step, export
        the folder (a collective under ZeRO-3) and upload it in the background (``run_as_future``)."""
        step = trainer.global_step
        if (self.push_to_hub and self.hub_strategy == "every_save" and self.save_steps and step
                and step % self.save_steps == 0 and getattr(self, "_last_pushed", None) != step):
            self._last_pushed = step
            self.export(trainer, module)
            if trainer.is_global_zero:
                push_folder(self.output_dir, self.hub_model_id, self.hub_private_repo, blocking=False)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.export(trainer, module)
        if self.push_to_hub and trainer.is_global_zero:
            push_folder(self.output_dir, self.hub_model_id, self.hub_private_repo, blocking=True)
