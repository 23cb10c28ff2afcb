"""Up-front checks of user input: the valid range of every numeric config key, rows against the model's position
limit, and the error type for bad input.

Every ``int`` / ``float`` parameter of ``SFTModule.__init__`` (config section ``model:``), ``SFTDataModule.__init__``
(``data:``) and :func:`lit_sft.cli.run_args` (``run:``) has its valid range declared in :data:`RANGES` and checked
by :func:`check_ranges` before anything is loaded or tokenized, so a bad value fails at once with the key named
(``data.max_length=-5 is out of range: must be >= 1 ...``) instead of training on silently wrong settings.

Adding a numeric key: add ONE line to the section's dict below, e.g. ``"eval_steps": at_least(1),`` (or
``between(0, 1)``, ``greater_than(0)``, with an optional ``hint=`` saying what the value means). ``None`` always
passes (it means "off" / "default" for ``Optional`` keys). ``tests/test_validation.py`` reads the three signatures
and fails for any numeric parameter without a declared range, then feeds each key an out-of-range value and checks
that the error names the key, so a forgotten key is caught by the tests, not by a user.

:func:`check_fits_model` compares ``data.max_length`` and the tokenized rows with the model's
``max_position_embeddings`` (:func:`model_max_positions`, read from the config without building the model).

:class:`InputError` is the exception for input a user must fix (a config value, a data file, a tokenizer folder);
the ``lit_sft`` CLI prints its message as ``error: ...`` without a traceback (``lit_sft/cli.py: main``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional


class InputError(ValueError):
    """Input the user must fix: the message names the config key, file, line or row, the bad value, and the fix."""


class InputNotFoundError(InputError, FileNotFoundError):
    """A file or folder named in the config does not exist (also a ``FileNotFoundError``)."""


@dataclass(frozen=True)
class Range:
    """A closed or open interval; ``None`` bounds are unbounded. Floats must also be finite (no ``nan``/``inf``)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""
    words: tuple[str, ...] = ()  # string values the key also accepts (``gradient_checkpointing_layers: auto``)

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low!r}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high!r}")
        return " and ".join(parts) or "finite"

    def out_of_range_example(self) -> float:
        """A value just outside the range (the tests feed it to each key)."""
        if self.low is not None:
            return self.low if self.low_open else self.low - 1
        if self.high is not None:
            return self.high if self.high_open else self.high + 1
        return float("nan")


def at_least(low: float, hint: str = "", words: tuple[str, ...] = ()) -> Range:
    return Range(low=low, hint=hint, words=words)


def greater_than(low: float, hint: str = "") -> Range:
    return Range(low=low, low_open=True, hint=hint)


def between(low: float, high: float, low_open: bool = False, high_open: bool = False, hint: str = "") -> Range:
    return Range(low, high, low_open, high_open, hint)


# Lightning's seed_everything and numpy accept seeds in [0, 2**32 - 1].
_SEED = between(0, 2**32 - 1, hint="a uint32 seed, as numpy and Lightning's seed_everything accept")

RANGES: dict[str, dict[str, Range]] = {
    "model": {  # SFTModule.__init__
        "learning_rate": greater_than(0, hint="the peak AdamW learning rate (recipe: 5e-5)"),
        "warmup_ratio": between(0, 1, hint="a share of the optimizer steps"),
        "weight_decay": at_least(0),
        "adam_beta1": between(0, 1, high_open=True, hint="torch.optim.AdamW needs 0 <= beta < 1"),
        "adam_beta2": between(0, 1, high_open=True, hint="torch.optim.AdamW needs 0 <= beta < 1"),
        "adam_epsilon": greater_than(0, hint="0 divides by zero where a gradient is 0"),
        "max_grad_norm": at_least(0, hint="0 or null: no clipping; a negative norm flips the gradient"),
        "loss_chunk_size": at_least(1, hint="positions per chunk of the cross-entropy"),
        "mfu_peak_tflops": greater_than(0, hint="null: the device's datasheet peak"),
        "gradient_checkpointing_layers": at_least(0, words=("all", "auto"),
                                                  hint="decoder layers that recompute; all, auto or a count"),
        "max_nonfinite_steps": at_least(0, hint="0: stop at the first non-finite loss or gradient norm"),
    },
    "data": {  # SFTDataModule.__init__
        "max_length": at_least(1, hint="tokens per row; null keeps rows whole"),
        "per_device_train_batch_size": at_least(1),
        "per_device_eval_batch_size": at_least(1),
        "gradient_accumulation_steps": at_least(1),
        "max_tokens_per_micro_batch": at_least(1),
        "dataset_num_proc": at_least(1, hint="null: tokenize in this process"),
        "num_workers": at_least(0, hint="0: load batches in the training process"),
        "seed": _SEED,
        "max_train_samples": at_least(1, hint="null: all rows"),
        "pad_to_multiple_of": at_least(1, hint="null: pad to the longest row"),
        "test_split_size": between(0, 1, low_open=True, high_open=True,
                                   hint="the share of the training split held out for evaluation"),
    },
    "run": {  # lit_sft.cli.run_args
        "save_steps": at_least(1, hint="optimizer steps between checkpoints"),
        "save_total_limit": at_least(1, hint="null keeps every checkpoint; 0 would keep none"),
        "eval_steps": at_least(1, hint="optimizer steps between evaluations; null: logging_steps"),
    },
}


