"""``SFTDataModule``: load with ``datasets``, render the chat template, tokenize, mask labels, plan steps, pad."""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional, Union

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from lit_sft.data.collate import PaddingCollator, PaddingFreeCollator
from lit_sft.data.loading import check_chat_template, load_split, load_tokenizer
from lit_sft.data.sampler import MicroBatchItem, StepBatchSampler
from lit_sft.data.tokenize import tokenize_row
from lit_sft.validation import check_fits_model, check_ranges, model_max_positions

log = logging.getLogger(__name__)


class _PlannedRows(Dataset):
    """Looks rows up by :class:`MicroBatchItem` (training) or by plain index (evaluation).

    With ``groups`` (packing), planned item ``i`` is the rows ``groups[i]`` back to back, with their
    ``seq_lengths``.
    """

    def __init__(self, rows: Any, groups: Optional[list[list[int]]] = None) -> None:
        self.rows, self.groups = rows, groups

    def __len__(self) -> int:
        return len(self.groups) if self.groups is not None else len(self.rows)

    def _row(self, index: int) -> dict[str, Any]:
        if self.groups is None:
            row = self.rows[index]
            return {"input_ids": row["input_ids"], "labels": row["labels"]}
        members = [self.rows[r] for r in self.groups[index]]
        return {"input_ids": [t for m in members for t in m["input_ids"]],
                "labels": [t for m in members for t in m["labels"]],
                "seq_lengths": [len(m["input_ids"]) for m in members]}

    def __getitem__(self, item: Union[int, MicroBatchItem]) -> dict[str, Any]:
        if isinstance(item, MicroBatchItem):
            return {**self._row(item.row), "supervised": item.supervised, "step": item.step,
                    "step_loss_tokens": item.step_loss_tokens, "last_in_step": item.last_in_step}
        return self._row(item)


class _StepLoader(DataLoader):
    """The training ``DataLoader``. Its position is a function of ``trainer.global_step`` (the sampler skips the
    steps already taken, see :mod:`lit_sft.data.sampler`), so it resumes mid-epoch with no state of its own; the
    ``state_dict``/``load_state_dict`` pair tells Lightning so (Lightning otherwise warns on a mid-epoch resume that
    the loader is not resumable, comparing optimizer steps with its count of micro-batches)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing packing of rows into groups of at most ``max_length`` tokens (TRL's ``bfd`` strategy).

    Returns:
        Groups of row indices; every row appears in exactly one group, each group's lengths sum to ``<= max_length``.
    """
    groups: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        fits = [g for g, free in enumerate(room) if lengths[row] <= free]
        if fits:
            g = min(fits, key=lambda g: room[g])
            groups[g].append(row)
            room[g] -= lengths[row]
        else:
            groups.append([row])
            room.append(max_length - lengths[row])
    return groups


def _preprocess(row: dict, index: int, tokenizer: Any, max_length: Optional[int], assistant_only_loss: bool,
                completion_only_loss: bool) -> dict[str, Any]:
    example = tokenize_row(row, tokenizer, max_length, assistant_only_loss, completion_only_loss, row_index=index)
    return {"input_ids": example.input_ids, "labels": example.labels, "length": len(example.input_ids),
            "num_loss_tokens": example.num_loss_tokens, "truncated": example.truncated}


