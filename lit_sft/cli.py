"""``lit_sft`` command line: LightningCLI over ``SFTModule`` and ``SFTDataModule`` plus the run-level recipe keys.

``model:`` and ``data:`` are the two classes' ``__init__`` signatures; ``trainer:`` is Lightning's ``Trainer``; the
top-level keys below (output, checkpoints, hub, loggers) are the recipe's run keys, turned into Trainer callbacks and
loggers here. A rerun with the same ``output_dir`` resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Literal, Optional

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lit_sft.data.datamodule import SFTDataModule
from lit_sft.data.tokenize import RowError
from lit_sft.checkpoint import SFTCheckpoint
from lit_sft.export import HFExport
from lit_sft.loggers import build_loggers
from lit_sft.module import SFTModule
from lit_sft.validation import InputError, check_ranges

CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"step-(\d+)\.ckpt$")


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """Newest complete checkpoint in ``output_dir/checkpoints`` (``step-NNNNNN.ckpt``, a file or, under DeepSpeed,
    a folder that DeepSpeed finished writing, i.e. holds its ``latest`` file); ``None`` if there is none."""
    folder = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return None
    found = sorted(((int(m.group(1)), name) for name in os.listdir(folder) if (m := _STEP_RE.search(name))),
                   reverse=True)
    for _, name in found:
        path = os.path.join(folder, name)
        if os.path.isfile(path) or os.path.isfile(os.path.join(path, "latest")):
            return path
    return None


def run_args(
    output_dir: str = "outputs/lit_sft",
    overwrite_output_dir: bool = False,
    resume_from_checkpoint: Optional[str] = "auto",
    save_strategy: Literal["steps", "epoch", "no"] = "steps",
    save_steps: int = 100,
    save_total_limit: Optional[int] = 1,
    push_to_hub: bool = False,
    hub_model_id: Optional[str] = None,
    hub_strategy: Literal["every_save", "end"] = "every_save",
    hub_private_repo: Optional[bool] = None,
    report_to: list[Literal["wandb", "csv", "tensorboard", "none"]] = ["csv"],
    run_name: Optional[str] = None,
    wandb_project: str = "lit_sft",
    log_level: Literal["debug", "info", "warning", "error"] = "info",
    export_dtype: Optional[Literal["bfloat16", "float16", "float32"]] = None,
) -> None:
    """Run-level keys of the recipe (their names follow transformers' ``TrainingArguments``).

    Args:
        output_dir: checkpoints go to ``output_dir/checkpoints``, logs to ``output_dir/logs``, and the final Hugging
            Face model to ``output_dir`` itself.
        overwrite_output_dir: allow a fresh run (nothing to resume) to write a model into an ``output_dir`` that
            already holds one; without it such a run stops before training. A run that resumes always writes. Never
            deletes checkpoints.
        resume_from_checkpoint: ``auto`` resumes from the newest checkpoint in ``output_dir`` if any (as open-r1's
            ``sft.py``); a path resumes from that checkpoint; ``null`` starts fresh.
        save_strategy: checkpoint every ``save_steps`` optimizer steps (``steps``), every epoch, or never.
        save_steps: optimizer steps between checkpoints (recipe: 100).
        save_total_limit: checkpoints kept, newest first (recipe: 1); an old one is deleted only after the new one
            is written. ``null`` keeps all.
        push_to_hub, hub_model_id, hub_strategy, hub_private_repo: upload the exported model with huggingface_hub
            (``every_save``: at every checkpoint and at the end; ``end``: once). A failed upload only warns.
        report_to: loggers (recipe: ``wandb``; ``WANDB_MODE=offline`` works without network), ``csv``,
            ``tensorboard``, or ``none``.
        run_name: the run's name in the loggers.
        wandb_project: the wandb project.
        log_level: level of the ``lit_sft``, ``transformers`` and ``lightning`` Python loggers.
        export_dtype: cast the exported weights; default: the training dtype.
    """


def check_run_args(run: dict[str, Any]) -> None:
    """Check the ``run:`` keys before anything is built (ranges: :data:`lit_sft.validation.RANGES`).

    Raises:
        InputError: names the key, the value and the valid range.
    """
    check_ranges("run", run)


class SFTCLI(LightningCLI):
    """LightningCLI with the recipe's run keys at the top level (see :func:`run_args`)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_function_arguments(run_args, nested_key="run")
        parser.set_defaults({"trainer.use_distributed_sampler": False})

    def _run(self) -> dict[str, Any]:
        return dict(self.config[self.subcommand]["run"]) if self.subcommand else dict(self.config["run"])

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_run_args(dict(config.run))
        if config.data.tokenizer_name_or_path is None:
            config.data.tokenizer_name_or_path = config.model.model_name_or_path
        level = getattr(logging, config.run.log_level.upper())
        for name in ("lit_sft", "transformers", "lightning.pytorch"):
            logging.getLogger(name).setLevel(level)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        args = self._run()
        out = args["output_dir"]
        callbacks = list(kwargs.pop("callbacks", None) or self._get(self.config_init, "trainer.callbacks") or [])
        if args["save_strategy"] != "no":
            steps = args["save_strategy"] == "steps"
            every = {"every_n_train_steps": args["save_steps"]} if steps else {"every_n_epochs": 1}
            limit = args["save_total_limit"]
            callbacks.append(SFTCheckpoint(
                dirpath=os.path.join(out, CHECKPOINT_DIR), filename="step-{step:06d}", auto_insert_metric_name=False,
                monitor="step", mode="max", save_top_k=-1 if limit is None else limit, **every))
        else:
            kwargs["enable_checkpointing"] = False
        callbacks.append(HFExport(out, args["push_to_hub"], args["hub_model_id"], args["hub_strategy"],
                                  args["hub_private_repo"], args["save_steps"], args["export_dtype"]))
        kwargs["callbacks"] = callbacks
        kwargs.setdefault("default_root_dir", out)
        if self._get(self.config_init, "trainer.logger") in (None, True):
            resume = self.resume_checkpoint()
            match = _STEP_RE.search(resume or "")
            loggers = build_loggers(args["report_to"], out, args["run_name"], args["wandb_project"],
                                    int(match.group(1)) if match else None)
            kwargs["logger"] = loggers or False
        return super().instantiate_trainer(**kwargs)

    def resume_checkpoint(self) -> Optional[str]:
        """The checkpoint this ``fit`` resumes from: ``ckpt_path`` if given, else per ``run.resume_from_checkpoint``
        (``auto``: the newest complete one in ``output_dir/checkpoints``)."""
        if self.subcommand != "fit":
            return None
        args = self._run()
        given = self.config[self.subcommand].get("ckpt_path")
        if given or not args["resume_from_checkpoint"]:
            return given
        if args["resume_from_checkpoint"] == "auto":
            return latest_checkpoint(args["output_dir"])
        return args["resume_from_checkpoint"]

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only ``fit``: SFTModule defines no test or predict step, and evaluation runs inside ``fit``."""
        return {"fit": LightningCLI.subcommands()["fit"]}

    def before_fit(self) -> None:
        args, fit = self._run(), self.config_init["fit"]
        out = args["output_dir"]
        trainer = self.trainer
        if trainer.accumulate_grad_batches != 1:
            raise ValueError("trainer.accumulate_grad_batches must stay 1: set data.gradient_accumulation_steps "
                             "(lit_sft plans whole optimizer steps)")
        if trainer.gradient_clip_val:
            raise ValueError("trainer.gradient_clip_val is not used by lit_sft: set model.max_grad_norm")
        if args["save_strategy"] == "steps" and args["save_steps"] < 1:
            raise ValueError(f"run.save_steps={args['save_steps']} must be >= 1 with run.save_strategy: steps")
        if fit.get("ckpt_path") is None:
            ckpt = self.resume_checkpoint()
            if ckpt:
                rank_zero_info(f"Checkpoint detected, resuming training at {ckpt}")
                fit["ckpt_path"] = ckpt
        if (fit.get("ckpt_path") is None and os.path.isfile(os.path.join(out, "model.safetensors"))
                and not args["overwrite_output_dir"]):
            raise FileExistsError(f"run.output_dir={out!r} already holds a trained model and no checkpoint to resume "
                                  "from; set run.overwrite_output_dir: true or choose another output_dir")


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``lit_sft`` console script.

    Input the user must fix (:class:`lit_sft.validation.InputError`: a config value out of range, a data file or
    tokenizer that cannot be loaded; :class:`lit_sft.data.tokenize.RowError`: a malformed row) is reported as
    jsonargparse reports a bad argument: ``error: <message>`` on stderr and exit status 2, no traceback
    (``JSONARGPARSE_DEBUG=true`` raises instead, with the traceback).
    """
    try:
        SFTCLI(SFTModule, SFTDataModule, args=args, save_config_kwargs={"overwrite": True},
               auto_configure_optimizers=False, parser_kwargs={"allow_abbrev": False})
    except (InputError, RowError) as err:
        if os.environ.get("JSONARGPARSE_DEBUG", "").lower() == "true":  # jsonargparse's own debug switch
            raise
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
