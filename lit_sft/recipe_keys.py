"""What lit_sft does with every key of an open-r1 SFT recipe and of an accelerate launcher config (the one table).

open-r1's ``sft.py`` reads a flat YAML with ``TrlParser((ScriptArguments, SFTConfig, ModelConfig))``: the fields of
TRL's ``SFTConfig`` (itself transformers' ``TrainingArguments``), TRL's ``ModelConfig`` and ``ScriptArguments``, and
open-r1's own additions (``dataset_mixture``, ``benchmarks``, ``callbacks``, ``chat_template``, ``wandb_*``, ...).
The recipe schema here is the union of the fields of the versions open-r1 pins (TRL 0.18, transformers 4.52) and of
the current ones (TRL 1.16, transformers 5); ``tests/test_recipe.py`` checks the table against the installed TRL and
transformers, field by field. ``accelerate launch --config_file`` reads the keys of ``ACCELERATE_KEYS``.

Policies:

- ``mapped``: carried to the lit_sft key ``target`` (``lit_sft/recipe.py`` converts values where the two differ, e.g.
  ``bf16`` -> ``trainer.precision``). A recipe that leaves the key out gets TRL's ``default`` (what ``TrlParser``
  would give), unless the default is :data:`KEEP` (lit_sft's own default then stays).
- ``checked``: lit_sft does what the default (or a value in ``accepts``) means and nothing else; another value
  would change training, so it is an error naming the key, the value and the fix.
- ``ignored``: no effect on the trained weights (logging, speed, hub bookkeeping, open-r1's post-training jobs);
  a value other than the default or ``accepts`` is named in a warning with ``note``.
- ``launcher``: read by ``accelerate launch`` itself; lit_sft runs on Lightning's launch (torchrun or SLURM set
  these), so they are listed once at info level.

A key in neither table is an error that names it (and the closest known key). ``python -m lit_sft.recipe_keys``
prints the table as Markdown (the README's copy is checked against it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

Policy = Literal["mapped", "checked", "ignored", "launcher"]


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()
"""Default of a mapped key whose absence leaves lit_sft's own default in place."""


@dataclass(frozen=True)
class RecipeKey:
    """One recipe key: ``name`` (nested accelerate keys as ``deepspeed_config.zero_stage``), its ``policy``, the lit_sft
    ``target`` key for mapped ones, the schema ``default``, other ``accepts``-ed values, and a ``note`` for users."""

    name: str
    policy: Policy
    target: Optional[str] = None
    default: Any = None
    note: str = ""
    accepts: tuple = ()


def _m(name: str, target: str, default: Any = KEEP, note: str = "") -> RecipeKey:
    return RecipeKey(name, "mapped", target, default, note)


def _c(name: str, default: Any, note: str, accepts: tuple = ()) -> RecipeKey:
    return RecipeKey(name, "checked", None, default, note, accepts)


def _i(name: str, default: Any, note: str, accepts: tuple = ()) -> RecipeKey:
    return RecipeKey(name, "ignored", None, default, note, accepts)


def _group(policy: Any, defaults: dict[str, Any], note: str, accepts: tuple = ()) -> tuple[RecipeKey, ...]:
    return tuple(policy(name, default, note, accepts) for name, default in defaults.items())


_SPEED = "speed or memory only; lit_sft's own settings apply"
_EVAL = "evaluation output only; lit_sft evaluates the token-mean loss (eval/loss)"
_LORA = "used only with use_peft: set model.peft instead"
_QUANT = "used only with load_in_4bit: set model.load_in_4bit (QLoRA with model.peft) instead"
_FSDP = "lit_sft refuses FSDP (lit_sft/supported.py): use --accelerate_config with DEEPSPEED or MULTI_GPU"
_LOG = "logging only"

