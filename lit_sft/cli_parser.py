"""The ``lit_sft`` argument parser: LightningCLI's parser with one-line errors, file names in YAML errors,
``LIT_SFT_*`` environment variables for every key, and the overview that ``lit_sft --help`` prints.

Environment variables (jsonargparse's ``default_env``): every key of ``lit_sft fit`` can be set as
``LIT_SFT_FIT__<KEY>``, the dotted key upper-cased with ``.`` written ``__``, e.g.
``LIT_SFT_FIT__MODEL__LEARNING_RATE=1e-5`` or ``LIT_SFT_FIT__TRAINER__NUM_NODES=2``; ``LIT_SFT_FIT__CONFIG`` names a
config file. They take the place of the defaults: a ``--config`` file and the command line override them (in that
order). ``lit_sft fit --help`` prints each key's variable after ``ENV:``. A command of ``lit_sft/commands.py`` reads
``LIT_SFT_<KEY>`` (no subcommand part).
"""

from __future__ import annotations

import argparse
import contextvars
import difflib
import os
import re
import sys
from typing import Any, Iterable, NoReturn, Optional

from jsonargparse import DefaultHelpFormatter
from jsonargparse._formatters import get_env_var
from lightning.pytorch.cli import LightningArgumentParser

ENV_PREFIX = "LIT_SFT"

# The README's two commands for a fresh machine, repeated in ``lit_sft --help``.
README_COMMANDS = (
    "bash scripts/setup.sh && .venv/bin/lit_sft fit --config configs/tiny_cpu.yaml   # train the embedded default",
    "bash scripts/setup.sh && .venv/bin/python -m pytest -q                           # run the tests",
)

_CONFIG_FILE: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("lit_sft_config_file", default=None)
_OPTION_RE = re.compile(r"unrecognized arguments: (-{1,2}[\w.\-]+)|Group '([\w.\-]+)' does not accept option "
                        r"'([\w.\-]+)'|does not accept option '([\w.\-]+)'|[Kk]ey '([\w.\-]+)' is not expected")


class SFTHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter (types, defaults, ``ENV:`` names) that keeps the line breaks of descriptions."""

    _fill_text = argparse.RawDescriptionHelpFormatter._fill_text


def close_option(message: str, options: Iterable[str]) -> Optional[str]:
    """The known key closest to the one a parse error names (``model.learning_rat`` -> ``model.learning_rate``),
    or ``None``. ``options`` are the parser's option strings (``--model.learning_rate``, ...)."""
    match = _OPTION_RE.search(message)
    if match is None:
        return None
    flag, group, in_group, option, key = match.groups()
    given = (flag or "").lstrip("-") or (f"{group}.{in_group}" if group else option or key)
    keys = sorted({opt.lstrip("-") for opt in options if opt.startswith("--")})
    found = difflib.get_close_matches(given, keys, n=1, cutoff=0.75)
    return found[0] if found and found[0] != given else None


