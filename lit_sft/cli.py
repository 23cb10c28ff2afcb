"""``lit_sft`` command line: LightningCLI over ``SFTModule`` and ``SFTDataModule`` plus the run-level recipe keys.

``model:`` and ``data:`` are the two classes' ``__init__`` signatures; ``trainer:`` is Lightning's ``Trainer``; the
top-level keys below (output, checkpoints, hub, loggers) are the recipe's run keys, turned into Trainer callbacks and
loggers here. A rerun with the same ``output_dir`` resumes from its newest complete checkpoint.

The parser (``lit_sft/cli_parser.py``) reads every key from ``LIT_SFT_FIT__<KEY>`` environment variables too and
reports errors in one line; ``--recipe`` / ``--accelerate_config`` take open-r1's own files (``lit_sft/recipe.py``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import sys
import warnings
from typing import Any, Literal, Optional

import lightning
from jsonargparse import ActionConfigFile
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_sft.data.datamodule import SFTDataModule
from lit_sft.data.tokenize import RowError
from lit_sft.data.loading import resolve_path
from lit_sft.console import quiet_resumed_checkpoint_dir
from lit_sft.evaluation import SFTEvaluation
from lit_sft.checkpoint import FINISHED, SFTCheckpoint, training_done
from lit_sft.cli_parser import SFTArgumentParser, overview
from lit_sft.recipe import add_recipe_arguments
from lit_sft.run_config import RunConfigCallback
from lit_sft.checkpoint_io import checkpoint_problem, newest_loadable, read_checkpoint
from lit_sft.export import HFExport
from lit_sft.guard import NonFiniteError
from lit_sft.loggers import build_loggers
from lit_sft.module import SFTModule
from lit_sft.validation import InputError, check_ranges

CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"step-(\d+)\.ckpt$")


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """Newest complete and loadable checkpoint in ``output_dir/checkpoints`` (``step-NNNNNN.ckpt``: a file that
    opens as a ``torch.save`` archive, or a DeepSpeed folder with lit_sft's completion marker, see
    ``lit_sft.checkpoint_io``); ``None`` if there is none. Newer ones that are not usable are skipped with a warning
    that names each and why."""
    path, skipped = newest_loadable(os.path.join(output_dir, CHECKPOINT_DIR))
    for bad, reason in skipped:
        rank_zero_warn(f"Skipping checkpoint {bad}: {reason}"
                       f"{f'; resuming from {os.path.basename(path)} instead' if path else ''}")
    return path


def run_args(
    output_dir: str = "outputs/lit_sft",
    overwrite_output_dir: bool = False,
    resume_from_checkpoint: Optional[str] = "auto",
    save_strategy: Literal["steps", "epoch", "no"] = "steps",
    save_steps: int = 100,
    save_total_limit: Optional[int] = 1,
    eval_strategy: Optional[Literal["no", "steps", "epoch"]] = None,
    eval_steps: Optional[int] = None,
    push_to_hub: bool = False,
    hub_model_id: Optional[str] = None,
    hub_strategy: Literal["every_save", "end"] = "every_save",
    hub_private_repo: Optional[bool] = None,
    report_to: list[Literal["wandb", "csv", "tensorboard", "none"]] = ["csv"],
    run_name: Optional[str] = None,
    wandb_project: str = "lit_sft",
    log_level: Literal["debug", "info", "warning", "error"] = "info",
    export_dtype: Optional[Literal["bfloat16", "float16", "float32"]] = None,
    export_format: Literal["compatible", "transformers5"] = "compatible",
    merge_adapter: bool = False,
) -> None:
    """Run-level keys of the recipe (their names follow transformers' ``TrainingArguments``).

    Args:
        output_dir: checkpoints go to ``output_dir/checkpoints``, logs to ``output_dir/logs``, and the final Hugging
            Face model to ``output_dir`` itself.
        overwrite_output_dir: allow a fresh run (nothing to resume) to write a model into an ``output_dir`` that
            already holds one; without it such a run stops before training. A run that resumes always writes. Never
            deletes checkpoints.
        resume_from_checkpoint: ``auto`` resumes from the newest complete and loadable checkpoint in
            ``output_dir`` if any (as open-r1's ``sft.py``; newer unusable ones are skipped with a warning); a path
            resumes from that checkpoint (an error if it is not usable); ``null`` starts fresh. The config as given
            wins over the checkpoint's saved hyper-parameters. A finished run (``checkpoints/finished.json``) is
            not trained again.
        save_strategy: checkpoint every ``save_steps`` optimizer steps (``steps``), every epoch, or never. With
            ``steps`` or ``epoch`` the last optimizer step is always checkpointed too.
        save_steps: optimizer steps between checkpoints (recipe: 100).
        save_total_limit: checkpoints kept, newest first (recipe: 1), counted from the folder (so also after a
            kill); an old one is deleted only after the new one is complete. ``null`` keeps all.
        eval_strategy: evaluate on ``data.dataset_test_split`` every ``eval_steps`` optimizer steps (``steps``), at
            the end of each epoch (``epoch``), or never (``no``); ``null``: ``epoch`` with ``data.do_eval: true``,
            else ``no``. ``steps``/``epoch`` turn ``data.do_eval`` on (as transformers does). Evaluation runs only
            between optimizer steps and never changes training (``lit_sft/evaluation.py``); keep
            ``trainer.val_check_interval`` at 1.0 (it counts micro-batches).
        eval_steps: optimizer steps between evaluations with ``eval_strategy: steps``; ``null``: ``logging_steps``
            (``trainer.log_every_n_steps``).
        push_to_hub: upload the exported model to the Hugging Face Hub with huggingface_hub (token: ``HF_TOKEN`` or
            ``hf auth login``). A failed upload only warns; the local files stay.
        hub_model_id: the repository to push to (``user/name``, or ``name`` under your account); required with
            ``push_to_hub``.
        hub_strategy: ``every_save``: push at every checkpoint (``save_steps``) and at the end; ``end``: once, at
            the end.
        hub_private_repo: create the repository private (``null``: the Hub's default for your account).
        report_to: loggers (recipe: ``wandb``; ``WANDB_MODE=offline`` works without network), ``csv``,
            ``tensorboard``, or ``none``.
        run_name: the run's name in the loggers.
        wandb_project: the wandb project.
        log_level: level of the ``lit_sft`` and ``lightning`` Python loggers; ``transformers`` and ``datasets`` stay
            at ``warning`` unless ``debug``.
        export_dtype: cast the exported weights; default: the training dtype.
        export_format: ``compatible`` writes a folder that transformers 4.x (the newest, 4.57) loads with the same
            config values and logits as transformers 5 (adds 4.x's ``rope_theta``/``rope_scaling`` and
            ``additional_special_tokens`` next to 5.x's keys; tested in CI); ``transformers5`` writes exactly what
            ``save_pretrained`` writes. See ``lit_sft/export_compat.py``.
        merge_adapter: a LoRA run (``model.peft``) exports its adapter to ``output_dir`` (peft's format) and, with
            ``true``, also the merged 16-bit model to ``output_dir/merged`` (``lit_sft/export_adapter.py``).
    """


def merge_dicts(base: dict, update: dict) -> dict:
    """``base`` updated key by key with ``update``; nested dicts merge the same way, other values are replaced."""
    merged = dict(base)
    for key, value in update.items():
        old = merged.get(key)
        merged[key] = merge_dicts(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return merged


class OverlayConfigFile(ActionConfigFile):
    """``--config`` whose later files update dict-valued keys key by key instead of replacing them.

    jsonargparse replaces a dict-typed value given whole (its maintainers keep that on purpose, see
    jsonargparse#236), so ``--config base.yaml --config overlay.yaml`` with ``model: {model_config:
    {num_hidden_layers: 2}}`` in the overlay dropped every other ``model_config`` key, while the dotted flag
    ``--model.model_config.num_hidden_layers 2`` kept them. After jsonargparse has applied a file, every value that
    is a dict both before and after (``model.model_config``, ``model.lr_scheduler_kwargs``,
    ``model.gradient_checkpointing_kwargs``, ``data.data_files``, a strategy's ``config``, ...) becomes the earlier
    dict updated with the file's (:func:`merge_dicts`), so overlays compose as dotted flags do. Scalars and lists are
    replaced, ``class_path``/``init_args`` merge as jsonargparse already does, and ``key: null`` in a file clears a
    dict (a later file can then set it afresh). A whole value on the command line still replaces
    (``--model.model_config '{...}'``, a section file ``--model model.yaml``), as in jsonargparse.
    ``pkg://package/path`` names a file inside an installed package (``pkg://lit_sft/configs/tiny_cpu.yaml``).
    """

    def __call__(self, parser: Any, cfg: Any, values: Any, option_string: Optional[str] = None) -> None:
        if isinstance(values, str) and values.startswith("pkg://"):  # a config shipped inside a package
            values = resolve_path(values)
        before = {key: value for key, value in cfg.items() if isinstance(value, dict)}
        super().__call__(parser, cfg, values, option_string)
        for key, value in list(cfg.items()):
            if isinstance(value, dict) and key in before:
                cfg[key] = merge_dicts(before[key], value)


def check_run_args(run: dict[str, Any]) -> None:
    """Check the ``run:`` keys before anything is built (ranges: :data:`lit_sft.validation.RANGES`).

    Raises:
        InputError: names the key, the value and the valid range.
    """
    check_ranges("run", run)


class SFTCLI(LightningCLI):
    """LightningCLI with the recipe's run keys at the top level (see :func:`run_args`); the run's config is saved
    when training starts (:class:`lit_sft.run_config.RunConfigCallback`)."""

    def __init__(self, *args: Any, save_config_callback: Any = RunConfigCallback, **kwargs: Any) -> None:
        super().__init__(*args, save_config_callback=save_config_callback, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_function_arguments(run_args, nested_key="run")
        add_recipe_arguments(parser)  # --recipe / --accelerate_config: open-r1's files as they are
        parser.set_defaults({"trainer.use_distributed_sampler": False})

    def init_parser(self, **kwargs: Any) -> Any:
        """lit_sft's parser (:class:`lit_sft.cli_parser.SFTArgumentParser`: one-line errors, ``LIT_SFT_*``
        environment variables) with ``--config`` files that merge dict-valued keys (:class:`OverlayConfigFile`)."""
        kwargs.setdefault("dump_header", [f"lightning.pytorch=={lightning.__version__}"])
        parser_class = self.parser_class if issubclass(self.parser_class, SFTArgumentParser) else SFTArgumentParser
        parser = parser_class(**kwargs)
        parser.add_argument("-c", "--config", action=OverlayConfigFile,
                            help="Path to a configuration file in json or yaml format (pkg://lit_sft/configs/... names "
                                 "one shipped with lit_sft); later files update earlier ones key by key, dict-valued "
                                 "keys included.")
        return parser

    def _run(self) -> dict[str, Any]:
        return dict(self.config[self.subcommand]["run"]) if self.subcommand else dict(self.config["run"])

    def after_instantiate_classes(self) -> None:
        """Hand ``run.export_format`` and ``run.merge_adapter`` to the export callback (built in
        :meth:`instantiate_trainer`)."""
        for callback in getattr(self.trainer, "callbacks", None) or []:
            if isinstance(callback, HFExport):
                callback.export_format = self._run()["export_format"]
                callback.merge_adapter = self._run()["merge_adapter"]

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_run_args(dict(config.run))
        if config.data.tokenizer_name_or_path is None:
            config.data.tokenizer_name_or_path = config.model.model_name_or_path
        if config.run.eval_strategy in ("steps", "epoch") or self.subcommand == "validate":
            config.data.do_eval = True
        level = getattr(logging, config.run.log_level.upper())
        for name in ("lit_sft", "lightning.pytorch"):
            logging.getLogger(name).setLevel(level)
        for name in ("transformers", "datasets"):  # at info they print every configuration: see lit_sft/console.py
            logging.getLogger(name).setLevel(level if level == logging.DEBUG else max(level, logging.WARNING))

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        args = self._run()
        out = args["output_dir"]
        if self.subcommand == "validate":  # reads a model; writes no checkpoint, log, config or export of the run
            self.save_config_callback = None
            if self._get(self.config_init, "trainer.logger") in (None, True):
                kwargs["logger"] = False
            return super().instantiate_trainer(enable_checkpointing=False, **kwargs)
        callbacks = list(kwargs.pop("callbacks", None) or self._get(self.config_init, "trainer.callbacks") or [])
        if args["save_strategy"] != "no":
            steps = args["save_strategy"] == "steps"
            every = {"every_n_train_steps": args["save_steps"]} if steps else {"every_n_epochs": 1}
            callbacks.append(SFTCheckpoint(os.path.join(out, CHECKPOINT_DIR), save_total_limit=args["save_total_limit"],
                                           **every))
        else:
            kwargs["enable_checkpointing"] = False
        callbacks.append(SFTEvaluation(args["eval_strategy"], args["eval_steps"]))
        callbacks.append(HFExport(out, args["push_to_hub"], args["hub_model_id"], args["hub_strategy"],
                                  args["hub_private_repo"], args["save_steps"], args["export_dtype"]))
        kwargs["callbacks"] = callbacks
        kwargs.setdefault("default_root_dir", out)
        resume = self.resume_checkpoint()
        if resume and os.path.dirname(os.path.abspath(resume)) == os.path.abspath(os.path.join(out, CHECKPOINT_DIR)):
            quiet_resumed_checkpoint_dir()
        if self._get(self.config_init, "trainer.logger") in (None, True):
            match = _STEP_RE.search(resume or "")
            loggers = build_loggers(args["report_to"], out, args["run_name"], args["wandb_project"],
                                    int(match.group(1)) if match else None)
            kwargs["logger"] = loggers or False
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI would put the hyper-parameters saved in ``ckpt_path`` over the parsed config (so
        ``--model.max_grad_norm 0.25 --ckpt_path X`` trained with X's 1.0). Here the config as given wins, for
        ``ckpt_path``, ``run.resume_from_checkpoint`` and auto-resume alike; :meth:`before_fit` lists the keys that
        differ from the checkpoint's."""

    def resume_checkpoint(self) -> Optional[str]:
        """The checkpoint this ``fit`` resumes from: ``ckpt_path`` if given, else per ``run.resume_from_checkpoint``
        (``auto``: the newest complete and loadable one in ``output_dir/checkpoints``).

        Raises:
            ValueError: a checkpoint named by ``ckpt_path`` or ``run.resume_from_checkpoint`` is incomplete or cannot
                be loaded (the message says why and names the newest usable one).
        """
        if self.subcommand != "fit":
            return None
        if "_resume" in self.__dict__:
            return self._resume
        args = self._run()
        given = self.config[self.subcommand].get("ckpt_path")
        key, path = ("ckpt_path", given) if given else ("run.resume_from_checkpoint", args["resume_from_checkpoint"])
        if not path:
            path = None
        elif path == "auto" and key == "run.resume_from_checkpoint":
            path = latest_checkpoint(args["output_dir"])
        elif path not in ("last", "best", "hpc") and "://" not in str(path) and not str(path).startswith("registry"):
            problem = checkpoint_problem(str(path))
            if problem is not None:
                usable = latest_checkpoint(args["output_dir"])
                raise ValueError(f"{key}={path!r} cannot be resumed from: {problem}. "
                                 + (f"The newest usable checkpoint in run.output_dir is {usable}."
                                    if usable else "run.output_dir holds no usable checkpoint."))
        self._resume = path
        return path

    def _report_changed_hparams(self, checkpoint: dict[str, Any], path: str) -> None:
        """Warn about every ``model.*``/``data.*`` value that differs from the one saved in the checkpoint (the
        value given now is used; the optimizer takes it too, see ``lit_sft.checkpoint.apply_optimizer_hparams``)."""
        changed = []
        for section, saved, now in (("model", checkpoint.get("hyper_parameters"), self.model.hparams),
                                    ("data", checkpoint.get("datamodule_hyper_parameters"),
                                     getattr(self.datamodule, "hparams", None))):
            for name, value in dict(saved or {}).items():
                if name.startswith("_") or name not in (now or {}):
                    continue
                if now[name] != value:
                    changed.append(f"{section}.{name}={now[name]!r} (checkpoint: {value!r})")
        if changed:
            rank_zero_warn(f"Resuming from {path} with settings that differ from the checkpoint's; the values given "
                           f"now are used: {', '.join(changed)}")

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate`` (``lit_sft/validate.py``): SFTModule defines no test or predict step."""
        return {name: LightningCLI.subcommands()[name] for name in ("fit", "validate")}

    def validate(self, model: SFTModule, datamodule: Any = None, ckpt_path: Optional[str] = None,
                 verbose: bool = True, **kwargs: Any) -> None:
        """``lit_sft validate``: see :func:`lit_sft.validate.validate` (a checkpoint's weights under any strategy)."""
        from lit_sft.validate import validate

        validate(self.trainer, model, datamodule, ckpt_path, verbose)

    def before_fit(self) -> None:
        args, fit = self._run(), self.config_init["fit"]
        out = args["output_dir"]
        trainer = self.trainer
        if trainer.accumulate_grad_batches != 1:
            raise InputError("trainer.accumulate_grad_batches must stay 1: set data.gradient_accumulation_steps "
                             "(lit_sft plans whole optimizer steps)")
        if trainer.gradient_clip_val:
            raise InputError("trainer.gradient_clip_val is not used by lit_sft: set model.max_grad_norm")
        if args["save_strategy"] == "steps" and args["save_steps"] < 1:
            raise InputError(f"run.save_steps={args['save_steps']} must be >= 1 with run.save_strategy: steps")
        if trainer.log_every_n_steps < 1:
            raise InputError(f"trainer.log_every_n_steps={trainer.log_every_n_steps} logs no step (no metrics.csv, "
                             "no wandb history): set it >= 1 (recipe: logging_steps), or run.report_to: [none]")
        for key, value in (("max_steps", trainer.max_steps), ("max_epochs", trainer.max_epochs)):
            if value == 0:
                raise InputError(f"trainer.{key}=0 would train nothing and write no model: set a positive "
                                 f"trainer.{key} (or -1 for no limit)")
        self._finished = self._export_pending = False
        ckpt = self.resume_checkpoint()
        if ckpt:
            if fit.get("ckpt_path") is None:
                rank_zero_info(f"Checkpoint detected, resuming training at {ckpt}")
                fit["ckpt_path"] = ckpt
            if os.path.exists(ckpt):
                self._check_finished(read_checkpoint(ckpt), ckpt)
        if fit.get("ckpt_path") and hasattr(trainer.strategy, "check_resume"):  # another GPU count: before the model
            trainer.strategy.check_resume(fit["ckpt_path"])
        if (fit.get("ckpt_path") is None and os.path.isfile(os.path.join(out, "model.safetensors"))
                and not args["overwrite_output_dir"]):
            raise FileExistsError(f"run.output_dir={out!r} already holds a trained model and no checkpoint to resume "
                                  "from; set run.overwrite_output_dir: true or choose another output_dir")

    def _check_finished(self, checkpoint: dict[str, Any], path: str) -> None:
        """Decide what a run resumed from ``checkpoint`` has left to do: nothing (``finished.json`` names it and the
        limits are reached: :meth:`fit` does not train), only the export (the limits are reached but the export or
        push did not complete), or training."""
        self._report_changed_hparams(checkpoint, path)
        progress = checkpoint.get("lit_sft") or {"global_step": checkpoint.get("global_step", 0)}
        if not training_done(progress, self.trainer.max_steps, self.trainer.max_epochs):
            return
        record = os.path.join(os.path.dirname(os.path.abspath(path)), FINISHED)
        finished = {}
        if os.path.isfile(record):
            with open(record) as f:
                finished = json.load(f)
        step = progress["global_step"]
        if finished.get("checkpoint") == os.path.basename(path) and finished.get("global_step") == step:
            self._finished = True
            rank_zero_info(f"This run has finished: trained to optimizer step {step} ({path}), exported to "
                           f"{self._run()['output_dir']}. Nothing to do: raise trainer.max_steps / trainer.max_epochs "
                           "to train further, or choose another run.output_dir.")
        else:
            self._export_pending = True
            rank_zero_info(f"Training is complete at optimizer step {step} ({path}), but its export did not finish: "
                           "exporting again from the checkpoint, without training.")

    def fit(self, model: SFTModule, datamodule: Any = None, **kwargs: Any) -> None:
        """``Trainer.fit``, except for a finished run (nothing to do) and a run whose training is complete but whose
        export is not (Lightning skips a loop with nothing left to train, and with it the export in
        ``on_train_end``: it is run here)."""
        if getattr(self, "_finished", False):
            return
        trainer = self.trainer
        trainer.fit(model, datamodule=datamodule, **kwargs)
        checkpoint = trainer.checkpoint_callback
        pending = getattr(self, "_export_pending", False)
        if pending and isinstance(checkpoint, SFTCheckpoint) and not checkpoint.finished:
            for callback in trainer.callbacks:
                if isinstance(callback, HFExport):
                    callback.on_train_end(trainer, model)
            checkpoint.write_finished(trainer)


def deepspeed_logs_to_stderr() -> None:
    """Send DeepSpeed's log lines to stderr, so that stdout carries only what a command prints (``--print_config``).

    ``deepspeed.utils.logging`` gives its ``DeepSpeed`` logger a ``StreamHandler`` on the ``sys.stdout`` of the
    moment it is imported, and that import happens during parsing: jsonargparse resolves the type hints of
    Lightning's ``DeepSpeedStrategy`` (a ``TYPE_CHECKING`` import of ``deepspeed``) whenever a config names a
    DeepSpeed strategy, and the import logs "Setting accelerator to CPU" on a machine without CUDA. So import it
    here first with stdout pointing at stderr (its handler keeps that stream), and point an existing handler on
    stdout (DeepSpeed imported earlier in this process) at stderr. Without deepspeed installed, nothing to do.
    """
    if "deepspeed" not in sys.modules:
        if importlib.util.find_spec("deepspeed") is None:
            return
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401
    for handler in logging.getLogger("DeepSpeed").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
            handler.setStream(sys.stderr)


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``lit_sft`` console script.

    Input the user must fix (:class:`lit_sft.validation.InputError`: a config value out of range, a data file or
    tokenizer that cannot be loaded; :class:`lit_sft.data.tokenize.RowError`: a malformed row) is reported as
    jsonargparse reports a bad argument: ``error: <message>`` on stderr and exit status 2, no traceback
    (``JSONARGPARSE_DEBUG=true`` raises instead, with the traceback); so is any ``ValueError``, ``TypeError``,
    ``OSError`` or Lightning ``MisconfigurationException`` raised before training starts (a bad Trainer setting,
    path or checkpoint), with its type named. A run stopped by the non-finite guard
    (:class:`lit_sft.guard.NonFiniteError`) ends the same way with exit status 1; other errors during training
    keep their traceback.
    """
    deepspeed_logs_to_stderr()
    # a command gets its arguments from this function while sys.argv also holds them: LightningCLI's warning about
    # that is meant for calls from Python, not for the console script
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    from lit_sft.commands import COMMANDS, run_command

    argv = list(sys.argv[1:] if args is None else args)
    RunConfigCallback.training_started = False
    try:
        if argv and argv[0] in COMMANDS:
            run_command(argv[0], argv[1:])
            return
        fit = {"description": "Train: the recipe's loop (SFTModule on SFTDataModule), checkpoints, and the Hugging "
                              "Face export at the end. Every key below can also be set in a --config file or as the "
                              "environment variable after ENV:."}
        SFTCLI(SFTModule, SFTDataModule, args=args, save_config_kwargs={"overwrite": True},
               auto_configure_optimizers=False,
               parser_kwargs={"prog": "lit_sft", "description": overview(COMMANDS, SFTCLI.subcommands()), "fit": fit,
                              "validate": {"description": "Evaluate a checkpoint (--ckpt_path) or an exported folder "
                                                          "(--model.model_name_or_path): the evaluation loss (token "
                                                          "mean, all ranks) and token accuracy of a split."}})
    except Exception as err:  # noqa: BLE001 - sorted below; anything else is re-raised with its traceback
        if os.environ.get("JSONARGPARSE_DEBUG", "").lower() == "true" or not _is_reported(err):
            raise
        sys.stderr.write(f"error: {_one_line(err)}\n")
        raise SystemExit(1 if isinstance(err, NonFiniteError) else 2) from err


def _is_reported(err: Exception) -> bool:
    """Whether ``main`` reports ``err`` as one ``error:`` line: lit_sft's input errors and the guard's stop always;
    a ``ValueError``, ``TypeError``, ``OSError`` or Lightning ``MisconfigurationException`` only before training
    started (a bad setting, path or checkpoint found while the run is set up)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(err, (InputError, RowError, NonFiniteError)):
        return True
    return not RunConfigCallback.training_started and isinstance(
        err, (ValueError, TypeError, OSError, MisconfigurationException))


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, (InputError, RowError, NonFiniteError)):
        return text
    return f"{text} ({type(err).__name__}; JSONARGPARSE_DEBUG=true shows the traceback)"


if __name__ == "__main__":
    main()