def check_ranges(section: str, values: Mapping[str, Any]) -> None:
    """Check every declared key of ``section`` (``model``, ``data`` or ``run``) found in ``values``.

    Call it first thing in an ``__init__`` as ``check_ranges("data", locals())``: keys without a declared range
    (strings, bools, dicts, ``self``) are ignored, ``None`` passes, ``bool`` values are not numbers here.

    Raises:
        InputError: ``<section>.<key>=<value> is out of range: must be <range> (<hint>)``, or a non-number value.
    """
    for key, valid in RANGES[section].items():
        if key not in values or values[key] is None:
            continue
        value = values[key]
        if isinstance(value, str) and value in valid.words:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            also = f" or one of {list(valid.words)}" if valid.words else ""
            raise InputError(f"{section}.{key}={value!r} must be a number{also}")
        if not valid.contains(value):
            hint = f" ({valid.hint})" if valid.hint else ""
            raise InputError(f"{section}.{key}={value!r} is out of range: must be {valid.describe()}{hint}")


def model_max_positions(trainer: Any) -> Optional[int]:
    """``max_position_embeddings`` of the trainer's model, read from its config without building the model.

    The data module learns the model's limit at ``setup`` (both are attached to the trainer by then: the CLI links
    them, a library user passes both to ``Trainer.fit``). Reads the built model's config if there is one, else the
    ``SFTModule`` hyper-parameters (``model_name_or_path``, ``model_revision``, ``model_config``) through
    :func:`lit_sft.modeling.load_config`.

    Returns:
        The limit, or ``None`` when unknown (no trainer, or a module without those hyper-parameters).

    Raises:
        InputNotFoundError, InputError: ``model.model_name_or_path`` is a missing folder or has no readable config.
    """
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    if module is None:
        return None
    config = getattr(getattr(module, "model", None), "config", None)
    if config is None:
        hp = getattr(module, "hparams", None) or {}
        if hp.get("model_name_or_path") is None and not (hp.get("model_config") or {}).get("model_type"):
            return None
        from lit_sft.data.loading import check_local_path
        from lit_sft.modeling import load_config

        name = hp.get("model_name_or_path")
        if name is not None:
            path = check_local_path(name, "model.model_name_or_path", "config.json")
            if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
                raise InputError(f"model.model_name_or_path={name!r}: the folder has no config.json (a Hugging Face "
                                 "model folder, as save_pretrained writes it, holds one)")
        transformers_log = logging.getLogger("transformers")
        level = transformers_log.level
        transformers_log.setLevel(max(level, logging.WARNING))  # no second "Model config ..." dump: the build logs it
        try:
            config = load_config(name, hp.get("model_revision"), hp.get("model_config"))
        except OSError as err:  # transformers: no config.json in the folder, or not on the hub
            raise InputError(f"model.model_name_or_path={name!r}: cannot read the model's config.json "
                             f"({type(err).__name__}: {str(err).strip().splitlines()[0]})") from err
        finally:
            transformers_log.setLevel(level)
    return getattr(config, "max_position_embeddings", None)


def check_fits_model(max_length: Optional[int], limit: Optional[int], lengths: Optional[list[int]] = None,
                     split: str = "train", policy: str = "error", packing: bool = False) -> None:
    """Refuse rows longer than the model's position limit, before training (``data.longer_than_model``).

    Without ``lengths`` (before tokenization) it checks ``data.max_length`` against ``limit``; with the tokenized
    row ``lengths`` it checks the rows themselves (that matters with ``max_length: null``, and with ``packing``,
    where ``max_length`` is the packed length and positions restart at each row).

    Raises:
        InputError: with ``policy="error"``; names ``data.max_length``, the limit, the first and the longest row.
    """
    if limit is None:
        return
    if lengths is None:
        if packing or max_length is None or max_length <= limit:
            return
        problem = f"data.max_length={max_length} is longer than the model's max_position_embeddings={limit}"
    else:
        if max_length is not None and max_length <= limit:
            return
        over = [i for i, n in enumerate(lengths) if n > limit]
        if not over:
            return
        longest = max(over, key=lambda i: lengths[i])
        rows = f"row {over[0]} has {lengths[over[0]]} tokens"
        if longest != over[0]:
            rows += f"; the longest, row {longest}, has {lengths[longest]}"
        setting = "null" if max_length is None else max_length
        problem = (f"{split}: {len(over)} of {len(lengths)} rows are longer than the model's "
                   f"max_position_embeddings={limit} with data.max_length={setting} ({rows})")
    if policy == "warn":
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"{problem}; training anyway (data.longer_than_model: warn)")
        return
    raise InputError(f"{problem}: set data.max_length: {limit} (longer rows are cut, or dropped with "
                     "data.truncation: drop), or data.longer_than_model: warn for a model that handles longer inputs "
                     "(e.g. with RoPE scaling)")