class SFTDataModule(L.LightningDataModule):
    """Chat / prompt-completion / text data for SFT, batched so that one optimizer step covers a fixed row count.

    Each training batch is one *micro-batch*; ``gradient_accumulation_steps`` micro-batches per rank make one
    optimizer step over ``per_device_train_batch_size * gradient_accumulation_steps * world_size`` rows. Batches
    carry the step's global supervised-token count (``step_loss_tokens``) so the loss can be normalised over the
    whole step (``lit_sft/loss.py``). Batch tensors are described in :class:`lit_sft.data.collate.PaddingCollator`.

    Args:
        dataset_name: hub id, local dataset folder, or a ``.json/.jsonl/.parquet/.csv`` file.
        dataset_config: the dataset's configuration name (recipe: ``default``).
        dataset_train_split: split to train on.
        dataset_test_split: split for evaluation, used when ``do_eval`` is true.
        test_split_size: hold out this share of the training split for evaluation instead, with
            ``Dataset.train_test_split(test_size=test_split_size, seed=seed)`` (open-r1's
            ``dataset_mixture.test_split_size``); needed for sources with no test split (a single file or a single
            ``save_to_disk`` Dataset). Training uses the rest.
        data_files: passed to ``datasets.load_dataset``.
        tokenizer_name_or_path: tokenizer to use; the CLI defaults it to ``model.model_name_or_path``.
            ``pkg://package/dir`` names a folder shipped inside an installed package.
        tokenizer_revision: hub revision of the tokenizer.
        chat_template: overrides the tokenizer's chat template (a Jinja string or a file path).
        eos_token: overrides the tokenizer's EOS; it must be the template's end-of-turn token.
        max_length: tokens per row after truncation (recipe: 16384; TRL's default is 1024).
        truncation: ``truncate`` keeps the first ``max_length`` tokens (TRL's ``keep_start``; no EOS is added);
            ``drop`` removes rows longer than ``max_length``. Either way, rows left with no supervised token are
            dropped, and both counts are logged.
        longer_than_model: ``error`` (default) stops before training when ``max_length``, or with ``max_length: null``
            a row, is longer than the model's ``max_position_embeddings`` (read from its config); ``warn`` trains
            anyway, for a model that handles longer inputs (e.g. with RoPE scaling).
        assistant_only_loss: supervise only assistant turns (each with its end-of-turn token).
        completion_only_loss: for prompt/completion rows, supervise only the completion.
        per_device_train_batch_size: rows per micro-batch per device (recipe: 16).
        per_device_eval_batch_size: rows per evaluation batch per device.
        gradient_accumulation_steps: micro-batches per device per optimizer step.
        packing: pack rows into sequences of up to ``max_length`` tokens (best-fit decreasing, once, as TRL's
            ``bfd``); a "row" of the batch arithmetic is then a packed sequence, so rows per optimizer step become
            ``per_device_train_batch_size`` packed sequences per device. Implies padding-free collation (documents
            never attend to each other). Unlike ``padding_free``, this changes how many conversations make a step.
        padding_free: concatenate each micro-batch's rows into one sequence with no padding; positions restart per
            row and attention never crosses rows (``lit_sft/attention.py``). Same rows per step, same loss.
        max_tokens_per_micro_batch: with ``padding_free``, fill micro-batches up to this many tokens instead of
            ``per_device_train_batch_size`` rows; an optimizer step still covers ``per_device_train_batch_size x
            gradient_accumulation_steps x world_size`` rows (the recipe's), so the learning dynamics are unchanged.
            Must be ``>= max_length``.
        do_eval: evaluate on ``dataset_test_split``.
        dataset_num_proc: processes for tokenization (``datasets.map(num_proc=...)``).
        num_workers: ``DataLoader`` worker processes.
        shuffle: shuffle rows each epoch (seeded by ``seed + epoch``).
        seed: seed of the row order (recipe: 42).
        max_train_samples: keep only the first N training rows (smoke tests, benchmarks).
        pad_to_multiple_of: round padded lengths up to a multiple of this.
    """

    def __init__(
        self,
        dataset_name: str,
        dataset_config: Optional[str] = None,
        dataset_train_split: str = "train",
        dataset_test_split: str = "test",
        test_split_size: Optional[float] = None,
        data_files: Optional[Union[str, list[str], dict[str, Any]]] = None,
        tokenizer_name_or_path: Optional[str] = None,
        tokenizer_revision: Optional[str] = None,
        chat_template: Optional[str] = None,
        eos_token: Optional[str] = None,
        max_length: Optional[int] = 16384,
        truncation: Literal["truncate", "drop"] = "truncate",
        longer_than_model: Literal["error", "warn"] = "error",
        assistant_only_loss: bool = False,
        completion_only_loss: bool = True,
        per_device_train_batch_size: int = 16,
        per_device_eval_batch_size: int = 16,
        gradient_accumulation_steps: int = 1,
        packing: bool = False,
        padding_free: bool = False,
        max_tokens_per_micro_batch: Optional[int] = None,
        do_eval: bool = False,
        dataset_num_proc: Optional[int] = None,
        num_workers: int = 2,
        shuffle: bool = True,
        seed: int = 42,
        max_train_samples: Optional[int] = None,
        pad_to_multiple_of: Optional[int] = None,
    ) -> None:
        super().__init__()
        check_ranges("data", locals())
        if max_tokens_per_micro_batch is not None:
            if not (padding_free or packing):
                raise ValueError("data.max_tokens_per_micro_batch needs data.padding_free: true")
            if max_length is not None and max_tokens_per_micro_batch < max_length:
                raise ValueError(f"data.max_tokens_per_micro_batch={max_tokens_per_micro_batch} must be >= "
                                 f"data.max_length={max_length}, or a long row would not fit any micro-batch")
        if packing and max_length is None:
            raise ValueError("data.packing=true needs data.max_length (the packed sequence length)")
        self.padding_free = padding_free or packing
        if tokenizer_name_or_path is None:
            raise ValueError("data.tokenizer_name_or_path is required (the CLI sets it from model.model_name_or_path)")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer_name_or_path, tokenizer_revision, chat_template, eos_token)
        self.train_rows: Any = None
        self.train_groups: Optional[list[list[int]]] = None
        self.eval_rows: Any = None

    # -- preprocessing -------------------------------------------------------------------------------------------
    def _tokenize(self, split: str) -> Any:
        hp = self.hparams
        limit = model_max_positions(self.trainer)
        check_fits_model(hp.max_length, limit, policy=hp.longer_than_model, packing=hp.packing)
        rows = load_split(hp.dataset_name, split, hp.dataset_config, hp.data_files, train_split=hp.dataset_train_split,
                          test_split_size=hp.test_split_size, seed=hp.seed)
        check_chat_template(self.tokenizer, rows)
        if split == hp.dataset_train_split and hp.max_train_samples is not None:
            rows = rows.select(range(min(hp.max_train_samples, len(rows))))
        fn_kwargs = dict(tokenizer=self.tokenizer, max_length=hp.max_length,
                         assistant_only_loss=hp.assistant_only_loss, completion_only_loss=hp.completion_only_loss)
        tokenized = rows.map(_preprocess, with_indices=True, fn_kwargs=fn_kwargs, num_proc=hp.dataset_num_proc,
                             remove_columns=rows.column_names, desc=f"Tokenizing {split}")
        check_fits_model(hp.max_length, limit, tokenized["length"], split, hp.longer_than_model, hp.packing)
        n_rows, n_truncated = len(tokenized), sum(tokenized["truncated"])
        if hp.truncation == "drop" and n_truncated:
            tokenized = tokenized.filter(lambda t: not t, input_columns="truncated")
        no_loss = sum(n == 0 for n in tokenized["num_loss_tokens"])
        if no_loss:
            tokenized = tokenized.filter(lambda n: n > 0, input_columns="num_loss_tokens")
        rank_zero_info(
            f"{split}: {n_rows} rows; {n_truncated} longer than max_length={hp.max_length} "
            f"({'dropped' if hp.truncation == 'drop' else 'truncated'}); {no_loss} dropped with no supervised token; "
            f"{len(tokenized)} kept"
        )
        if len(tokenized) == 0:
            raise ValueError(f"{split}: no row is left after preprocessing (see the counts above)")
        self.preprocessing_counts = {"rows": n_rows, "truncated": n_truncated, "no_loss_dropped": no_loss}
        return tokenized

    def prepare_data(self) -> None:
        """With several processes, tokenize once on local rank 0 so that ``datasets`` caches the result for the
        other ranks' ``setup``; a single process tokenizes in ``setup`` only."""
        if self.trainer is not None and self.trainer.world_size > 1:
            self._tokenize(self.hparams.dataset_train_split)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_rows is None:
            self.train_rows = self._tokenize(self.hparams.dataset_train_split)
            self.train_groups = None
            if self.hparams.packing:
                self.train_groups = pack_rows(self.train_rows["length"], self.hparams.max_length)
                rank_zero_info(f"packing: {len(self.train_rows)} rows into {len(self.train_groups)} sequences of "
                               f"<= {self.hparams.max_length} tokens")
        if self.hparams.do_eval and self.eval_rows is None:
            self.eval_rows = self._tokenize(self.hparams.dataset_test_split)
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError("lit_sft plans its own distributed batches: set trainer.use_distributed_sampler=false")

    # -- loaders -------------------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def batch_sampler(self) -> StepBatchSampler:
        """The training plan for this rank (see :mod:`lit_sft.data.sampler`)."""
        hp, trainer = self.hparams, self.trainer
        loss_tokens, lengths = self.train_rows["num_loss_tokens"], self.train_rows["length"]
        if self.train_groups is not None:  # packing: a planned item is a packed group of rows
            loss_tokens = [sum(loss_tokens[r] for r in g) for g in self.train_groups]
            lengths = [sum(lengths[r] for r in g) for g in self.train_groups]
        return StepBatchSampler(
            loss_tokens, hp.per_device_train_batch_size, hp.gradient_accumulation_steps,
            world_size=self.world_size, rank=trainer.global_rank if trainer is not None else 0, seed=hp.seed,
            shuffle=hp.shuffle, steps_done=(lambda: trainer.global_step) if trainer is not None else None,
            lengths=lengths, max_tokens_per_micro_batch=hp.max_tokens_per_micro_batch,
        )

    @property
    def optimizer_steps_per_epoch(self) -> int:
        """``ceil(rows / (per_device_train_batch_size * gradient_accumulation_steps * world_size))``."""
        if self.train_rows is None:
            self.setup("fit")
        return self.batch_sampler().steps_per_epoch

    def collator(self) -> Union[PaddingCollator, PaddingFreeCollator]:
        """Padding-free concatenation (``padding_free`` or ``packing``) or padding to the longest row."""
        if self.padding_free:
            return PaddingFreeCollator()
        return PaddingCollator(self.tokenizer.pad_token_id, self.hparams.pad_to_multiple_of)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return _StepLoader(_PlannedRows(self.train_rows, self.train_groups), batch_sampler=self.batch_sampler(),
                           collate_fn=self.collator(), num_workers=hp.num_workers,
                           persistent_workers=False, pin_memory=False)

    def val_dataloader(self) -> Any:
        if not self.hparams.do_eval:
            return []
        return DataLoader(_PlannedRows(self.eval_rows), batch_size=self.hparams.per_device_eval_batch_size,
                          collate_fn=self.collator(), num_workers=self.hparams.num_workers)

    def state_dict(self) -> dict[str, Any]:
        """The data position is restored from the trainer's ``global_step`` (the plan is a function of the seed and
        the epoch), so only the settings that define the plan are stored, to refuse an inconsistent resume."""
        hp = self.hparams
        return {"seed": hp.seed, "per_device_train_batch_size": hp.per_device_train_batch_size,
                "gradient_accumulation_steps": hp.gradient_accumulation_steps, "world_size": self.world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mine = self.state_dict()
        changed = {k: (v, mine[k]) for k, v in state_dict.items() if k in mine and mine[k] != v}
        if changed:
            rank_zero_warn(f"resuming with different data settings {changed} (checkpoint, now): the row order "
                           "after the checkpoint will differ from the interrupted run")
