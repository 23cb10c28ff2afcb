"""``SFTDataModule``: load with ``datasets``, render the chat template, tokenize, mask labels, plan steps, pad."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from typing import Any, Callable, Iterator, Literal, Optional, Union

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from lit_sft.data.cache import cache_fingerprint
from lit_sft.data.collate import PaddingCollator, PaddingFreeCollator
from lit_sft.data.formats import check_columns, resolve_fields
from lit_sft.data.loading import check_chat_template, load_split, load_tokenizer
from lit_sft.data.report import POLICY_KEYS, build_report, check_policies, report_lines
from lit_sft.data.mixture import SOURCE_COLUMN, DatasetMixture, as_mixture, load_mixture, source_names
from lit_sft.data.packing import packed_dataset
from lit_sft.data.sampler import MicroBatchItem, StepBatchSampler
from lit_sft.data.tokenize import tokenize_row
from lit_sft.validation import check_fits_model, check_ranges, model_max_positions

log = logging.getLogger(__name__)


class _PlannedRows(Dataset):
    """Looks rows up by :class:`MicroBatchItem` (training) or by plain index (evaluation), as the collators take
    them (:mod:`lit_sft.data.collate`).

    With ``groups`` (packing), planned item ``i`` is the rows ``groups[i]`` back to back, with their
    ``seq_lengths``. Rows of a mixture also carry ``source_ids`` (one per row of the item).
    """

    def __init__(self, rows: Any, groups: Optional[list[list[int]]] = None) -> None:
        self.rows, self.groups = rows, groups
        self.has_sources = SOURCE_COLUMN in rows.column_names

    def __len__(self) -> int:
        return len(self.groups) if self.groups is not None else len(self.rows)

    def _row(self, index: int) -> dict[str, Any]:
        members = [self.rows[r] for r in self.groups[index]] if self.groups is not None else [self.rows[index]]
        row = {"input_ids": [t for m in members for t in m["input_ids"]],
               "labels": [t for m in members for t in m["labels"]]}
        if self.groups is not None:
            row["seq_lengths"] = [len(m["input_ids"]) for m in members]
        if self.has_sources:
            row["source_ids"] = [m[SOURCE_COLUMN] for m in members]
        return row

    def __getitem__(self, item: Union[int, MicroBatchItem]) -> dict[str, Any]:
        if isinstance(item, MicroBatchItem):
            return {**self._row(item.row), "supervised": item.supervised,
                    "num_items_in_batch": item.num_items_in_batch, "last_in_step": item.last_in_step}
        return self._row(item)


def _columns_to_drop(rows: Any) -> list[str]:
    """The columns that tokenization replaces: all but a mixture row's source (:data:`SOURCE_COLUMN`)."""
    return [c for c in rows.column_names if c != SOURCE_COLUMN]


class _EvalRows(Dataset):
    """Evaluation rows by ``(index, supervised)``; ``supervised=False`` is a filler (the collators mask its labels)."""

    def __init__(self, rows: Any) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: tuple[int, bool]) -> dict[str, Any]:
        row = self.rows[item[0]]
        return {"input_ids": row["input_ids"], "labels": row["labels"], "supervised": item[1]}


def eval_batches(num_rows: int, batch_size: int, world_size: int = 1, rank: int = 0) -> list[list[tuple[int, bool]]]:
    """Rank ``rank``'s evaluation batches as ``[(row, supervised), ...]``: rows ``rank, rank + world_size, ...`` in
    batches of ``batch_size``, then fillers ``[(0, False)]`` up to ``ceil(ceil(num_rows / world_size) / batch_size)``
    batches, the count of rank 0 (the rank with the most rows), so that every rank runs the same number."""
    mine = list(range(rank, num_rows, world_size))
    batches = [[(row, True) for row in mine[i:i + batch_size]] for i in range(0, len(mine), batch_size)]
    most = math.ceil(math.ceil(num_rows / world_size) / batch_size)
    return batches + [[(0, False)] for _ in range(most - len(batches))]


