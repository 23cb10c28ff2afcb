"""Hugging Face export: full weights gathered from ZeRO-3, tokenizer, configs and a model card; optional hub push.

The folder reloads with plain ``transformers.AutoModelForCausalLM.from_pretrained(output_dir)``:
``model.safetensors`` (full weights, tied embeddings kept tied by ``save_pretrained``), ``config.json`` with
``use_cache: true``, ``generation_config.json`` whose EOS is the chat template's end-of-turn token, the tokenizer
files, and ``README.md`` (the model card). With ``run.export_format: compatible`` (the default) ``config.json`` and
``tokenizer_config.json`` also carry transformers 4.x's spelling, so the newest 4.x reads the same model
(``lit_sft/export_compat.py``).

Nothing in the export is left to fail after training: :meth:`HFExport.on_fit_start` checks everything the export
needs before the first step (:func:`check_export`: the generation config, normalised with transformers' own
validation and a warning for each change; the model config; a trial save of the tokenizer; the 4.x keys; a
writable ``output_dir`` with room for the weights). Should the export still fail at the end (a full disk, a hub
outage is only a warning), the error is raised only after every other end-of-training hook has run, so the final
checkpoint is written, and the message gives the one command that redoes the export from it::

    lit_sft export --config OUTPUT_DIR/logs/config.yaml [--ckpt_path OUTPUT_DIR/checkpoints/step-NNNNNN.ckpt]

(:func:`export_checkpoint`; a plain ``.ckpt`` file or a DeepSpeed ZeRO checkpoint folder, consolidated with
DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_sft.export_compat import FORMATS, transformers4_config_keys, write_compatible_keys
from lit_sft.guard import NonFiniteError, nonfinite_tensors
from lit_sft.loss_curve import find_loss_curve, write_loss_curve

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


def prepare_generation_config(model: Any, tokenizer: Any) -> list[str]:
    """Give ``model.generation_config`` the export's EOS and pad ids and make it one that transformers will save.

    The EOS list starts with the chat template's end-of-turn token (:func:`generation_eos_ids`) and the pad id is
    the tokenizer's. ``GenerationConfig.save_pretrained`` validates a modified config strictly and refuses flags
    that have no effect in its decoding mode; published checkpoints often carry such flags (``temperature``,
    ``top_p``, ``top_k`` with ``do_sample: false``). transformers' own ``validate(strict=True)`` names them; each is
    unset (its ``GenerationConfig()`` default), which changes nothing about generation, since they were ignored.

    Returns:
        One line per change (attribute, old and new value, transformers' reason), for a warning.

    Raises:
        ValueError: a generation config transformers rejects for another reason, naming the base model's
            ``generation_config.json``.
    """
    from transformers import GenerationConfig

    config = getattr(model, "generation_config", None)
    if config is None:
        return []
    config.eos_token_id = generation_eos_ids(model.config, tokenizer, config.eos_token_id)
    config.pad_token_id = tokenizer.pad_token_id
    defaults, changes = GenerationConfig(), []
    for _ in range(3):
        try:
            config.validate(strict=True)
            return changes
        except ValueError as err:
            issues = re.findall(r"^- `(\w+)`: (.*)$", str(err), flags=re.MULTILINE)
            unset = [(name, why) for name, why in issues if getattr(config, name, None) != getattr(defaults, name)]
            if not unset:
                raise ValueError(f"the base model's generation_config.json cannot be exported: {err}") from err
            for name, why in unset:
                changes.append(f"{name}: {getattr(config, name)!r} -> {getattr(defaults, name)!r} ({why})")
                setattr(config, name, getattr(defaults, name))
    config.validate(strict=True)
    return changes


def _export_bytes(model: torch.nn.Module, dtype: Optional[torch.dtype]) -> int:
    """Bytes of the exported weights: every parameter once (ZeRO-3 shards counted whole), in ``dtype`` if given."""
    total = 0
    for p in model.parameters():
        numel = getattr(p, "ds_numel", None) or p.numel()
        total += numel * (dtype or p.dtype).itemsize
    return total


def check_export(output_dir: str, model: Any, tokenizer: Any, dtype: Optional[torch.dtype] = None,
                 export_format: str = "compatible") -> list[str]:
    """Check, before training, everything :func:`save_hf_folder` will need, so the export cannot fail after it.

    Normalises the generation config (:func:`prepare_generation_config`), serialises the model config (and its
    transformers 4.x keys with ``export_format: compatible``), saves the tokenizer to a temporary folder, and checks
    that ``output_dir`` is writable with room for the weights (parameter count x bytes per element; checkpoints need
    more, this is the floor).

    Returns:
        The generation-config changes (see :func:`prepare_generation_config`).

    Raises:
        ValueError: an unknown ``export_format``, a generation config or model config that cannot be saved.
        OSError: ``output_dir`` not writable or short of space (the message says how much is needed).
    """
    if export_format not in FORMATS:
        raise ValueError(f"run.export_format={export_format!r}: use one of {list(FORMATS)}")
    changes = prepare_generation_config(model, tokenizer)
    config = json.loads(model.config.to_json_string())
    if export_format == "compatible":
        transformers4_config_keys(config)
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export_check_") as tmp:  # also proves it is writable
        tokenizer.save_pretrained(tmp)
        if export_format == "compatible":
            write_compatible_keys(tmp)
    need, free = _export_bytes(model, dtype), shutil.disk_usage(output_dir).free
    if free < need:
        raise OSError(f"run.output_dir={output_dir!r} has {free / 2**30:.2f} GiB free, the exported weights alone need "
                      f"{need / 2**30:.2f} GiB (checkpoints more): free space or choose another output_dir")
    return changes


def model_card(module: L.LightningModule, datamodule: Any, metrics: dict[str, float],
               loss_curve: Optional[str] = None) -> str:
    """A model card (``README.md``) with hub metadata, the recipe's hyper-parameters, the loss curve (``loss_curve``:
    the image's path relative to the folder, :mod:`lit_sft.loss_curve`), final loss, the preprocessing report
    (``datamodule.preprocessing_report``, a table per split) and versions."""
    import huggingface_hub
    import transformers
    from huggingface_hub import ModelCardData

    import lit_sft
    from lit_sft.data.report import report_markdown

    mh, dh = dict(module.hparams), dict(getattr(datamodule, "hparams", {}) or {})
    report = getattr(datamodule, "preprocessing_report", None)
    base = mh.get("model_name_or_path")
    mixture = dh.get("dataset_mixture")  # data.dataset_mixture replaces data.dataset_name
    datasets = list(dict.fromkeys(s["id"] for s in mixture["datasets"])) if mixture else [dh.get("dataset_name")]

    def hub_id(name: Any) -> Optional[str]:  # local paths are not hub ids: keep them out of the card's metadata
        return name if name and "://" not in name and not os.path.exists(name) else None  # pkg://: a package file

    data = ModelCardData(base_model=hub_id(base), datasets=[hub_id(d) for d in datasets if hub_id(d)] or None,
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
        f"{' (random init)' if base and mh.get('random_init') else ''} on {', '.join(f'`{d}`' for d in datasets)} "
        "with lit_sft (PyTorch Lightning).", "",
        "## Hyper-parameters", "", "| key | value |", "|---|---|", *rows, "",
        "## Results", "",
        f"- optimizer steps: {int(metrics.get('global_step', 0))}",
        (f"- final training loss (token mean of the last step): {metrics['train/loss']:.4f}" if "train/loss" in metrics
         else f"- exported from the checkpoint `{metrics.get('checkpoint')}` with `lit_sft export`"), "",
        *([f"![Training loss per optimizer step, evaluation loss and learning rate]({loss_curve})", ""]
          if loss_curve else []),
        *(["## Preprocessing report", "", *report_markdown(report, dh.get("max_length"))] if report else []),
        "## Framework versions", "", *[f"- {k}: {v}" for k, v in versions.items()], "",
    ])
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def save_hf_folder(output_dir: str, model: Any, state_dict: dict[str, torch.Tensor], tokenizer: Any,
                   card: str, dtype: Optional[torch.dtype] = None, export_format: str = "compatible") -> None:
    """Write the folder (rank 0 only): weights as safetensors, configs, tokenizer, model card.

    ``config.json``'s ``dtype`` is the dtype of the saved weights (transformers writes the in-memory model's, which
    differs with ``export_dtype``); ``export_format: compatible`` adds the transformers 4.x keys
    (:func:`lit_sft.export_compat.write_compatible_keys`).
    """
    os.makedirs(output_dir, exist_ok=True)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.config.use_cache = True
    prepare_generation_config(model, tokenizer)
    model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
    follow_umask(output_dir)
    tokenizer.save_pretrained(output_dir)
    floating = {v.dtype for v in state_dict.values() if v.is_floating_point()}
    if len(floating) == 1:
        _set_json_keys(os.path.join(output_dir, "config.json"), dtype=str(floating.pop()).split(".")[-1])
    if export_format == "compatible":
        write_compatible_keys(output_dir)
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write(card)
    model.config.use_cache = False


def _set_json_keys(path: str, **keys: Any) -> None:
    with open(path) as f:
        data = json.load(f)
    data.update(keys)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def checkpoint_state_dict(path: str) -> tuple[dict[str, torch.Tensor], int]:
    """Weights of ``SFTModule.model`` (keys without the ``model.`` prefix) and the optimizer step of a checkpoint.

    Args:
        path: a Lightning ``.ckpt`` file, or the folder Lightning's ``DeepSpeedStrategy`` writes (``latest`` plus
            ZeRO shards), consolidated with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (fp32 master
            weights), as Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` does, without its file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        from lightning.pytorch.utilities.deepspeed import ds_checkpoint_dir

        full = get_fp32_state_dict_from_zero_checkpoint(path)
        full = {k[len("_forward_module."):] if k.startswith("_forward_module.") else k: v for k, v in full.items()}
        shards = ds_checkpoint_dir(path)  # rank 0's model-states file (ZeRO-3 or ZeRO-1/2 name) holds Lightning's state
        name = next(n for n in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt")
                    if os.path.isfile(os.path.join(shards, n)))
        client = torch.load(os.path.join(shards, name), map_location="cpu", weights_only=False)
        step = int(client.get("global_step", 0))
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        full, step = checkpoint["state_dict"], int(checkpoint.get("global_step", 0))
    return {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}, step


def export_checkpoint(ckpt_path: str, output_dir: str, model_hparams: dict[str, Any], tokenizer: Any,
                      data_hparams: Optional[dict[str, Any]] = None, export_dtype: Optional[str] = None,
                      export_format: str = "compatible", merge_adapter: bool = False) -> None:
    """Write the Hugging Face folder from a checkpoint, as the end of training would have (``lit_sft export``).

    A LoRA checkpoint (``model.peft``) holds the adapter only: the base is rebuilt from ``model_name_or_path`` (in
    16 bits for a QLoRA run), the adapter loaded onto it, and :func:`lit_sft.export_adapter.save_lora_export` writes
    the adapter folder (and the merged model with ``merge_adapter``).

    The model is built from ``model_hparams`` (``SFTModule``'s arguments: base model, config overrides, dtype),
    the checkpoint's weights are loaded into it strictly, then :func:`check_export` and :func:`save_hf_folder` run
    as in training. A DeepSpeed folder holds fp32 master weights; they are saved in the model's ``torch_dtype``
    (what the training-time ZeRO-3 export writes) unless ``export_dtype`` says otherwise.

    Raises:
        FileNotFoundError, RuntimeError: a missing checkpoint, or weights that do not fit the configured model.
    """
    from types import SimpleNamespace

    from lit_sft.checkpoint_io import read_checkpoint
    from lit_sft.loss_curve import history_from_checkpoint
    from lit_sft.modeling import build_causal_lm
    from lit_sft.module import SFTModule

    state, step = checkpoint_state_dict(ckpt_path)
    module = SFTModule(**{**model_hparams, "load_in_4bit": False})  # a QLoRA adapter merges into the 16-bit base
    hp = module.hparams
    module.model, _ = build_causal_lm(hp.model_name_or_path, hp.model_revision, hp.torch_dtype, "sdpa",
                                      hp.random_init, hp.model_config)
    if module.adapter_config is not None:
        from lit_sft.export_adapter import load_adapter_weights
        from lit_sft.lora import add_adapters

        module.model = add_adapters(module.model, module.adapter_config)
        load_adapter_weights(module.model, state)
    else:
        module.model.load_state_dict(state, strict=True)  # copies into the model's dtype; names the keys that differ
    dtype = getattr(torch, export_dtype) if export_dtype else None
    changes = check_export(output_dir, module.model, tokenizer, dtype, export_format)
    if changes:
        rank_zero_warn("generation_config.json normalised for the export: " + "; ".join(changes))
    saved = read_checkpoint(ckpt_path)  # the loss history and the preprocessing report, as the run saved them
    curve = write_loss_curve(history_from_checkpoint(saved, ckpt_path), output_dir)
    report = (saved.get("SFTDataModule") or {}).get("preprocessing_report")
    card = model_card(module, SimpleNamespace(hparams=dict(data_hparams or {}), preprocessing_report=report),
                      {"global_step": step, "checkpoint": os.path.basename(os.path.normpath(ckpt_path))}, curve)
    weights = {k: v.detach() for k, v in module.model.state_dict().items()}
    if module.adapter_config is not None:
        from lit_sft.export_adapter import save_lora_export

        save_lora_export(output_dir, module.model, weights, tokenizer, card, dtype, export_format, merge_adapter)
    else:
        save_hf_folder(output_dir, module.model, weights, tokenizer, card, dtype, export_format)
    rank_zero_info(f"Hugging Face model written to {output_dir} from {ckpt_path} (optimizer step {step})")


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
        export_format: ``compatible`` (default: also readable by transformers 4.x, ``lit_sft/export_compat.py``)
            or ``transformers5`` (what ``save_pretrained`` writes).
        merge_adapter: a LoRA run (``model.peft``) also writes the merged model to ``output_dir/merged``
            (``lit_sft/export_adapter.py``); the adapter folder goes to ``output_dir`` either way.

    Raises:
        ValueError: ``push_to_hub`` without ``hub_model_id``.
    """

    def __init__(self, output_dir: str, push_to_hub: bool = False, hub_model_id: Optional[str] = None,
                 hub_strategy: Literal["every_save", "end"] = "every_save", hub_private_repo: Optional[bool] = None,
                 save_steps: Optional[int] = None, export_dtype: Optional[str] = None,
                 export_format: str = "compatible", merge_adapter: bool = False) -> None:
        if push_to_hub and not hub_model_id:
            raise ValueError("push_to_hub=true needs hub_model_id (e.g. 'my-user/Qwen2.5-1.5B-Open-R1-Distill')")
        self.output_dir, self.push_to_hub, self.hub_model_id = output_dir, push_to_hub, hub_model_id
        self.hub_strategy, self.hub_private_repo, self.save_steps = hub_strategy, hub_private_repo, save_steps
        self.export_dtype = getattr(torch, export_dtype) if export_dtype else None
        self.export_format = export_format
        self.merge_adapter = merge_adapter
        self._error: Optional[BaseException] = None

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Check the export before the first step (:func:`check_export`); warn about each generation-config change.

        Raises:
            ValueError: no data module with a ``tokenizer`` (the export saves it with the model).
        """
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("HFExport saves the tokenizer with the model: train with an SFTDataModule (or a data "
                             "module with a .tokenizer)")
        if trainer.is_global_zero:
            changes = check_export(self.output_dir, module.model, tokenizer, self.export_dtype, self.export_format)
            if changes:
                rank_zero_warn("generation_config.json normalised for the export (these flags have no effect in its "
                               "decoding mode and transformers refuses to save them): " + "; ".join(changes))
        else:
            prepare_generation_config(module.model, tokenizer)

    def export(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Gather and write the folder (collective: every rank must call it)."""
        state_dict = gather_state_dict(trainer, module)
        bad = trainer.strategy.broadcast(nonfinite_tensors(state_dict.items()) if trainer.is_global_zero else None)
        if bad:
            raise NonFiniteError(f"refusing to export to {self.output_dir}: weights are not finite ({', '.join(bad)}) "
                                 f"at optimizer step {trainer.global_step}; the last checkpoint is kept")
        try:
            if trainer.is_global_zero:
                metrics = dict(getattr(module, "last_step_metrics", {}) or {})
                metrics["global_step"] = trainer.global_step
                curve = write_loss_curve(find_loss_curve(trainer), self.output_dir)
                card = model_card(module, trainer.datamodule, metrics, curve)
                if getattr(module, "adapter_config", None) is not None:  # LoRA: the adapter (and merged) folders
                    self._export_lora(module, state_dict, card)
                else:
                    save_hf_folder(self.output_dir, module.model, state_dict, trainer.datamodule.tokenizer, card,
                                   self.export_dtype, self.export_format)
                rank_zero_info(f"Hugging Face model written to {self.output_dir}")
        finally:  # a failure on rank 0 must not leave the other ranks waiting
            trainer.strategy.barrier("lit_sft_export")

    def _export_lora(self, module: L.LightningModule, state_dict: dict[str, torch.Tensor], card: str) -> None:
        """Rank 0: :func:`lit_sft.export_adapter.save_lora_export` (a QLoRA merge rebuilds the 16-bit base)."""
        from lit_sft.export_adapter import save_lora_export
        from lit_sft.modeling import build_causal_lm

        hp = module.hparams

        def base_16bit() -> torch.nn.Module:
            return build_causal_lm(hp.model_name_or_path, hp.model_revision, hp.torch_dtype, "sdpa", False,
                                   hp.model_config)[0]

        save_lora_export(self.output_dir, module.model, state_dict, module.trainer.datamodule.tokenizer, card,
                         self.export_dtype, self.export_format, self.merge_adapter, base_16bit)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        """With ``push_to_hub`` and ``hub_strategy: every_save``: at every ``save_steps``-th optimizer step, export
        the folder (a collective under ZeRO-3) and upload it in the background (``run_as_future``)."""
        step = trainer.global_step
        if (self.push_to_hub and self.hub_strategy == "every_save" and self.save_steps and step
                and step % self.save_steps == 0 and getattr(self, "_last_pushed", None) != step):
            self._last_pushed = step
            try:
                self.export(trainer, module)
            except Exception as err:  # the end of training exports again; a failed interim export only warns
                rank_zero_warn(f"export at step {step} for the hub push failed ({type(err).__name__}: {err}); "
                               "training continues")
                return
            if trainer.is_global_zero:
                push_folder(self.output_dir, self.hub_model_id, self.hub_private_repo, blocking=False)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Export (and push). An export error is kept and raised in :meth:`on_fit_end`, after every other
        end-of-training hook (the final checkpoint's included) has run."""
        try:
            self.export(trainer, module)
        except Exception as err:
            self._error = err
            log.error("The Hugging Face export to %s failed: %s: %s", self.output_dir, type(err).__name__, err)
            return
        if self.push_to_hub and trainer.is_global_zero:
            push_folder(self.output_dir, self.hub_model_id, self.hub_private_repo, blocking=True)

    @property
    def export_failed(self) -> bool:
        """Whether the end-of-training export failed (its error is raised in :meth:`on_fit_end`); the checkpoint
        callback then does not record the run as finished, so a rerun exports again."""
        return self._error is not None

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._error is None:
            return
        err, self._error = self._error, None
        config = os.path.join(trainer.log_dir or self.output_dir, "config.yaml")
        command = f"lit_sft export --config {config if os.path.isfile(config) else 'YOUR_RUN_CONFIG.yaml'}"
        raise RuntimeError(
            f"training finished but the Hugging Face export to {self.output_dir!r} failed ({type(err).__name__}: "
            f"{err}). The trained weights are in the last checkpoint under {self.output_dir!r}/checkpoints; after "
            f"fixing the cause, redo the export with: {command} (add --ckpt_path to pick a checkpoint)") from err
