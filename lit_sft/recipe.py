"""open-r1's recipe files as they are: ``lit_sft fit --recipe config_demo.yaml --accelerate_config zero3.yaml``.

``--recipe`` reads open-r1's flat SFT recipe (TRL ``SFTConfig`` + ``ModelConfig`` + ``ScriptArguments`` keys at the
top level), ``--accelerate_config`` the YAML given to ``accelerate launch --config_file``. Each is converted key by
key, following :mod:`lit_sft.recipe_keys` (the one table of policies), into lit_sft's own config and applied as a
``--config`` overlay at its place on the command line, so later ``--config`` files and flags override it, and
``--print_config`` prints the result (``... --print_config > run.yaml`` is the converter). A key the schema does
not know is an error naming it; a key lit_sft does not implement is a warning naming it, or an error where ignoring
it would change training.

For keys the recipe leaves out, the converted config holds TRL's defaults (what ``TrlParser`` would give), and
lit_sft's speed settings as ``configs/qwen_zero3.yaml`` ships them (:data:`SPEED`), none of which changes the rows
of a step or the loss. ``bf16: true`` or ``mixed_precision: bf16`` in either file gives ``bf16-mixed`` (transformers
uses bf16 when either asks for it).
"""

from __future__ import annotations

import difflib
import json
import os
from typing import Any, Optional

import yaml
from jsonargparse import ActionConfigFile
from jsonargparse._common import NonParsingAction  # the base of jsonargparse's own non-parsing actions
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_sft.recipe_keys import ACCELERATE, KEEP, RECIPE, RecipeKey

SPEED = {"data.padding_free": True, "data.max_tokens_per_micro_batch": 65536,
         "model.gradient_checkpointing_layers": "auto", "data.num_workers": 4}
"""lit_sft's fast path as ``configs/qwen_zero3.yaml`` sets it (``README.md``, "Fast by default, same math")."""

REPORT_TO = ("wandb", "tensorboard", "csv", "none")
DEEPSPEED_STRATEGY = "lit_sft.SFTDeepSpeedStrategy"


class RecipeError(ValueError):
    """A recipe or accelerate file that lit_sft cannot run as written; the message names every key at fault."""