class _DeferredIterator:
    """An iterator that creates the ``DataLoader``'s real iterator at the first ``next()``, not at ``iter()``."""

    def __init__(self, make: Callable[[], Iterator[Any]]) -> None:
        self._make: Optional[Callable[[], Iterator[Any]]] = make
        self._iterator: Optional[Iterator[Any]] = None

    def __iter__(self) -> "_DeferredIterator":
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            assert self._make is not None
            self._iterator, self._make = self._make(), None
        return next(self._iterator)


class _StepLoader(DataLoader):
    """The training ``DataLoader``. Its position is a function of ``trainer.global_step`` (the sampler skips the
    steps already taken, see :mod:`lit_sft.data.sampler`), so it resumes mid-epoch with no state of its own; the
    ``state_dict``/``load_state_dict`` pair tells Lightning so (Lightning otherwise warns on a mid-epoch resume that
    the loader is not resumable, comparing optimizer steps with its count of micro-batches).

    ``iter()`` defers the real iterator to the first ``next()``. Lightning (2.6, ``FitLoop.setup_data``) calls
    ``iter()`` on the loader before ``set_epoch`` when a run resumes, and does not call it again for the resumed
    epoch; a ``DataLoader`` with ``num_workers > 0`` pulls ``prefetch_factor x num_workers`` batches from its batch
    sampler as soon as its iterator exists, so the sampler would plan epoch 0 and, at a ``global_step`` past epoch 0,
    yield nothing (a resumed run in a later epoch trained 0 micro-batches). The first ``next()`` comes after
    ``set_epoch`` on every path: a fresh epoch, a resume mid-epoch, a resume at an epoch end.
    """

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return _DeferredIterator(super().__iter__)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def _preprocess(row: dict, index: int, tokenizer: Any, max_length: Optional[int], assistant_only_loss: bool,
                completion_only_loss: bool, fmt: Optional[str] = None, fields: Optional[dict[str, str]] = None,
                chat_template_kwargs: Optional[dict] = None) -> dict[str, Any]:
    """One row -> its tokens, labels and report causes (the ``map`` cache key is :mod:`lit_sft.data.cache`'s)."""
    example = tokenize_row(row, tokenizer, max_length, assistant_only_loss, completion_only_loss, row_index=index,
                           fmt=fmt, fields=fields, chat_template_kwargs=chat_template_kwargs)
    return {"input_ids": example.input_ids, "labels": example.labels, "length": len(example.input_ids),
            "num_loss_tokens": example.num_loss_tokens, "truncated": example.truncated,
            "issues": list(example.issues), "issue_details": list(example.issues.values())}


