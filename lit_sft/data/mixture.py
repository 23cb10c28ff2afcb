"""Weighted dataset mixtures, configured as open-r1 configures them (``dataset_mixture`` in its recipes).

``data.dataset_mixture``::

    dataset_mixture:
      datasets:                      # each source: loaded with `datasets` (lit_sft.data.loading.load_split)
        - id: open-r1/Mixture-of-Thoughts
          config: math
          split: train
          columns: [messages]        # keep only these columns (the same in every source)
          weight: 0.5                # keep this fraction of the source's rows
        - id: open-r1/Mixture-of-Thoughts
          config: code
          columns: [messages]
          weight: 1.0
      seed: 42                       # sub-sampling, mixing and splitting seed
      test_split_size: 0.1           # carve an eval split ("test") off the mixture: a fraction or a row count

The rows are exactly those of open-r1's ``get_dataset`` (``src/open_r1/utils/data.py``): each source is shuffled with
``seed`` and its first ``int(len * weight)`` rows kept, the sources are concatenated in config order and shuffled with
``seed``, and ``train_test_split(test_size=test_split_size, seed=seed)`` makes the ``train`` and ``test`` splits.

Each row also remembers its source, in the column :data:`SOURCE_COLUMN` (an index into :func:`source_names`): the
training log then carries ``train/loss/<source>``, the token-mean loss of each source's rows in the step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from lit_sft.data.loading import load_split

log = logging.getLogger(__name__)

# The column that holds each row's source index through tokenization and packing.
SOURCE_COLUMN = "lit_sft_source"


@dataclass
class MixtureSource:
    """One dataset of a mixture (open-r1's ``DatasetConfig``).

    Attributes:
        id: hub id, local dataset folder, or a ``.json/.jsonl/.parquet/.csv`` file (as ``data.dataset_name``).
        config: the dataset's configuration name.
        split: the split to take rows from.
        columns: keep only these columns (``None``: all); every source that names columns must name the same set.
        weight: the fraction of the source's rows to keep, in ``(0, 1]`` (open-r1's default: 1).
        name: the source's name in ``train/loss/<name>`` (default: the last part of ``id``, then ``-config`` if one
            is set and ``-split`` if still ambiguous).
    """

    id: str
    config: Optional[str] = None
    split: str = "train"
    columns: Optional[list[str]] = None
    weight: float = 1.0
    name: Optional[str] = None


@dataclass
class DatasetMixture:
    """``data.dataset_mixture`` (open-r1's ``DatasetMixtureConfig``; see the module docstring).

    Attributes:
        datasets: the sources.
        seed: seed of the sub-sampling, the shuffle of the mixture and the eval split (open-r1's default: 0).
        test_split_size: rows carved off as the ``test`` split: a fraction in ``(0, 1)`` or a row count; ``None``:
            no eval split.
    """

    datasets: list[MixtureSource] = field(default_factory=list)
    seed: int = 0
    test_split_size: Optional[Union[int, float]] = None


def as_mixture(value: Any) -> DatasetMixture:
    """Validate ``data.dataset_mixture`` (a :class:`DatasetMixture`, or the same as a dict) before anything loads.

    Raises:
        ValueError: an unknown key, no source, a weight outside ``(0, 1]``, sources that name different columns,
            two sources with the same name, or a bad ``test_split_size``; each message names the key.
    """
    if isinstance(value, dict):
        value = _from_dict(DatasetMixture, value, "data.dataset_mixture")
        value.datasets = [s if isinstance(s, MixtureSource) else
                          _from_dict(MixtureSource, s, f"data.dataset_mixture.datasets[{i}]")
                          for i, s in enumerate(value.datasets)]
    if not value.datasets:
        raise ValueError("data.dataset_mixture.datasets is empty: list at least one source ({id: ..., weight: ...})")
    for i, source in enumerate(value.datasets):
        if not 0 < source.weight <= 1:
            raise ValueError(f"data.dataset_mixture.datasets[{i}].weight={source.weight} ({source.id}): a weight is "
                             "the fraction of the source's rows to keep, in (0, 1]")
    columns = {tuple(sorted(s.columns)) for s in value.datasets if s.columns is not None}
    if len(columns) > 1:
        raise ValueError(f"data.dataset_mixture: the sources keep different columns {sorted(columns)}; name the same "
                         "columns in every source (the mixture is one table)")
    names = source_names(value)
    if len(set(names)) < len(names):
        raise ValueError(f"data.dataset_mixture: sources share a name ({names}); give each a distinct `name`")
    size = value.test_split_size
    if size is not None and not (0 < size < 1 or (float(size).is_integer() and size >= 1)):
        raise ValueError(f"data.dataset_mixture.test_split_size={size}: use a fraction in (0, 1) or a row count")
    return value


def _from_dict(cls: type, values: dict, key: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{key}: unknown key(s) {unknown}; the keys are {sorted(known)}")
    return cls(**values)


def source_names(mixture: DatasetMixture) -> list[str]:
    """Each source's name for ``train/loss/<name>`` (see :class:`MixtureSource`), in config order."""
    def base(s: MixtureSource) -> str:
        stem = os.path.basename(s.id.rstrip("/"))
        stem = os.path.splitext(stem)[0] if os.path.splitext(stem)[1] in (".json", ".jsonl", ".parquet", ".csv") \
            else stem
        return stem + (f"-{s.config}" if s.config else "")

    names = [s.name or base(s) for s in mixture.datasets]
    return [n if s.name or names.count(n) == 1 else f"{n}-{s.split}" for n, s in zip(names, mixture.datasets)]


def load_mixture(mixture: DatasetMixture) -> Any:
    """Load and mix the sources as open-r1's ``get_dataset`` does (see the module docstring).

    Returns:
        A ``datasets.DatasetDict`` with ``train`` (and ``test`` with ``test_split_size``); every row has the
        source's columns (the named ``columns``) plus :data:`SOURCE_COLUMN` (int, the source's index).

    Raises:
        ValueError: a source lacks a named column, or keeps no row at its weight.
    """
    import datasets

    names = source_names(mixture)
    parts = []
    for k, source in enumerate(mixture.datasets):
        rows = load_split(source.id, source.split, source.config)
        if source.columns is not None:
            missing = sorted(set(source.columns) - set(rows.column_names))
            if missing:
                raise ValueError(f"data.dataset_mixture.datasets[{k}] ({source.id}): no column(s) {missing}; it has "
                                 f"{rows.column_names}")
            rows = rows.select_columns(source.columns)
        total = len(rows)
        keep = int(total * source.weight)
        if keep == 0:
            raise ValueError(f"data.dataset_mixture.datasets[{k}] ({source.id}): weight {source.weight} of "
                             f"{total} rows keeps no row")
        rows = rows.shuffle(seed=mixture.seed).select(range(keep))
        parts.append(rows.add_column(SOURCE_COLUMN, [k] * keep))
        log.info("mixture source %s (%s, %s, %s): %d of %d rows (weight %s)", names[k], source.id, source.config,
                 source.split, keep, total, source.weight)
    mixed = datasets.concatenate_datasets(parts).shuffle(seed=mixture.seed)
    if mixture.test_split_size is None:
        return datasets.DatasetDict({"train": mixed})
    size = mixture.test_split_size
    return mixed.train_test_split(test_size=int(size) if size >= 1 else size, seed=mixture.seed)
