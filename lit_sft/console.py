"""What a run prints: the known messages of our dependencies that tell a lit_sft user nothing, silenced one by one.

Each is matched by its own logger (or warning module) and its own text; everything else these libraries log or warn
still shows. :func:`quiet_known_noise` runs when ``lit_sft`` is imported, before any ``Trainer`` exists.

* Lightning's adverts: ``💡 Tip: ... litlogger`` / ``litmodels`` (``rank_zero_info`` at every ``Trainer()``; Lightning
  has no option for them).
* DeepSpeed's ``Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.``
  (a warning of its ``DeepSpeed`` logger on every machine without CUDA, when ``deepspeed`` is imported).
* torch's ``isinstance(treespec, LeafSpec)`` deprecation, triggered inside Lightning 2.6
  (``lightning.pytorch.utilities._pytree``), not by lit_sft.

The CLI also keeps transformers' and datasets' loggers at ``warning`` unless ``run.log_level: debug`` (at ``info``
transformers prints every configuration it builds, saves or loads) and, on a resume, drops ModelCheckpoint's
"Checkpoint directory ... exists and is not empty" (the run resumes from that very folder).
"""

from __future__ import annotations

import logging
import warnings

_ADVERT_PREFIX = "💡 Tip:"
_DEEPSPEED_CPU = "Setting accelerator to CPU"


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _add_once(logger_name: str, log_filter: _DropMessages) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessages) and f.prefixes == log_filter.prefixes for f in logger.filters):
        logger.addFilter(log_filter)


def quiet_known_noise() -> None:
    """Install the filters described in the module docstring (idempotent)."""
    _add_once("lightning.pytorch.utilities.rank_zero", _DropMessages(_ADVERT_PREFIX))
    _add_once("lightning.fabric.utilities.rank_zero", _DropMessages(_ADVERT_PREFIX))
    # DeepSpeed creates its "DeepSpeed" logger with logging.getLogger, so a filter added now stays on it
    _add_once("DeepSpeed", _DropMessages(_DEEPSPEED_CPU))
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")


def quiet_resumed_checkpoint_dir() -> None:
    """Drop ModelCheckpoint's "Checkpoint directory ... exists and is not empty" warning (call it only when the run
    resumes from a checkpoint of that directory)."""
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