RECIPE_KEYS: tuple[RecipeKey, ...] = (
    # -- TRL ModelConfig ---------------------------------------------------------------------------------------------
    _m("model_name_or_path", "model.model_name_or_path"),
    _m("model_revision", "model.model_revision", "main", "also the tokenizer's revision, as open-r1's get_tokenizer"),
    _m("torch_dtype", "model.torch_dtype", None, "TRL <= 0.19's name of dtype; unset: float32"),
    _m("dtype", "model.torch_dtype", "float32"),
    _m("attn_implementation", "model.attn_implementation", None,
       "unset: transformers picks sdpa; flash_attention_2 without flash-attn falls back with a warning"),
    _c("trust_remote_code", False, "lit_sft loads only transformers' own architectures"),
    _c("use_peft", False, "LoRA is lit_sft's model.peft (peft's LoraConfig keys: configs/qwen_lora.yaml), not "
                         "converted from TRL's flags"),
    *_group(_i, dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_target_modules=None,
                     lora_target_parameters=None, lora_modules_to_save=None, lora_task_type="CAUSAL_LM",
                     use_rslora=False, use_dora=False), _LORA),
    _c("load_in_8bit", False, "quantized training (bitsandbytes) is not in lit_sft"),
    _c("load_in_4bit", False, "QLoRA is lit_sft's model.load_in_4bit with model.peft, not converted from TRL's flags"),
    *_group(_i, dict(bnb_4bit_quant_type="nf4", use_bnb_nested_quant=False, bnb_4bit_quant_storage=None), _QUANT),
    # -- TRL ScriptArguments + open-r1's ------------------------------------------------------------------------------
    _m("dataset_name", "data.dataset_name"),
    _m("dataset_config", "data.dataset_config"),
    _m("dataset_train_split", "data.dataset_train_split", "train"),
    _m("dataset_test_split", "data.dataset_test_split", "test"),
    _m("dataset_mixture", "data.dataset_mixture", KEEP,
       "open-r1's {datasets: [{id, config, split, columns, weight}], seed, test_split_size}"),
    _c("dataset_streaming", False, "lit_sft tokenizes the whole split once (cached); streaming is not supported"),
    _i("gradient_checkpointing_use_reentrant", False, "TRL 0.18's script flag; set gradient_checkpointing_kwargs"),
    _i("ignore_bias_buffers", False, "a DDP flag of TRL's DPO script"),
    # -- TRL SFTConfig (data and loss) --------------------------------------------------------------------------------
    _c("model_init_kwargs", None, "give the model keys one by one (dtype, attn_implementation, model_revision)"),
    _m("chat_template_path", "data.chat_template", KEEP, "a Jinja file (a tokenizer folder is not read)"),
    _m("dataset_text_field", "data.columns", KEEP, "text datasets: data.columns {text: <field>}"),
    _c("dataset_kwargs", None, "lit_sft always prepares the data (skip_prepare_dataset is not supported)"),
    _m("dataset_num_proc", "data.dataset_num_proc"),
    _m("eos_token", "data.eos_token"),
    _i("pad_token", None, "padding is masked out of the loss; the tokenizer's pad token is used"),
    _m("max_length", "data.max_length", 1024),
    _m("max_seq_length", "data.max_length", KEEP, "TRL <= 0.19's name of max_length"),
    _c("truncation_mode", "keep_start", "lit_sft keeps the start of a long row (data.truncation: truncate or drop)"),
    _i("shuffle_dataset", False, "lit_sft shuffles the rows every epoch (data.shuffle, data.seed)", accepts=(True,)),
    _m("packing", "data.packing", False),
    _c("packing_strategy", "bfd", "lit_sft packs with TRL's bfd rule only"),
    _m("padding_free", "data.padding_free", KEEP,
       "lit_sft's padding-free batches are on for a recipe either way (same rows and loss, faster); "
       "--data.padding_free false after --recipe for padded batches"),
    _m("pad_to_multiple_of", "data.pad_to_multiple_of", KEEP, "auto: none"),
    _i("eval_packing", None, _EVAL, accepts=(True, False)),
    _m("completion_only_loss", "data.completion_only_loss", KEEP, "null (TRL's default) is true: completion only"),
    _m("assistant_only_loss", "data.assistant_only_loss", False),
    _c("loss_type", "nll", "lit_sft trains with the token-mean negative log-likelihood", accepts=("chunked_nll",)),
    _i("activation_offloading", False, _SPEED),
    _c("router_aux_loss_coef", None, "MoE auxiliary loss is not in lit_sft"),
    # -- open-r1's SFTConfig additions --------------------------------------------------------------------------------
    _i("benchmarks", [], "open-r1 starts lighteval jobs after training; evaluate the exported folder instead"),
    _i("callbacks", [], "open-r1's push_to_hub_revision callback; lit_sft pushes with push_to_hub/hub_strategy"),
    _m("chat_template", "data.chat_template"),
    _i("system_prompt", None, "open-r1 uses it for benchmarks only"),
    _i("hub_model_revision", "main", "lit_sft pushes to the main branch"),
    _i("overwrite_hub_revision", False, "lit_sft pushes to the main branch"),
    _i("push_to_hub_revision", False, "lit_sft pushes to the main branch"),
    _m("wandb_project", "run.wandb_project"),
    _m("wandb_entity", "env.WANDB_ENTITY", KEEP, "set in the environment, as open-r1's init_wandb_training"),
    _m("wandb_run_group", "env.WANDB_RUN_GROUP", KEEP, "set in the environment, as open-r1's init_wandb_training"),
    _m("env", "env", KEEP, "TrlParser's environment variables, set before training"),
    # -- transformers TrainingArguments: optimization -----------------------------------------------------------------
    _m("learning_rate", "model.learning_rate", 2e-5, "TRL's default 2e-5"),
    _m("lr_scheduler_type", "model.lr_scheduler_type", "linear"),
    _m("lr_scheduler_kwargs", "model.lr_scheduler_kwargs", None,
       "unset: null, lit_sft's default for the scheduler ({min_lr_rate: 0.1} for cosine_with_min_lr, else {})"),
    _m("warmup_ratio", "model.warmup_ratio", 0.0, "transformers <= 4.x; transformers 5 takes a ratio in warmup_steps"),
    _m("warmup_steps", "model.warmup_ratio", KEEP, "a value < 1 is a ratio (transformers 5); whole steps: an error"),
    _m("weight_decay", "model.weight_decay", 0.0),
    _m("adam_beta1", "model.adam_beta1", 0.9),
    _m("adam_beta2", "model.adam_beta2", 0.999),
    _m("adam_epsilon", "model.adam_epsilon", 1e-8),
    _m("max_grad_norm", "model.max_grad_norm", 1.0),
    _c("optim", "adamw_torch_fused", "lit_sft trains with torch.optim.AdamW (fused on GPU)", accepts=("adamw_torch",)),
    _c("optim_args", None, "lit_sft's AdamW takes adam_beta1/adam_beta2/adam_epsilon/weight_decay"),
    _c("optim_target_modules", None, "for GaLore/APOLLO optimizers, which lit_sft does not implement"),
    _c("adafactor", False, "lit_sft trains with AdamW"),
    _c("label_smoothing_factor", 0.0, "lit_sft's loss has no label smoothing"),
    _c("neftune_noise_alpha", None, "NEFTune embedding noise is not in lit_sft"),
    _c("average_tokens_across_devices", True, "lit_sft's loss is always the token mean over all ranks (exact)"),
    _m("gradient_accumulation_steps", "data.gradient_accumulation_steps", 1),
    _m("gradient_checkpointing", "model.gradient_checkpointing", True),
    _m("gradient_checkpointing_kwargs", "model.gradient_checkpointing_kwargs"),
    _m("activation_checkpointing", "model.gradient_checkpointing", KEEP,
       "transformers 5's name of gradient_checkpointing; wins over it when set"),
    _m("activation_checkpointing_kwargs", "model.gradient_checkpointing_kwargs", KEEP,
       "transformers 5's name of gradient_checkpointing_kwargs; wins over it when set"),
    _m("use_liger_kernel", "model.use_liger_kernel", False),
    _i("liger_kernel_config", None, "lit_sft applies Liger's default kernels"),
    # -- batches, epochs, data loading --------------------------------------------------------------------------------
    _m("per_device_train_batch_size", "data.per_device_train_batch_size", 8),
    _m("per_device_eval_batch_size", "data.per_device_eval_batch_size", 8),
    _c("per_gpu_train_batch_size", None, "transformers 4's deprecated name: set per_device_train_batch_size"),
    _c("per_gpu_eval_batch_size", None, "transformers 4's deprecated name: set per_device_eval_batch_size"),
    _c("auto_find_batch_size", False, "lit_sft keeps the rows per step fixed: set per_device_train_batch_size"),
    _m("num_train_epochs", "trainer.max_epochs", 3, "whole epochs (Lightning's max_epochs)"),
    _m("max_steps", "trainer.max_steps", -1),
    _m("seed", "seed_everything", 42, "also data.seed (row order) unless data_seed is set"),
    _m("data_seed", "data.seed"),
    _c("dataloader_drop_last", False, "lit_sft trains a short last step (as drop_last: false)"),
    _m("dataloader_num_workers", "data.num_workers", KEEP, "unset: 4 loader workers, as configs/qwen_zero3.yaml"),
    *_group(_i, dict(dataloader_pin_memory=True, dataloader_persistent_workers=False, dataloader_prefetch_factor=None,
                     dataloader_multiprocessing_context=None, dataloader_in_order=True), _SPEED),
    _i("remove_unused_columns", True, "lit_sft keeps only the columns it reads", accepts=(False,)),
    _c("label_names", None, "lit_sft trains on the labels it builds from the chat template"),
    _c("group_by_length", False, "lit_sft plans micro-batches by compute within a step (the rows of a step are not "
                                 "changed); grouping rows across steps by length is not supported"),
    _c("train_sampling_strategy", "random", "lit_sft shuffles rows (data.shuffle)"),
    _i("length_column_name", "length", "used only with group_by_length"),
    _c("ignore_data_skip", False, "lit_sft resumes at the next step's rows (exact resume)"),
    # -- precision and hardware ---------------------------------------------------------------------------------------
    _m("bf16", "trainer.precision", None, "true: bf16-mixed; unset: true unless fp16 (TRL's default)"),
    _c("fp16", False, "lit_sft refuses fp16 loss scaling (lit_sft/supported.py): use bf16"),
    _i("bf16_full_eval", False, _EVAL),
    _i("fp16_full_eval", False, _EVAL),
    *_group(_i, dict(fp16_opt_level="O1", fp16_backend="auto", half_precision_backend="auto"),
            "fp16 settings; lit_sft trains in bf16"),
    _i("tf32", None, "lit_sft leaves PyTorch's float32 matmul precision as is", accepts=(True, False)),
    _m("use_cpu", "trainer.accelerator", KEEP, "true: cpu"),
    _m("no_cuda", "trainer.accelerator", KEEP, "transformers 4's name of use_cpu"),
    _c("use_mps_device", False, "set trainer.accelerator"),
    _c("use_ipex", False, "Intel extension is not in lit_sft"),
    _i("jit_mode_eval", False, _EVAL),
    _c("tpu_num_cores", None, "TPUs are not supported"),
    _i("tpu_metrics_debug", False, "TPUs are not supported"),
    *_group(_i, dict(torch_compile=False, torch_compile_backend=None, torch_compile_mode=None, torchdynamo=None),
            "lit_sft does not compile the model"),
    _i("torch_empty_cache_steps", None, _SPEED),
    _i("use_cache", False, "training never uses the KV cache", accepts=(True,)),
    _i("enable_jit_checkpoint", False, "checkpoints are written at save_steps"),
    # -- distributed --------------------------------------------------------------------------------------------------
    _c("fsdp", None, _FSDP, accepts=("", [])),
    _c("fsdp_config", None, _FSDP),
    _c("fsdp_min_num_params", 0, _FSDP),
    _c("fsdp_transformer_layer_cls_to_wrap", None, _FSDP),
    _c("deepspeed", None, "give the accelerate config (--accelerate_config) or configure trainer.strategy"),
    _c("accelerator_config", None, "lit_sft plans batches itself (split/dispatch/even batches are not used)"),
    _c("parallelism_config", None, "tensor/context/sequence parallelism is not in lit_sft"),
    *_group(_i, dict(ddp_find_unused_parameters=None, ddp_bucket_cap_mb=None, ddp_broadcast_buffers=None,
                     ddp_static_graph=None, ddp_backend=None), _SPEED),
    _i("ddp_timeout", 1800, "lit_sft uses Lightning's process-group timeout"),
    RecipeKey("local_rank", "launcher", None, -1, "set by the launcher"),
    _i("debug", "", "debug output only", accepts=([],)),
    _i("past_index", -1, "for models with mems (Transformer-XL); not used in SFT"),
    _i("full_determinism", False, "lit_sft seeds with seed; deterministic kernels are not forced"),
    # -- evaluation ---------------------------------------------------------------------------------------------------
    _i("do_train", False, "lit_sft fit always trains", accepts=(True,)),
    _m("do_eval", "data.do_eval", False),
    _c("do_predict", False, "lit_sft fit does not predict"),
    _m("eval_strategy", "run.eval_strategy", "no"),
    _m("eval_steps", "run.eval_steps", KEEP, "whole optimizer steps (a ratio < 1 is an error)"),
    _i("eval_delay", 0, _EVAL),
    _i("eval_accumulation_steps", None, _EVAL),
    _i("eval_on_start", False, _EVAL),
    *_group(_i, dict(prediction_loss_only=False, eval_do_concat_batches=True, eval_use_gather_object=False,
                     batch_eval_metrics=False, include_inputs_for_metrics=False, include_for_metrics=[]), _EVAL),
    _c("load_best_model_at_end", False, "lit_sft exports the last step's weights"),
    _i("metric_for_best_model", None, "used only with load_best_model_at_end"),
    _i("greater_is_better", None, "used only with load_best_model_at_end"),
    # -- output, checkpoints, resume ----------------------------------------------------------------------------------
    _m("output_dir", "run.output_dir", None, "unset: trainer_output (transformers 5)"),
    _m("overwrite_output_dir", "run.overwrite_output_dir", False),
    _m("resume_from_checkpoint", "run.resume_from_checkpoint", None,
       "unset: the newest checkpoint in output_dir, as open-r1's sft.py"),
    _m("save_strategy", "run.save_strategy", "steps"),
    _m("save_steps", "run.save_steps", 500, "whole optimizer steps (a ratio < 1 is an error)"),
    _m("save_total_limit", "run.save_total_limit", None),
    _c("save_safetensors", True, "lit_sft exports safetensors"),
    _i("save_on_each_node", False, "lit_sft saves once per checkpoint"),
    _i("save_only_model", False, "lit_sft checkpoints keep the optimizer, so runs resume"),
    _i("restore_callback_states_from_checkpoint", False, "lit_sft restores its callbacks' state"),
    # -- logging ------------------------------------------------------------------------------------------------------
    _m("logging_steps", "trainer.log_every_n_steps", 10, "whole optimizer steps (a ratio < 1 is an error)"),
    _i("logging_strategy", "steps", _LOG + "; lit_sft logs every logging_steps steps"),
    _i("logging_first_step", False, _LOG),
    _i("logging_dir", None, "lit_sft logs to output_dir/logs"),
    _i("logging_nan_inf_filter", True, "lit_sft stops on a NaN/inf loss (model.max_nonfinite_steps)",
       accepts=(False,)),
    _m("log_level", "run.log_level", KEEP, "passive: lit_sft's info"),
    _i("log_level_replica", "warning", "lit_sft logs on rank 0", accepts=("passive",)),
    _i("log_on_each_node", True, "lit_sft logs on rank 0", accepts=(False,)),
    _i("disable_tqdm", None, "the progress bar is on on a terminal, plain lines otherwise", accepts=(True, False)),
    _i("skip_memory_metrics", True, "lit_sft logs peak_mem_gib on GPUs", accepts=(False,)),
    _i("include_tokens_per_second", False, "lit_sft always logs tokens_per_s", accepts=(True,)),
    _i("include_num_input_tokens_seen", "no", "lit_sft always logs num_tokens",
       accepts=(True, False, "all", "non_padding")),
    _m("report_to", "run.report_to", "none", "wandb, tensorboard and none kept; others (mlflow, ...) warned and "
                                             "left out"),
    _m("run_name", "run.run_name"),
    *_group(_i, dict(project="huggingface", trackio_space_id=None, trackio_bucket_id=None,
                     trackio_static_space_id=None), "trackio is not a lit_sft logger"),
    _i("use_legacy_prediction_loop", False, _EVAL),
    _i("ray_scope", "last", "hyper-parameter search is not in lit_sft"),
    _i("mp_parameters", "", "SageMaker only"),
    # -- hub ----------------------------------------------------------------------------------------------------------
    _m("push_to_hub", "run.push_to_hub", False),
    _m("hub_model_id", "run.hub_model_id"),
    _m("hub_strategy", "run.hub_strategy", "every_save"),
    _m("hub_private_repo", "run.hub_private_repo"),
    _i("hub_token", None, "a token does not belong in a config: set HF_TOKEN or run `hf auth login`"),
    _i("hub_always_push", False, "lit_sft pushes every save with hub_strategy: every_save", accepts=(True,)),
    _i("hub_revision", None, "lit_sft pushes to the main branch", accepts=("main",)),
    *_group(_i, dict(push_to_hub_model_id=None, push_to_hub_organization=None, push_to_hub_token=None),
            "transformers 4's deprecated hub keys: set hub_model_id"),
)