class SFTArgumentParser(LightningArgumentParser):
    """LightningCLI's parser for ``lit_sft``.

    * An error prints one line (``error: ...``), the closest known key when the error names an unknown one, and a
      pointer to ``--help``, instead of the full usage (some 100 lines for ``fit``) before the line that matters.
      ``JSONARGPARSE_DEBUG=true`` raises instead, with the traceback (jsonargparse's own switch).
    * A YAML error in a config file names the file (PyYAML reads files here from a string, so its message says
      ``<unicode string>``).
    * Environment variables for every key (``LIT_SFT_FIT__MODEL__LEARNING_RATE``, see the module docstring).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("env_prefix", ENV_PREFIX)
        kwargs.setdefault("default_env", True)
        kwargs.setdefault("formatter_class", SFTHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_path(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        """jsonargparse's ``parse_path``; remembers the file so that a YAML error can name it."""
        token = _CONFIG_FILE.set(str(path))
        try:
            return super().parse_path(path, *args, **kwargs)
        except argparse.ArgumentError as err:  # raised (not exited) when nested in another parse
            if "<unicode string>" in str(err):
                raise argparse.ArgumentError(None, str(err).replace("<unicode string>", str(path))) from err
            raise
        finally:
            _CONFIG_FILE.reset(token)

    def parse_args(self, *args: Any, **kwargs: Any) -> Any:
        """jsonargparse's ``parse_args``, after checking that every ``LIT_SFT_<COMMAND>__*`` environment variable
        names a key (a misspelled one was ignored silently). Exits with :meth:`error` naming it and the closest."""
        for sub in _subcommand_parsers(self):
            prefix = get_env_var(sub)  # LIT_SFT_FIT__
            known = {get_env_var(sub, action) for action in sub._actions}
            for name in sorted(n for n in os.environ if n.startswith(prefix) and n not in known):
                close = difflib.get_close_matches(name, sorted(known), n=1)
                self.error(f"environment variable {name} is not a key of `{sub.prog.replace(' [options]', '')}`"
                           + (f"; did you mean {close[0]}?" if close else ""))
        return super().parse_args(*args, **kwargs)

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        """Print ``error: <message>`` (plus the closest key and a pointer to ``--help``) and exit with status 2."""
        named = re.search(r"Unable to load config '([^']+)'", message)  # a section file: --model model.yaml
        path = _CONFIG_FILE.get() or (named.group(1) if named else None)
        if path is not None:
            message = message.replace("<unicode string>", path)
        if not self.exit_on_error or _debug_mode():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        suggestion = None
        for candidate in [parser, *_subcommand_parsers(parser)]:  # a config file's key is checked by the main parser
            suggestion = close_option(message, [opt for action in candidate._actions for opt in action.option_strings])
            if suggestion:
                parser = candidate
                break
        lines = [f"error: {message}"]
        if suggestion:
            lines.append(f"Did you mean {suggestion}?")
        prog = parser.prog.replace(" [options]", "")
        lines.append(f"Run `{prog} --help` for every key, with its help and environment variable.")
        sys.stderr.write("\n".join(lines) + "\n")
        self.exit(2)


def _subcommand_parsers(parser: Any) -> list[Any]:
    """The parsers of ``parser``'s subcommands (``fit``, ...), if it has any."""
    return [sub for action in parser._actions if isinstance(getattr(action, "choices", None), dict)
            for sub in action.choices.values() if isinstance(sub, argparse.ArgumentParser)]


def _debug_mode() -> bool:
    from jsonargparse._common import debug_mode_active

    return debug_mode_active()


def overview(commands: dict[str, Any], subcommands: Iterable[str]) -> str:
    """The description ``lit_sft --help`` prints: what lit_sft is, every command, the README's commands."""
    import inspect

    def first_line(fn: Any) -> str:
        doc = inspect.getdoc(fn) or ""
        return doc.splitlines()[0].rstrip(".").replace("``", "") if doc else ""

    from lightning.pytorch import Trainer

    rows = [(name, first_line(getattr(Trainer, name))) for name in subcommands]
    rows += [(name, first_line(fn)) for name, fn in commands.items() if name not in subcommands]
    ours = {"fit": "train: the recipe's loop (LightningCLI + SFTModule + SFTDataModule), then the Hugging Face export",
            "validate": "evaluation loss (token mean, all ranks) and token accuracy of a checkpoint or an export"}
    rows = [(name, ours.get(name, text)) for name, text in rows]
    width = max(len(name) for name, _ in rows)
    listing = "\n".join(f"  {name.ljust(width)}  {text}" for name, text in rows)
    return (
        "lit_sft: supervised fine-tuning (SFT) of causal language models on PyTorch Lightning. It reproduces\n"
        "open-r1's recipe (Qwen2.5-1.5B-Instruct on OpenR1-Math-220k, DeepSpeed ZeRO-3) with an exact token-mean\n"
        "loss, and writes a Hugging Face model folder.\n\n"
        f"Commands (lit_sft COMMAND --help shows every key of a command):\n{listing}\n\n"
        "Examples:\n"
        "  lit_sft fit --config configs/tiny_cpu.yaml      # tiny model on CPU, a few minutes, no hub access\n"
        "  lit_sft fit --config configs/qwen_zero3.yaml    # the open-r1 recipe, 8 GPUs\n"
        "  lit_sft fit --recipe config_demo.yaml --accelerate_config zero3.yaml   # open-r1's own files\n"
        "  LIT_SFT_FIT__MODEL__LEARNING_RATE=1e-5 lit_sft fit --config ...       # any key from the environment\n\n"
        "On a fresh machine (README):\n" + "\n".join(f"  {line}" for line in README_COMMANDS)
    )