def load_yaml(path: str, what: str) -> dict[str, Any]:
    """The mapping in a YAML file; errors name the file (and PyYAML's line and column).

    Raises:
        RecipeError: the file is missing, is not YAML, or holds something other than a mapping.
    """
    try:
        with open(path) as f:
            value = yaml.safe_load(f)
    except OSError as err:
        raise RecipeError(f"{what} {path!r} cannot be read: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise RecipeError(f"{what} {path!r} is not valid YAML: {err}") from err
    if not isinstance(value, dict):
        raise RecipeError(f"{what} {path!r} must hold a mapping of keys, got {type(value).__name__}")
    return value


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[last] = value


def _flatten(values: dict[str, Any], nested: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{"deepspeed_config": {"zero_stage": 3}}`` -> ``{"deepspeed_config.zero_stage": 3}`` for ``nested`` keys."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in nested and isinstance(value, dict):
            flat.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            flat[key] = value
    return flat


class Conversion:
    """A converted file: ``config`` (nested lit_sft keys), ``env`` (variables to set), and the messages."""

    def __init__(self) -> None:
        self.config: dict[str, Any] = {}
        self.env: dict[str, str] = {}
        self.warnings: list[str] = []
        self.launcher: list[str] = []

    def set(self, dotted: str, value: Any) -> None:
        """Set lit_sft key ``dotted`` (``model.learning_rate``); ``env.NAME`` sets an environment variable."""
        if dotted.startswith("env."):
            self.env[dotted[len("env."):]] = str(value)
        else:
            _set(self.config, dotted, value)


def _check_keys(values: dict[str, Any], table: dict[str, RecipeKey], what: str, path: str, out: Conversion) -> None:
    """Unknown keys, and values of ``checked`` keys lit_sft cannot honour, are one error; ``ignored`` keys with a
    value that matters are warnings, ``launcher`` keys an info list."""
    problems = []
    for name in values:
        if name not in table:
            close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.75)
            problems.append(f"{name!r} is not a key of {what}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    for name, value in values.items():
        key = table.get(name)
        if key is None or key.policy in ("mapped",):
            continue
        usual = _same(value, key.default) or any(_same(value, a) for a in key.accepts)
        if key.policy == "checked" and not usual:
            problems.append(f"{name}={value!r}: {key.note} (lit_sft accepts {key.default!r}"
                            + "".join(f", {a!r}" for a in key.accepts) + ")")
        elif key.policy == "ignored" and not usual:
            out.warnings.append(f"{path}: {name}={value!r} is not used by lit_sft: {key.note}")
        elif key.policy == "launcher" and value not in (None, False, 0, "", [], {}):
            out.launcher.append(name)
    if problems:
        raise RecipeError(f"{what} {path!r}: " + "; ".join(problems) + ". See lit_sft/recipe_keys.py for every key.")


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and not isinstance(a, bool)
                                             and isinstance(b, (int, float)) and not isinstance(b, bool) and a == b)


def _whole_steps(name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, float) and not value.is_integer():
        raise RecipeError(f"{name}={value}: a ratio of the training steps is not supported; give whole optimizer "
                          "steps")
    return int(value)


def _json(name: str, value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise RecipeError(f"{name}={value!r} is neither a mapping nor JSON: {err}") from err
    return value


def _map(name: str, value: Any, recipe: dict[str, Any], out: Conversion) -> None:
    """Set the lit_sft key(s) of mapped recipe key ``name`` (values converted where the two differ)."""
    target = RECIPE[name].target
    if name == "bf16":
        if value or (value is None and not recipe.get("fp16")):  # TRL: unset means true unless fp16
            out.set("trainer.precision", "bf16-mixed")
    elif name in ("torch_dtype", "dtype"):
        out.set(target, "float32" if value is None else value)  # from_pretrained's default
    elif name == "attn_implementation":
        out.set(target, "sdpa" if value is None else value)  # transformers' choice when unset
    elif name == "output_dir":
        out.set(target, "trainer_output" if value is None else value)  # transformers 5's default
    elif name == "model_revision":
        out.set(target, value)
        if value not in (None, "main"):
            out.set("data.tokenizer_revision", value)
    elif name == "dataset_text_field":
        if value != "text":
            out.set("data.columns", {"text": value})
    elif name == "padding_free":
        if value:
            out.set(target, True)
    elif name == "pad_to_multiple_of":
        out.set(target, None if value == "auto" else value)
    elif name == "completion_only_loss":
        out.set(target, True if value is None else value)
    elif name == "env":
        if not isinstance(value, dict):
            raise RecipeError(f"env={value!r} must be a mapping of environment variables")
        out.env.update({str(k): str(v) for k, v in value.items()})
    elif name == "warmup_steps":
        if value and 0 < value < 1:
            out.set(target, float(value))
        elif value:
            raise RecipeError(f"warmup_steps={value}: lit_sft schedules warmup as a share of the steps; set "
                              "warmup_ratio (or warmup_steps < 1)")
    elif name == "num_train_epochs":
        if not float(value).is_integer():
            raise RecipeError(f"num_train_epochs={value}: Lightning trains whole epochs; set max_steps for a part")
        out.set(target, int(value))
    elif name == "seed":
        out.set(target, value)
        if recipe.get("data_seed") is None:
            out.set("data.seed", value)
    elif name == "data_seed":
        if value is not None:
            out.set(target, value)
    elif name in ("use_cpu", "no_cuda"):
        if value:
            out.set(target, "cpu")
    elif name in ("eval_strategy", "save_strategy"):  # YAML 1.1 reads an unquoted `no` as false
        out.set(target, "no" if value is False else value)
    elif name in ("eval_steps", "save_steps", "logging_steps"):
        out.set(target, _whole_steps(name, value))
    elif name == "log_level":
        if value != "passive":
            out.set(target, "error" if value == "critical" else value)
    elif name == "report_to":
        names = [value] if isinstance(value, str) else list(value or ["none"])
        kept = [n for n in names if n in REPORT_TO]
        dropped = [n for n in names if n not in REPORT_TO]
        if dropped:
            out.warnings.append(f"report_to: {dropped} are not lit_sft loggers (wandb, tensorboard, csv, none); "
                                "left out" + ("; 'all' logs to csv here" if "all" in dropped else ""))
        out.set(target, kept or (["csv"] if "all" in dropped else ["none"]))
    elif name == "resume_from_checkpoint":
        auto = value is None or value is True or str(value).lower() == "true"
        out.set(target, "auto" if auto else (None if value is False or str(value).lower() == "false" else value))
    elif name in ("gradient_checkpointing", "gradient_checkpointing_kwargs", "activation_checkpointing",
                  "activation_checkpointing_kwargs"):
        new = name.replace("gradient_", "activation_")
        if value is not None and (name == new or recipe.get(new) is None):  # transformers 5: the new name wins
            out.set(target, _json(name, value))
    elif name == "lr_scheduler_kwargs":  # null clears what an earlier --config set (they belong to its scheduler)
        out.set(target, _json(name, value) or None)
    elif name == "wandb_project":
        if value is not None:
            out.set(target, value)
    elif name in ("wandb_entity", "wandb_run_group"):
        if value is not None:
            out.set(target, value)
    else:
        out.set(target, value)


def convert_recipe(recipe: dict[str, Any], path: str = "<recipe>") -> Conversion:
    """open-r1's flat recipe -> lit_sft config (see the module docstring).

    Raises:
        RecipeError: unknown keys, or values of ``checked`` keys that lit_sft cannot honour (all named at once).
    """
    out = Conversion()
    _check_keys(recipe, RECIPE, "an open-r1 SFT recipe", path, out)
    for dotted, value in SPEED.items():
        out.set(dotted, value)
    given_targets = {RECIPE[name].target for name in recipe if RECIPE[name].policy == "mapped"}
    for key in RECIPE.values():  # TRL's defaults for what the recipe leaves out
        if key.policy == "mapped" and key.default is not KEEP and key.target not in given_targets:
            _map(key.name, key.default, recipe, out)
    for name, value in recipe.items():
        if RECIPE[name].policy == "mapped":
            _map(name, value, recipe, out)
    if recipe.get("fp16"):
        raise RecipeError(f"{path}: fp16=true: {RECIPE['fp16'].note}")
    max_length = out.config.get("data", {}).get("max_length")
    if max_length and max_length > SPEED["data.max_tokens_per_micro_batch"]:
        out.set("data.max_tokens_per_micro_batch", max_length)
    return out


def convert_accelerate(config: dict[str, Any], path: str = "<accelerate config>") -> Conversion:
    """accelerate's launcher YAML -> lit_sft's ``trainer:`` keys (see :data:`lit_sft.recipe_keys.ACCELERATE_KEYS`).

    Raises:
        RecipeError: unknown keys, FSDP or another unsupported ``distributed_type``, fp16/fp8, or a process count
            that does not divide over the machines.
    """
    out = Conversion()
    values = _flatten(config, nested=("deepspeed_config",))
    _check_keys(values, ACCELERATE, "an accelerate config", path, out)
    kind = values.get("distributed_type", "NO")
    kind = "NO" if kind is False else str(kind).upper()  # YAML 1.1 reads an unquoted NO as false
    if kind == "DEEPSPEED":
        init_args = {name.split(".", 1)[1]: value for name, value in values.items()
                     if name.startswith("deepspeed_config.") and ACCELERATE[name].policy == "mapped"}
        init_args.setdefault("zero_stage", 2)  # accelerate's DeepSpeedPlugin default
        out.set("trainer.strategy", {"class_path": DEEPSPEED_STRATEGY, "init_args": init_args})
    elif kind in ("MULTI_GPU", "MULTI_CPU"):
        out.set("trainer.strategy", "ddp")
    elif kind == "FSDP":
        raise RecipeError(f"{path}: distributed_type=FSDP: {ACCELERATE['fsdp_config'].note}")
    elif kind != "NO":
        raise RecipeError(f"{path}: distributed_type={kind} is not supported by lit_sft (DEEPSPEED, MULTI_GPU, "
                          "MULTI_CPU or NO)")
    precision = str(values.get("mixed_precision") or "no").lower()
    if precision == "bf16":
        out.set("trainer.precision", "bf16-mixed")
    elif precision != "no":
        raise RecipeError(f"{path}: mixed_precision={precision}: lit_sft trains in bf16 (bf16) or fp32 (no); fp16 "
                          "loss scaling and fp8 are not supported")
    if values.get("use_cpu") or kind == "MULTI_CPU":
        out.set("trainer.accelerator", "cpu")
    elif kind in ("DEEPSPEED", "MULTI_GPU"):
        out.set("trainer.accelerator", "gpu")
    machines = int(values.get("num_machines") or 1)
    out.set("trainer.num_nodes", machines)
    processes = values.get("num_processes")
    if processes is not None and int(processes) > 0:
        if int(processes) % machines:
            raise RecipeError(f"{path}: num_processes={processes} (all machines together) does not divide over "
                              f"num_machines={machines}")
        out.set("trainer.devices", int(processes) // machines)
    return out


def _apply(parser: Any, cfg: Any, conversion: Conversion, path: str) -> None:
    """Apply a conversion as a ``--config`` overlay at this point of the command line, then report."""
    for message in conversion.warnings:
        rank_zero_warn(message)
    if conversion.launcher:
        rank_zero_info(f"{path}: launcher keys not needed with Lightning's launch: {', '.join(conversion.launcher)}")
    for name, value in conversion.env.items():
        os.environ[name] = value
    if conversion.env:  # names only: values may be secrets
        rank_zero_info(f"{path}: set in the environment: {', '.join(conversion.env)} (a printed config does not "
                       "carry them: export them in the job script too)")
    config_action = next(a for a in parser._actions if isinstance(a, ActionConfigFile))
    config_action(parser, cfg, yaml.safe_dump(conversion.config, sort_keys=False), config_action.option_strings[-1])


class _RecipeFileAction(NonParsingAction):
    what = ""

    def __init__(self, option_strings: list[str], dest: str = "==SUPPRESS==", default: str = "==SUPPRESS==",
                 help: Optional[str] = None) -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=1, metavar="FILE",
                         help=help)

    def convert(self, values: dict[str, Any], path: str) -> Conversion:
        raise NotImplementedError

    def __call__(self, parser: Any, cfg: Any, values: Any, option_string: Optional[str] = None) -> None:
        path = values[0] if isinstance(values, list) else values
        try:
            conversion = self.convert(load_yaml(path, self.what), path)
        except RecipeError as err:
            parser.error(str(err))
        _apply(parser, cfg, conversion, path)


class RecipeAction(_RecipeFileAction):
    """``--recipe FILE``: an open-r1 SFT recipe (flat TRL/open-r1 keys), converted by :func:`convert_recipe`."""

    what = "recipe"

    def convert(self, values: dict[str, Any], path: str) -> Conversion:
        return convert_recipe(values, path)


class AccelerateConfigAction(_RecipeFileAction):
    """``--accelerate_config FILE``: ``accelerate launch``'s config YAML, converted by :func:`convert_accelerate`."""

    what = "accelerate config"

    def convert(self, values: dict[str, Any], path: str) -> Conversion:
        return convert_accelerate(values, path)


def add_recipe_arguments(parser: Any) -> None:
    """``--recipe`` and ``--accelerate_config`` on a parser that has a ``--config`` action."""
    parser.add_argument("--recipe", action=RecipeAction,
                        help="An open-r1 SFT recipe (TRL SFTConfig/ModelConfig/ScriptArguments keys at the top "
                             "level), applied here as a --config overlay: later --config files and flags override "
                             "it. Keys: lit_sft/recipe_keys.py (README: \"open-r1's recipe files, as they are\").")
    parser.add_argument("--accelerate_config", action=AccelerateConfigAction,
                        help="The accelerate config YAML open-r1 launches with (distributed_type, deepspeed_config, "
                             "mixed_precision, num_processes, num_machines), applied as a --config overlay of "
                             "trainer keys.")