_LAUNCH = "the launcher's setting: Lightning's launch (torchrun, SLURM) provides it"

ACCELERATE_KEYS: tuple[RecipeKey, ...] = (
    _m("distributed_type", "trainer.strategy", KEEP,
       "DEEPSPEED: lit_sft.SFTDeepSpeedStrategy; MULTI_GPU/MULTI_CPU: ddp; NO: one device; FSDP and others: error"),
    _m("mixed_precision", "trainer.precision", KEEP, "bf16: bf16-mixed; no: the recipe's bf16 decides; fp16: error"),
    _m("use_cpu", "trainer.accelerator", KEEP, "true: cpu; false with DEEPSPEED/MULTI_GPU: gpu"),
    _m("num_processes", "trainer.devices", KEEP, "all processes; trainer.devices = num_processes / num_machines"),
    _m("num_machines", "trainer.num_nodes", KEEP),
    _m("deepspeed_config.zero_stage", "trainer.strategy.init_args.zero_stage"),
    _m("deepspeed_config.offload_optimizer_device", "trainer.strategy.init_args.offload_optimizer_device"),
    _m("deepspeed_config.offload_param_device", "trainer.strategy.init_args.offload_param_device"),
    _m("deepspeed_config.zero3_init_flag", "trainer.strategy.init_args.zero3_init_flag"),
    _m("deepspeed_config.zero3_save_16bit_model", "trainer.strategy.init_args.zero3_save_16bit_model"),
    _i("deepspeed_config.gradient_accumulation_steps", None,
       "the recipe's gradient_accumulation_steps is used (transformers refuses a different value)"),
    _i("deepspeed_config.gradient_clipping", None, "the recipe's max_grad_norm is used"),
    _c("deepspeed_config.deepspeed_config_file", None,
       "lit_sft builds the DeepSpeed config from the keys; a full JSON goes to trainer.strategy.init_args.config"),
    _c("deepspeed_config.offload_optimizer_nvme_path", None, "set trainer.strategy.init_args.nvme_path"),
    _c("deepspeed_config.offload_param_nvme_path", None, "set trainer.strategy.init_args.nvme_path"),
    _c("deepspeed_config.deepspeed_moe_layer_cls_names", None, "MoE layers are not in lit_sft"),
    *(RecipeKey(f"deepspeed_config.{name}", "launcher", None, None, _LAUNCH) for name in
      ("deepspeed_multinode_launcher", "deepspeed_hostfile", "deepspeed_inclusion_filter",
       "deepspeed_exclusion_filter")),
    _c("compute_environment", "LOCAL_MACHINE", "SageMaker is not supported"),
    _i("debug", False, "debug output only"),
    _i("downcast_bf16", "no", "a TPU setting", accepts=(False,)),
    _c("fsdp_config", {}, _FSDP, accepts=(None,)),
    _c("megatron_lm_config", {}, "Megatron-LM is not supported", accepts=(None,)),
    _c("parallelism_config", {}, "tensor/context/sequence parallelism is not in lit_sft", accepts=(None,)),
    _c("fp8_config", {}, "FP8 training is not in lit_sft", accepts=(None,)),
    _i("dynamo_config", {}, "lit_sft does not compile the model", accepts=(None,)),
    _i("dynamo_backend", "NO", "lit_sft does not compile the model", accepts=("no",)),
    _i("ipex_config", {}, "Intel extension is not in lit_sft", accepts=(None,)),
    *(RecipeKey(name, "launcher", None, None, _LAUNCH) for name in
      ("machine_rank", "gpu_ids", "main_process_ip", "main_process_port", "rdzv_backend", "same_network",
       "main_training_function", "enable_cpu_affinity", "mpirun_config", "tpu_name", "tpu_zone", "tpu_use_cluster",
       "tpu_use_sudo", "command_file", "commands", "tpu_vm", "tpu_env")),
)

RECIPE = {key.name: key for key in RECIPE_KEYS}
ACCELERATE = {key.name: key for key in ACCELERATE_KEYS}


def markdown(keys: tuple[RecipeKey, ...]) -> str:
    """The table as Markdown: keys of the same policy, target and note share a row."""
    rows: dict[tuple[str, str, str], list[str]] = {}
    for key in keys:
        target = f"`{key.target}`" if key.target else ""
        rows.setdefault((key.policy, target, key.note), []).append(f"`{key.name}`")
    lines = ["| recipe key | policy | lit_sft key | note |", "|---|---|---|---|"]
    lines += [f"| {', '.join(names)} | {policy} | {target} | {note} |"
              for (policy, target, note), names in rows.items()]
    return "\n".join(lines)


def tables() -> str:
    """Both tables as Markdown, as the README carries them."""
    return ("**open-r1 recipe** (TRL `SFTConfig`, `ModelConfig`, `ScriptArguments`, open-r1's additions):\n\n"
            f"{markdown(RECIPE_KEYS)}\n\n**accelerate launcher config**:\n\n{markdown(ACCELERATE_KEYS)}\n")


if __name__ == "__main__":
    import sys

    sys.stdout.write(tables())