class SFTDataModule(L.LightningDataModule):
    """Chat / prompt-completion / text data for SFT, batched so that one optimizer step covers a fixed row count.

    Each training batch is one *micro-batch*; ``gradient_accumulation_steps`` micro-batches per rank make one
    optimizer step over ``per_device_train_batch_size * gradient_accumulation_steps * world_size`` rows. Batches
    are :class:`lit_sft.data.batch.SFTBatch`: they carry the step's global supervised-token count
    (``num_items_in_batch``) so the loss can be normalised over the whole step (``lit_sft/loss.py``).

    Args:
        dataset_name: hub id, local dataset folder, or a ``.json/.jsonl/.parquet/.csv`` file (or ``dataset_mixture``).
        dataset_config: the dataset's configuration name (recipe: ``default``).
        dataset_train_split: split to train on.
        dataset_test_split: split for evaluation, used when ``do_eval`` is true.
        test_split_size: hold out this share of the training split for evaluation instead, with
            ``Dataset.train_test_split(test_size=test_split_size, seed=seed)`` (open-r1's
            ``dataset_mixture.test_split_size``); needed for sources with no test split (a single file or a single
            ``save_to_disk`` Dataset). Training uses the rest.
        data_files: passed to ``datasets.load_dataset``.
        dataset_mixture: a weighted mixture of datasets instead of ``dataset_name``, as open-r1 configures it
            (``{datasets: [{id, config, split, columns, weight}], seed, test_split_size}``, see
            :mod:`lit_sft.data.mixture`); its splits are ``train`` and, with ``test_split_size``, ``test``. The
            training log then carries ``train/loss/<source>`` per step. When both are set, the mixture is used (as in
            open-r1).
        tokenizer_name_or_path: tokenizer to use; the CLI defaults it to ``model.model_name_or_path``.
            ``pkg://package/dir`` names a folder shipped inside an installed package.
        tokenizer_revision: hub revision of the tokenizer.
        chat_template: overrides the tokenizer's chat template (a Jinja string or a file path).
        eos_token: overrides the tokenizer's EOS; it must be the template's end-of-turn token.
        max_length: tokens per row after truncation (recipe: 16384; TRL's default is 1024).
        truncation: ``truncate`` keeps the first ``max_length`` tokens (TRL's ``keep_start``; no EOS is added);
            ``drop`` removes rows longer than ``max_length``. A row over ``max_length`` only by the template's
            trailing newline fits (it is cut, not dropped). Either way, rows left with no supervised token are
            dropped; all counts are in the preprocessing report.
        longer_than_model: ``error`` (default) stops before training when ``max_length``, or with ``max_length: null``
            a row, is longer than the model's ``max_position_embeddings`` (read from its config); ``warn`` trains
            anyway, for a model that handles longer inputs (e.g. with RoPE scaling).
        assistant_only_loss: supervise only assistant turns: each turn's content and its end-of-turn token, what the
            model generates after the generation prompt (``lit_sft/data/tokenize.py`` says why, and how this
            compares with TRL's ``{% generation %}`` templates).
        completion_only_loss: for prompt/completion rows, supervise only the completion (the same tokens as the
            conversation as a ``messages`` row with ``assistant_only_loss``).
        format: the dataset's format: ``messages`` (OpenAI/TRL chat), ``sharegpt`` (``conversations`` of
            ``from``/``value``, ``human``/``gpt``/``system``/``tool``), ``prompt_completion`` (both strings, or both
            message lists as TRL's conversational prompt/completion) or ``text``; ``null`` detects it from the
            column names (``lit_sft/data/formats.py``).
        columns: field name -> your dataset's column name, e.g. ``{messages: chat}`` or
            ``{prompt: question, completion: answer}``. Columns ``tools``, ``documents`` and
            ``chat_template_kwargs`` (per row) are passed to ``apply_chat_template`` when present.
        chat_template_kwargs: extra ``apply_chat_template`` arguments for every row, e.g.
            ``{enable_thinking: false}`` (a row's own ``chat_template_kwargs`` column overrides them).
        on_no_assistant_turn: rows without an assistant turn (or a completion without one), which with all-token
            loss train on the prompt only: ``warn`` (keep, log), ``drop`` (default) or ``error``.
        on_answer_truncated: rows whose every answer token is cut by ``max_length`` (with all-token loss they train
            on the prompt only): ``warn``, ``drop`` (default) or ``error``.
        on_unknown_role: rows with a role that is not a chat role (``system``/``developer``/``user``/``assistant``/
            ``tool``), e.g. ShareGPT's ``human``/``gpt`` in a ``messages`` column: ``warn``, ``drop`` or ``error``
            (default).
        on_unrendered_content: rows whose content (a message, a tool call, ``tools``, ``documents``) the chat
            template did not render into the training text: ``warn``, ``drop`` or ``error`` (default).
        per_device_train_batch_size: rows per micro-batch per device (recipe: 16).
        per_device_eval_batch_size: rows per evaluation batch per device.
        gradient_accumulation_steps: micro-batches per device per optimizer step.
        packing: pack rows into sequences of up to ``max_length`` tokens (best-fit decreasing as TRL's ``bfd``,
            computed once and cached with the tokenized data, ``lit_sft/data/packing.py``); a "row" of the batch
            arithmetic is then a packed sequence, so rows per optimizer step become ``per_device_train_batch_size``
            packed sequences per device. Implies padding-free collation (documents
            never attend to each other). Unlike ``padding_free``, this changes how many conversations make a step.
        padding_free: concatenate each micro-batch's rows into one sequence with no padding; positions restart per
            row and attention never crosses rows (``lit_sft/attention.py``). Same rows per step, same loss.
        max_tokens_per_micro_batch: with ``padding_free``, fill micro-batches up to this many tokens instead of
            ``per_device_train_batch_size`` rows; an optimizer step still covers ``per_device_train_batch_size x
            gradient_accumulation_steps x world_size`` rows (the recipe's), so the learning dynamics are unchanged.
            Must be ``>= max_length``. Not used (logged) with padded batches, so ``padding_free: false`` alone
            returns a config with a token budget to the padded layout.
        do_eval: evaluate on ``dataset_test_split``.
        dataset_num_proc: processes for tokenization (``datasets.map(num_proc=...)``).
        num_workers: ``DataLoader`` worker processes.
        shuffle: shuffle rows each epoch (seeded by ``seed + epoch``).
        seed: seed of the row order (recipe: 42).
        max_train_samples: keep only the first N training rows (smoke tests, benchmarks).
        pad_to_multiple_of: round padded lengths up to a multiple of this.

    Attributes:
        preprocessing_report: per split (``"train"``, ``"test"``, ...), filled by ``setup``: ``{"format",
            "columns", "rows", "kept", "dropped", "causes": {cause: {"rows", "example_row", "example",
            "action"}}}``, the causes and actions of :mod:`lit_sft.data.report` (also logged, and rendered in the model
            card).
    """

    _POLICY_KEYS = ("on_no_assistant_turn", "on_answer_truncated", "on_unknown_role", "on_unrendered_content")

    def __init__(
        self,
        dataset_name: Optional[str] = None,
        dataset_config: Optional[str] = None,
        dataset_train_split: str = "train",
        dataset_test_split: str = "test",
        test_split_size: Optional[float] = None,
        data_files: Optional[Union[str, list[str], dict[str, Any]]] = None,
        dataset_mixture: Optional[DatasetMixture] = None,
        tokenizer_name_or_path: Optional[str] = None,
        tokenizer_revision: Optional[str] = None,
        chat_template: Optional[str] = None,
        eos_token: Optional[str] = None,
        max_length: Optional[int] = 16384,
        truncation: Literal["truncate", "drop"] = "truncate",
        longer_than_model: Literal["error", "warn"] = "error",
        assistant_only_loss: bool = False,
        completion_only_loss: bool = True,
        format: Optional[Literal["messages", "sharegpt", "prompt_completion", "text"]] = None,
        columns: Optional[dict[str, str]] = None,
        chat_template_kwargs: Optional[dict[str, Any]] = None,
        on_no_assistant_turn: Literal["warn", "drop", "error"] = "drop",
        on_answer_truncated: Literal["warn", "drop", "error"] = "drop",
        on_unknown_role: Literal["warn", "drop", "error"] = "error",
        on_unrendered_content: Literal["warn", "drop", "error"] = "error",
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
        if max_tokens_per_micro_batch is not None and not (padding_free or packing):
            rank_zero_info(f"data.padding_free: false: padded micro-batches of {per_device_train_batch_size} rows; "
                           f"data.max_tokens_per_micro_batch={max_tokens_per_micro_batch} applies to padding-free "
                           "batches only and is not used")
            max_tokens_per_micro_batch = None
        if max_tokens_per_micro_batch is not None:
            if max_length is not None and max_tokens_per_micro_batch < max_length:
                raise ValueError(f"data.max_tokens_per_micro_batch={max_tokens_per_micro_batch} must be >= "
                                 f"data.max_length={max_length}, or a long row would not fit any micro-batch")
        if packing and max_length is None:
            raise ValueError("data.packing=true needs data.max_length (the packed sequence length)")
        self.padding_free = padding_free or packing
        if tokenizer_name_or_path is None:
            raise ValueError("data.tokenizer_name_or_path is required (the CLI sets it from model.model_name_or_path)")
        check_columns(columns)
        check_policies(dict(on_no_assistant_turn=on_no_assistant_turn, on_answer_truncated=on_answer_truncated,
                            on_unknown_role=on_unknown_role, on_unrendered_content=on_unrendered_content))
        self.dataset_mixture = as_mixture(dataset_mixture) if dataset_mixture is not None else None
        if self.dataset_mixture is not None and test_split_size is not None:
            raise ValueError("data.test_split_size holds out part of data.dataset_name; with data.dataset_mixture set "
                             "data.dataset_mixture.test_split_size instead")
        if self.dataset_mixture is None and dataset_name is None:
            raise ValueError("set data.dataset_name (a hub id, folder or file) or data.dataset_mixture")
        if self.dataset_mixture is not None and do_eval and self.dataset_mixture.test_split_size is None:
            raise ValueError("data.do_eval with data.dataset_mixture needs data.dataset_mixture.test_split_size (the "
                             "share of the mixture to evaluate on)")
        self.save_hyperparameters()
        if self.dataset_mixture is not None:  # plain data in the hyperparameters (hparams.yaml, checkpoints)
            self.hparams["dataset_mixture"] = dataclasses.asdict(self.dataset_mixture)
        self.preprocessing_report: dict[str, dict[str, Any]] = {}
        self.tokenizer = load_tokenizer(tokenizer_name_or_path, tokenizer_revision, chat_template, eos_token)
        self.source_names = source_names(self.dataset_mixture) if self.dataset_mixture is not None else None
        self._mixture_splits: Any = None
        self.train_rows: Any = None
        self.train_packed: Any = None  # packing: one row per packed sequence (rows, length, num_loss_tokens)
        self.eval_rows: Any = None

    # -- preprocessing -------------------------------------------------------------------------------------------
    def _tokenize(self, split: str) -> Any:
        hp = self.hparams
        limit = model_max_positions(self.trainer)
        check_fits_model(hp.max_length, limit, policy=hp.longer_than_model, packing=hp.packing)
        rows = self._load_rows(split)
        check_chat_template(self.tokenizer, rows)
        if split == hp.dataset_train_split and hp.max_train_samples is not None:
            rows = rows.select(range(min(hp.max_train_samples, len(rows))))
        fmt, fields = resolve_fields(rows.column_names, hp.format, hp.columns)
        fn_kwargs = dict(tokenizer=self.tokenizer, max_length=hp.max_length,
                         assistant_only_loss=hp.assistant_only_loss, completion_only_loss=hp.completion_only_loss,
                         fmt=fmt, fields=fields, chat_template_kwargs=hp.chat_template_kwargs)
        settings = {k: v for k, v in fn_kwargs.items() if k != "tokenizer"}
        fingerprint = cache_fingerprint(rows._fingerprint, self.tokenizer, inspect.getsource(_preprocess), **settings)
        tokenized = rows.map(_preprocess, with_indices=True, fn_kwargs=fn_kwargs, num_proc=hp.dataset_num_proc,
                             remove_columns=_columns_to_drop(rows), desc=f"Tokenizing {split}",
                             new_fingerprint=fingerprint)
        check_fits_model(hp.max_length, limit, tokenized["length"], split, hp.longer_than_model, hp.packing)
        report, kept = build_report(split, tokenized["issues"], tokenized["issue_details"], tokenized["truncated"],
                                    tokenized["num_loss_tokens"], hp.truncation,
                                    {key: hp[key] for key in self._POLICY_KEYS})
        for line in report_lines(split, report, hp.max_length):
            rank_zero_info(line)
        flagged = [f"{entry['rows']} row(s) {'kept' if entry['action'] == 'warn' else 'dropped'} with {cause}"
                   for cause, entry in report["causes"].items() if cause in POLICY_KEYS]
        if flagged:
            rank_zero_warn(f"{split}: {', '.join(flagged)} (see the preprocessing report above)")
        tokenized = tokenized.remove_columns(["issues", "issue_details"])
        if len(kept) < len(tokenized):
            tokenized = tokenized.select(kept)
        self.preprocessing_report[split] = {"format": fmt, "columns": fields, **report}
        causes = report["causes"]
        self.preprocessing_counts = {"rows": report["rows"], "truncated": causes.get("truncated", {}).get("rows", 0),
                                     "no_loss_dropped": causes.get("no_supervised_token", {}).get("rows", 0)}
        if len(tokenized) == 0:
            raise ValueError(f"{split}: no row is left after preprocessing (see the preprocessing report above)")
        return tokenized

    def _load_rows(self, split: str) -> Any:
        """One split of ``dataset_name``, or of the mixture (``train``, and ``test`` with ``test_split_size``).

        Raises:
            ValueError: the mixture has no such split (names the splits it has and the keys to set).
        """
        hp = self.hparams
        if self.dataset_mixture is None:
            return load_split(hp.dataset_name, split, hp.dataset_config, hp.data_files,
                              train_split=hp.dataset_train_split, test_split_size=hp.test_split_size, seed=hp.seed)
        if self._mixture_splits is None:
            if hp.dataset_name is not None:
                rank_zero_info(f"data.dataset_mixture is set: data.dataset_name={hp.dataset_name!r} is not used")
            self._mixture_splits = load_mixture(self.dataset_mixture)
        if split not in self._mixture_splits:
            raise ValueError(f"data.dataset_mixture makes the splits {sorted(self._mixture_splits)}, not {split!r}: "
                             "set data.dataset_train_split: train, data.dataset_test_split: test (and "
                             "data.dataset_mixture.test_split_size for an eval split)")
        return self._mixture_splits[split]

    def prepare_data(self) -> None:
        """With several processes, tokenize once on local rank 0 so that ``datasets`` caches the result for the
        other ranks' ``setup``; a single process tokenizes in ``setup`` only."""
        if self.trainer is not None and self.trainer.world_size > 1 and self.trainer.state.fn != "validate":
            rows = self._tokenize(self.hparams.dataset_train_split)
            if self.hparams.packing:
                packed_dataset(rows, self.hparams.max_length)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_rows is None and stage != "validate":  # `lit_sft validate` reads the test split only
            self.train_rows = self._tokenize(self.hparams.dataset_train_split)
            self.train_packed = None
            if self.hparams.packing:  # cached by `datasets`: packed once, by local rank 0 in prepare_data
                self.train_packed = packed_dataset(self.train_rows, self.hparams.max_length)
                rank_zero_info(f"packing: {len(self.train_rows)} rows into {len(self.train_packed)} sequences of "
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
        """The training plan for this rank (see :mod:`lit_sft.data.sampler`); with packing, a planned item is a
        packed sequence."""
        hp, trainer = self.hparams, self.trainer
        items = self.train_packed if self.train_packed is not None else self.train_rows
        return StepBatchSampler(
            items["num_loss_tokens"], hp.per_device_train_batch_size, hp.gradient_accumulation_steps,
            world_size=self.world_size, rank=trainer.global_rank if trainer is not None else 0, seed=hp.seed,
            shuffle=hp.shuffle, steps_done=(lambda: trainer.global_step) if trainer is not None else None,
            lengths=items["length"], max_tokens_per_micro_batch=hp.max_tokens_per_micro_batch,
            padded=not self.padding_free,
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
            return PaddingFreeCollator(self.source_names)
        return PaddingCollator(self.tokenizer.pad_token_id, self.hparams.pad_to_multiple_of, self.source_names)

    def train_dataloader(self) -> DataLoader:
        """This rank's micro-batches (:class:`_StepLoader` over :meth:`batch_sampler`).

        Lightning reads ``len(loader)`` (micro-batches per epoch) when it builds the loader and ends an epoch after
        that many; the sampler is therefore set, already here, to the epoch the run is in by its optimizer step
        (``global_step // steps_per_epoch``: the right one on a fresh run, on a resume mid-epoch and on a resume at an
        epoch end). With a token budget the number of micro-batches differs from epoch to epoch, so the loader is then
        rebuilt every epoch (``trainer.reload_dataloaders_every_n_epochs = 1``); with a fixed length, an epoch with
        more micro-batches than the first would be cut in the middle of an optimizer step.
        """
        hp, trainer = self.hparams, self.trainer
        sampler = self.batch_sampler()
        groups = self.train_packed["rows"] if self.train_packed is not None else None
        if trainer is not None:
            sampler.set_epoch(trainer.global_step // sampler.steps_per_epoch)
            if hp.max_tokens_per_micro_batch is not None and not trainer.reload_dataloaders_every_n_epochs:
                trainer.reload_dataloaders_every_n_epochs = 1
        return _StepLoader(_PlannedRows(self.train_rows, groups), batch_sampler=sampler,
                           collate_fn=self.collator(), num_workers=hp.num_workers,
                           persistent_workers=False, pin_memory=False)

    def val_dataloader(self) -> Any:
        """This rank's share of the evaluation rows (rows ``rank, rank + world_size, ...``), in batches of
        ``per_device_eval_batch_size``. Every rank runs the same number of batches (ZeRO-3 gathers parameters
        collectively in each forward): a rank with fewer rows gets filler batches (one row, every label masked,
        adding nothing to ``eval/loss``). The loader draws its worker seed from its own generator, so evaluation
        leaves the global RNG, and with it training, untouched. With ``do_eval: false``, ``[]`` (never requested
        during ``fit``: :class:`lit_sft.evaluation.SFTEvaluation` turns validation off first).
        """
        hp = self.hparams
        if not hp.do_eval:
            return []
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        return DataLoader(_EvalRows(self.eval_rows),
                          batch_sampler=eval_batches(len(self.eval_rows), hp.per_device_eval_batch_size,
                                                     self.world_size, rank),
                          collate_fn=self.collator(), num_workers=hp.num_workers, generator=torch.Generator())

    def state_dict(self) -> dict[str, Any]:
        """The data position is restored from the trainer's ``global_step`` (the plan is a function of the seed and
        the epoch), so only the settings that define the plan are stored, to refuse an inconsistent resume.
        The plan is global: the same rows per optimizer step on any GPU count give the same steps, so a resume on
        another GPU count (with the accumulation adjusted) continues at the next step's rows."""
        hp = self.hparams
        return {"seed": hp.seed, "per_device_train_batch_size": hp.per_device_train_batch_size,
                "gradient_accumulation_steps": hp.gradient_accumulation_steps, "world_size": self.world_size,
                "rows_per_step": hp.per_device_train_batch_size * hp.gradient_accumulation_steps * self.world_size,
                "preprocessing_report": self.preprocessing_report}  # for the model card of `lit_sft export`

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mine = self.state_dict()
        state_dict = dict(state_dict)
        state_dict.setdefault("rows_per_step", state_dict.get("per_device_train_batch_size", 0)
                              * state_dict.get("gradient_accumulation_steps", 0) * state_dict.get("world_size", 0))
        changed = {k: (state_dict[k], mine[k]) for k in ("seed", "rows_per_step")
                   if k in state_dict and mine[k] != state_dict[k]}
        if changed:
            rank_zero_warn(f"resuming with different data settings {changed} (checkpoint, now): the row order "
                           "after the checkpoint will differ from the interrupted run")
