"""``lit_sft preview``: the label inspector. See what a config trains on before paying for GPUs.

For the training split of a config (the same config files and flags as ``fit``) it prints, as Axolotl's
``preprocess --debug`` does:

1. the first ``--rows`` training rows as their tokens, supervised spans visibly different from masked ones (green on a
   terminal, masked tokens dimmed; ``⟦...⟧`` around supervised spans when the output is piped or ``--color false``);
   ``--tokens true`` prints every token as ``piece(label, id)``, Axolotl's format, ``label`` -100 where masked;
2. the preprocessing report of every split (:mod:`lit_sft.data.report`: rows, truncated, dropped and why, with an
   example row);
3. the length distribution of the kept rows against ``data.max_length`` and the micro-batch token budget
   (``data.max_tokens_per_micro_batch``);
4. the optimizer-step plan (:func:`lit_sft.data.sampler.plan_epoch`, the planner training uses): steps per epoch, rows
   per step, micro-batches and tokens per micro-batch, supervised tokens per step (``num_items_in_batch``).

The rows, labels and report are the data module's own: :class:`lit_sft.data.datamodule.SFTDataModule` is built from
``data:`` and tokenizes the split exactly as ``fit`` does (the same cached ``datasets`` map), and the rows shown are
its ``train_rows``; nothing here re-implements tokenization or masking.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
from typing import Any, Optional

from lit_sft.data.report import report_lines
from lit_sft.data.tokenize import IGNORE_INDEX

OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧ around supervised spans in plain output: rare in real text
_GREEN, _DIM, _RESET = "\033[1;32m", "\033[2m", "\033[0m"


def use_color(color: Optional[bool] = None) -> bool:
    """``color`` if given, else whether standard output is a terminal and ``NO_COLOR`` is unset (no-color.org)."""
    if color is not None:
        return color
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def label_spans(input_ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Consecutive runs of supervised (``labels[i] != IGNORE_INDEX``) and masked tokens: ``[(supervised, ids)]``."""
    spans: list[tuple[bool, list[int]]] = []
    for token, label in zip(input_ids, labels):
        supervised = label != IGNORE_INDEX
        if spans and spans[-1][0] == supervised:
            spans[-1][1].append(token)
        else:
            spans.append((supervised, [token]))
    return spans


def render_row(tokenizer: Any, input_ids: list[int], labels: list[int], color: bool = False,
               tokens: bool = False) -> str:
    """One tokenized row as text with its supervised spans marked (see the module docstring).

    Spans are decoded with ``tokenizer.decode`` (special tokens kept), so removing the marks gives the row's text.
    With ``tokens``, each token is ``piece(label, id)`` (Axolotl's ``--debug`` format; newlines shown as ``\\n``).
    """
    if tokens:
        parts = []
        for token, label in zip(input_ids, labels):
            piece = tokenizer.decode([token]).replace("\n", "\\n")
            text = f"{piece}({label}, {token})"
            if color:
                text = f"{_GREEN if label != IGNORE_INDEX else _DIM}{text}{_RESET}"
            parts.append(text)
        return " ".join(parts)
    out = []
    for supervised, ids in label_spans(input_ids, labels):
        text = tokenizer.decode(ids)
        if color:
            out.append(f"{_GREEN if supervised else _DIM}{text}{_RESET}")
        else:
            out.append(f"{OPEN}{text}{CLOSE}" if supervised else text)
    return "".join(out)


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def length_lines(lengths: list[int], max_length: Optional[int], budget: Optional[int], truncated: int = 0,
                 bins: int = 8) -> list[str]:
    """The length distribution of the kept rows: summary statistics, rows at ``max_length``, and a histogram of
    ``bins`` equal bins up to ``max_length`` (or the longest row) drawn with ``#``."""
    if not lengths:
        return ["no rows"]
    top = max_length or max(lengths)
    at_max = sum(n >= top for n in lengths) if max_length else 0
    lines = [f"rows {len(lengths)}, tokens {sum(lengths)}: min {min(lengths)}, mean {statistics.fmean(lengths):.1f}, "
             f"p50 {_percentile(lengths, 0.5)}, p90 {_percentile(lengths, 0.9)}, p99 {_percentile(lengths, 0.99)}, "
             f"max {max(lengths)}",
             f"max_length {max_length}: {at_max} row(s) at it ({truncated} truncated)" if max_length
             else "max_length: none (rows are not truncated)"]
    if budget:
        lines.append(f"token budget (max_tokens_per_micro_batch) {budget}: {budget / statistics.fmean(lengths):.1f} "
                     f"rows of mean length per micro-batch; the longest row takes {max(lengths) / budget:.0%} of it")
    width = math.ceil(top / bins)
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, max(0, n - 1) // width)] += 1
    scale = max(counts) or 1
    for b, count in enumerate(counts):
        low, high = b * width + 1, min(top, (b + 1) * width) if b < bins - 1 else max(top, max(lengths))
        lines.append(f"{low:>7}-{high:<7} {count:>7} {'#' * math.ceil(40 * count / scale) if count else ''}")
    return lines


def world_size(trainer: Any) -> tuple[int, Optional[str]]:
    """Data-parallel ranks of the config's ``trainer.devices`` x ``trainer.num_nodes``; with ``auto`` (or a device
    count only known on the machine) 1 and a note saying so."""
    trainer = trainer or {}
    devices, nodes = trainer.get("devices", "auto"), int(trainer.get("num_nodes", 1) or 1)
    if isinstance(devices, (list, tuple)):
        return len(devices) * nodes, None
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices * nodes, None
    return nodes, f"trainer.devices={devices!r} is resolved on the machine; planned for {nodes} rank(s): pass " \
                  "--trainer.devices N for the plan of N GPUs"


