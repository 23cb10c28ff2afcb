"""lit_sft's own commands next to LightningCLI's ``fit``: ``lit_sft export`` (Hugging Face folder from a checkpoint).

``lit_sft fit`` runs a Trainer loop through LightningCLI. A command here works around a run without one: it reads
the same config as ``fit`` (``--config`` files as ``fit --print_config`` prints them or as the run saved them in
``output_dir/logs/config.yaml``, overlays, dotted flags; ``trainer:`` and ``ckpt_path`` are accepted) plus its own
arguments, and builds only what it needs (never a Trainer, so a config for 8 GPUs works on a laptop).
``lit_sft COMMAND --help`` shows every key; ``--print_config`` works as for ``fit``.

A new command (``preview``, ``chat``, ...) is one entry in :data:`COMMANDS`: a function whose first argument is the
parsed config (a jsonargparse ``Namespace`` with ``model``, ``data``, ``run``, ``trainer``) and whose other
arguments, typed and documented, are the command's own keys (jsonargparse reads the signature and the docstring).
``validate`` belongs to LightningCLI's own subcommands instead (it is a Trainer loop).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

from lightning.pytorch import Trainer

from lit_sft.cli import SFTCLI, latest_checkpoint
from lit_sft.data.datamodule import SFTDataModule
from lit_sft.module import SFTModule

_FIT_ONLY = {"model", "train_dataloaders", "val_dataloaders", "datamodule"}


def export(config: Any, ckpt_path: Optional[str] = None) -> None:
    """Write the Hugging Face folder to ``run.output_dir`` from a checkpoint, as the end of training does.

    Args:
        config: the run's config (model, data, run keys).
        ckpt_path: a ``step-NNNNNN.ckpt`` file or DeepSpeed checkpoint folder; default: the newest complete
            checkpoint in ``run.output_dir/checkpoints``.

    Raises:
        FileNotFoundError: no checkpoint given and none in ``run.output_dir/checkpoints``.
    """
    from lit_sft.data.loading import load_tokenizer
    from lit_sft.export import export_checkpoint

    run, data = config.run, config.data
    ckpt = ckpt_path or latest_checkpoint(run.output_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {run.output_dir!r}/checkpoints: pass --ckpt_path or the "
                                "run.output_dir the run wrote")
    tokenizer = load_tokenizer(data.tokenizer_name_or_path, data.tokenizer_revision, data.chat_template,
                               data.eos_token)
    export_checkpoint(ckpt, run.output_dir, config.model.as_dict(), tokenizer, data.as_dict(), run.export_dtype,
                      run.export_format, run.merge_adapter)


COMMANDS: dict[str, Callable[..., None]] = {"export": export}


def commands_help() -> str:
    """One line per command, for ``lit_sft --help``."""
    lines = [f"{name}: {inspect.getdoc(fn).splitlines()[0].rstrip('.')}" for name, fn in COMMANDS.items()]
    return "lit_sft's own commands (lit_sft COMMAND --help): " + "; ".join(lines)


class CommandCLI(SFTCLI):
    """The ``fit`` config schema (``SFTCLI`` without a subcommand), plus ``fit``'s ``ckpt_path``/``weights_only`` and
    the command's own arguments; parses, and instantiates nothing (the command builds what it needs)."""

    def __init__(self, name: str, args: list[str]) -> None:
        self.command = COMMANDS[name]
        doc = inspect.getdoc(self.command).split("\n\n")[0]
        super().__init__(SFTModule, SFTDataModule, args=args, run=False, save_config_callback=None,
                         auto_configure_optimizers=False,
                         parser_kwargs={"prog": f"lit_sft {name}", "description": doc, "allow_abbrev": False})

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        own = set(inspect.signature(self.command).parameters) - {"config"}
        parser.add_method_arguments(Trainer, "fit", skip=_FIT_ONLY | own)  # so that a fit config loads as it is
        if own:
            parser.add_function_arguments(self.command, skip={"config"}, as_group=False)

    def instantiate_classes(self) -> None:
        self.config_init, self.model, self.datamodule, self.trainer = None, None, None, None

    def run_command(self) -> None:
        own = [p for p in inspect.signature(self.command).parameters if p != "config"]
        self.command(self.config, **{key: self.config.get(key) for key in own})


def run_command(name: str, args: list[str]) -> None:
    """``lit_sft NAME ARGS``: parse ``ARGS`` with the ``fit`` schema plus the command's arguments, then run it."""
    CommandCLI(name, args).run_command()
