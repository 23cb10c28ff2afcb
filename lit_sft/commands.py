"""lit_sft's own commands next to LightningCLI's ``fit``: ``lit_sft export`` (Hugging Face folder from a checkpoint),
``lit_sft preview`` (the label inspector, ``lit_sft/preview.py``), ``lit_sft chat`` (``lit_sft/chat.py``).

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


def preview(config: Any, rows: int = 3, tokens: bool = False, color: Optional[bool] = None) -> None:
    """Show what a config trains on: rows with supervised tokens marked, the preprocessing report, lengths, the plan.

    The data module of ``data:`` tokenizes the training split (and the test split with ``data.do_eval``) exactly as
    ``fit`` does; see ``lit_sft/preview.py``. Written to standard output.

    Args:
        config: the run's config (``data:``, and ``trainer:`` for the device count and the run length).
        rows: training rows to print, the first ones kept.
        tokens: print every token as ``piece(label, id)`` (Axolotl's ``--debug`` format) instead of decoded spans.
        color: ANSI colours (supervised green, masked dimmed); default: when standard output is a terminal and
            ``NO_COLOR`` is unset; otherwise supervised spans are marked ``⟦...⟧``.

    Raises:
        InputError: ``rows`` < 0, before any tokenization.
    """
    import sys

    from lit_sft.preview import preview_text, use_color
    from lit_sft.validation import InputError

    if rows < 0:
        raise InputError(f"--rows={rows}: the number of training rows to print must be >= 0")
    datamodule = SFTDataModule(**config.data.as_dict())
    datamodule.setup("fit")
    trainer = config.trainer.as_dict() if config.get("trainer") is not None else {}
    sys.stdout.write(preview_text(datamodule, rows, use_color(color), tokens, trainer))
    sys.stdout.flush()


def chat(config: Any, prompt: Optional[str] = None, system: Optional[str] = None, max_new_tokens: int = 512,
         device: str = "auto", do_sample: Optional[bool] = None, stream: Optional[bool] = None,
         model_dir: Optional[str] = None, ckpt_path: Optional[str] = None) -> None:
    """Talk to the trained model with its chat template (one answer with --prompt, else a conversation).

    The model: ``--ckpt_path`` (a checkpoint, in the architecture of ``model:``, with ``data:``'s tokenizer), else
    ``--model_dir`` (a Hugging Face folder or hub id), else the run's export in ``run.output_dir``. Generation stops
    at the generation config's EOS (``<|im_end|>``) or after ``max_new_tokens``. See ``lit_sft/chat.py``.

    Args:
        config: the run's config (``run.output_dir``; ``model:`` and ``data:`` with ``--ckpt_path``).
        prompt: answer this one user message, print the answer and exit.
        system: a system message at the start of the conversation.
        max_new_tokens: the most tokens one answer may have.
        device: ``auto`` (the first GPU if any, else the CPU), ``cpu``, ``cuda``, ``cuda:1``, ...
        do_sample: sample (``true``) or decode greedily (``false``); default: the generation config's choice.
        stream: print the answer token by token; default: when standard output is a terminal.
        model_dir: a Hugging Face folder (an export) or hub id to chat with.
        ckpt_path: a ``step-NNNNNN.ckpt`` file or DeepSpeed checkpoint folder to chat with.

    Raises:
        FileNotFoundError: no model to chat with (none of the three given or found).
    """
    import sys

    from lit_sft.chat import Chat, default_model_dir, interactive, load_checkpoint, load_folder, resolve_device

    where = resolve_device(device)
    if ckpt_path:
        model, tokenizer = load_checkpoint(ckpt_path, config.model.as_dict(), config.data.as_dict())
    else:
        folder = model_dir or default_model_dir(config.run.output_dir)
        if folder is None:
            raise FileNotFoundError(f"no model to chat with: run.output_dir={config.run.output_dir!r} holds no "
                                    "exported model; pass --model_dir FOLDER, --ckpt_path CHECKPOINT, or the run's "
                                    "--config")
        model, tokenizer = load_folder(folder, where)
    session = Chat(model, tokenizer, system, max_new_tokens, do_sample, where)
    streamed = sys.stdout.isatty() if stream is None else stream
    if prompt is not None:
        answer = session.reply(prompt, sys.stdout if streamed else None)
        if not streamed:
            sys.stdout.write(answer + "\n")
        sys.stdout.flush()
        return
    interactive(session, streamed)


COMMANDS: dict[str, Callable[..., None]] = {"export": export, "preview": preview, "chat": chat}


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