def plan_lines(datamodule: Any, ranks: int, epochs: Optional[int], max_steps: Optional[int]) -> list[str]:
    """The optimizer-step plan of epoch 0 (:func:`lit_sft.data.sampler.plan_epoch`, as the training sampler calls
    it) for ``ranks`` data-parallel ranks."""
    from lit_sft.data.sampler import plan_epoch

    hp = datamodule.hparams
    items = datamodule.train_packed if datamodule.train_packed is not None else datamodule.train_rows
    lengths = list(items["length"])
    plan = plan_epoch(items["num_loss_tokens"], hp.per_device_train_batch_size, hp.gradient_accumulation_steps,
                      ranks, hp.seed, 0, hp.shuffle, lengths, hp.max_tokens_per_micro_batch,
                      padded=not datamodule.padding_free)
    rows_per_step = hp.per_device_train_batch_size * hp.gradient_accumulation_steps * ranks
    per_rank = [len(step.micro_batches[0]) for step in plan]
    tokens, slots = [], []
    for step in plan:
        for rank in step.micro_batches:
            for mb in rank:
                if not mb.filler:
                    tokens.append(sum(lengths[r] for r in mb.rows))
                    slots.append(len(mb.rows) * max(lengths[r] for r in mb.rows))
    supervised = [step.num_items_in_batch for step in plan]
    unit = "packed sequences" if datamodule.train_packed is not None else "rows"
    if max_steps and max_steps > 0:
        total = f"trainer.max_steps {max_steps}"
    elif epochs is not None and epochs > 0:
        total = f"{len(plan) * epochs} over trainer.max_epochs {epochs}"
    else:
        total = "no trainer.max_steps / max_epochs given"
    layout = ("padding-free" if datamodule.padding_free else "padded") + (
        f", token budget {hp.max_tokens_per_micro_batch}" if hp.max_tokens_per_micro_batch else "")
    lines = [f"{ranks} rank(s); {rows_per_step} {unit} per optimizer step (per_device_train_batch_size "
             f"{hp.per_device_train_batch_size} x gradient_accumulation_steps {hp.gradient_accumulation_steps} x "
             f"{ranks} rank(s)); {len(items)} {unit}",
             f"optimizer steps per epoch: {len(plan)} (total: {total})",
             f"micro-batches per rank per step: {min(per_rank)}-{max(per_rank)} ({layout})",
             f"tokens per micro-batch: mean {statistics.fmean(tokens):.0f}, max {max(tokens)}"
             + ("" if datamodule.padding_free else
                f"; padded to the longest row: mean {statistics.fmean(slots):.0f} slots, "
                f"{1 - sum(tokens) / sum(slots):.1%} padding"),
             f"supervised tokens per step (num_items_in_batch): mean {statistics.fmean(supervised):.0f}, "
             f"min {min(supervised)}, max {max(supervised)}"]
    return lines


def preview_text(datamodule: Any, rows: int = 3, color: bool = False, tokens: bool = False,
                 trainer: Optional[dict] = None) -> str:
    """The whole preview of a set-up data module (``setup("fit")`` done) as one string.

    Args:
        datamodule: an :class:`lit_sft.data.datamodule.SFTDataModule` after ``setup``.
        rows: training rows to show (the first ones kept, in dataset order).
        color: ANSI colours instead of ``⟦...⟧`` marks.
        tokens: one ``piece(label, id)`` per token instead of decoded spans.
        trainer: the config's ``trainer:`` section (``devices``, ``num_nodes``, ``max_epochs``, ``max_steps``).
    """
    hp, tok = datamodule.hparams, datamodule.tokenizer
    train = datamodule.train_rows
    bold = (lambda s: f"\033[1m{s}{_RESET}") if color else (lambda s: s)
    legend = (f"{_GREEN}supervised{_RESET} / {_DIM}masked (-100){_RESET}" if color
              else f"{OPEN}supervised{CLOSE}, the rest masked (-100)")
    if tokens:
        legend = "each token as piece(label, id), label -100 where masked" + (f": {legend}" if color else "")
    out = [bold(f"== {min(rows, len(train))} of {len(train)} training rows ({legend}; "
                f"assistant_only_loss={hp.assistant_only_loss}) ==")]
    for i in range(min(rows, len(train))):
        row = train[i]
        out += ["", bold(f"-- row {i}: {row['length']} tokens, {row['num_loss_tokens']} supervised"
                         f"{', truncated' if row['truncated'] else ''} --"),
                render_row(tok, row["input_ids"], row["labels"], color, tokens)]
    out += ["", bold("== preprocessing report ==")]
    for split, report in datamodule.preprocessing_report.items():
        out += report_lines(split, report, hp.max_length)
    truncated = datamodule.preprocessing_report.get(hp.dataset_train_split, {}).get("causes", {})
    truncated = truncated.get("truncated", {}).get("rows", 0)
    out += ["", bold("== lengths (kept training rows) ==")]
    out += length_lines(list(train["length"]), hp.max_length, hp.max_tokens_per_micro_batch, truncated)
    ranks, note = world_size(trainer)
    trainer = trainer or {}
    out += ["", bold("== optimizer-step plan (epoch 0) ==")]
    out += plan_lines(datamodule, ranks, trainer.get("max_epochs"), trainer.get("max_steps"))
    if note:
        out.append(note)
    return "\n".join(out) + "\n"
