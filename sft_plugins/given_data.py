"""Data sets given to the trainer as they are: the collator they get when none is named, and
the rows it takes as already tokenized.

``SFTPluginTrainer`` (and ``sft-plugins train``, through :mod:`sft_plugins.training`) labels a
``datasets.Dataset`` or ``IterableDataset`` with a collator, picked here from the columns when
none is named (:func:`default_collator_name`). Anything else, and rows that carry
``input_ids``, are taken as tokenized: :func:`check_taken_as_prepared` refuses rows that are not,
and :func:`labels_from_token_masks` turns TRL's token-mask columns into labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow.compute as pc
from datasets import Dataset, IterableDataset

from sft_plugins.arrow_rows import column_names, visible_rows
from sft_plugins.errors import DataError
from sft_plugins.loss import IGNORE_INDEX


def check_taken_as_prepared(dataset: Any, split: str) -> None:
    """Rows the trainer will not prepare (not a ``datasets`` data set) must already be
    tokenized: conversations would otherwise reach the collator and fail there, at step 1,
    with a bare ``KeyError``."""
    try:
        first = dataset[0] if len(dataset) else None
    except (TypeError, KeyError, IndexError, NotImplementedError):  # not indexable: unchecked
        return
    if isinstance(first, Mapping) and "input_ids" not in first:
        keys = ", ".join(map(str, first)) or "none"
        raise DataError(
            f"{split}: a {type(dataset).__name__} is used as it is, as tokenized rows (only a "
            f"datasets.Dataset or IterableDataset is tokenized and masked), but its first row "
            f"has no 'input_ids' (its keys: {keys}); pass datasets.Dataset.from_list(rows), or "
            "load_sft_dataset(...).train")


DEFAULT_COLLATOR_SAMPLE = 100
"""How many leading rows :func:`default_collator_name` reads for a completion index or offset."""


def default_collator_name(dataset: Any) -> str:
    """The collator a training set gets when none is named, by the library and the CLI alike.

    ``completion-only`` for prompt/completion data: TRL's ``prompt`` and ``completion``
    columns (message lists or strings), or rows of :mod:`sft_plugins.data` whose
    ``completion_index`` (conversations from prompt/completion or Alpaca data) or
    ``completion_offset`` (string prompt/completion) is set in one of the first
    :data:`DEFAULT_COLLATOR_SAMPLE` rows. ``all-tokens`` for other plain ``text``.
    ``assistant-only`` for other conversations (``messages``), for pre-tokenized rows, and
    without a ``datasets.Dataset`` or ``IterableDataset`` (``None``). Columns are looked at
    in the order the collators read a row: ``messages``, then ``prompt``/``completion``, then
    ``text``. A stream's first rows are read for it (and read again when training starts).
    """
    columns = (set(column_names(dataset)) if isinstance(dataset, (Dataset, IterableDataset))
               else set())
    if "messages" in columns:
        return ("completion-only" if _any_set(dataset, "completion_index")
                else "assistant-only")
    if {"prompt", "completion"} <= columns:
        return "completion-only"
    if "text" in columns:
        return "completion-only" if _any_set(dataset, "completion_offset") else "all-tokens"
    return "assistant-only"


def _any_set(dataset: Dataset | IterableDataset, column: str) -> bool:
    """Whether ``column`` is non-null in one of the first rows of ``dataset``."""
    if column not in column_names(dataset):
        return False
    if isinstance(dataset, IterableDataset):
        return any(row[column] is not None for row in dataset.take(DEFAULT_COLLATOR_SAMPLE))
    head = dataset.select(range(min(len(dataset), DEFAULT_COLLATOR_SAMPLE)))
    return any(value is not None for value in head[column])


TOKEN_MASK_COLUMNS = ("assistant_masks", "completion_mask")
"""Pre-tokenized columns (TRL's names) whose 1s mark the tokens to learn."""


def labels_from_token_masks(dataset: Dataset | IterableDataset,
                            split: str) -> Dataset | IterableDataset:
    """``dataset`` with ``labels``: kept when present, else ``input_ids`` where a token-mask
    column is 1 and -100 elsewhere; a :class:`DataError` when neither column is there. A
    stream gets its labels as it is read."""
    columns = column_names(dataset)
    if "labels" in columns:
        return dataset
    mask = next((c for c in TOKEN_MASK_COLUMNS if c in columns), None)
    if mask is None:
        raise DataError(f"{split} rows have input_ids but no labels column; add labels (-100 "
                        f"where nothing is learned) or a 0/1 {' or '.join(TOKEN_MASK_COLUMNS)} "
                        "column, or pass conversations and let the collator tokenize them")

    def label(row: dict[str, Any]) -> dict[str, Any]:
        if len(row[mask]) != len(row["input_ids"]):
            raise DataError(f"{split} rows: {mask} has {len(row[mask])} entries for "
                            f"{len(row['input_ids'])} input_ids; they must be one per token")
        return {"labels": [t if m else IGNORE_INDEX
                           for t, m in zip(row["input_ids"], row[mask], strict=True)]}

    if isinstance(dataset, IterableDataset):  # no progress bar to describe
        return dataset.map(label, remove_columns=[mask])
    return dataset.map(label, remove_columns=[mask], desc=f"{split}: labels from {mask}")


def trained_token_summary(dataset: Dataset) -> str:
    """Tokens, trained tokens and trained fraction of a prepared data set, read from Arrow."""
    labels = pc.list_flatten(visible_rows(dataset).column("labels"))
    total = len(labels)
    trained = total - pc.sum(pc.equal(labels, IGNORE_INDEX)).as_py() if total else 0
    fraction = trained / total if total else 0.0
    return f"{total} tokens, {trained} trained ({fraction:.1%})"


__all__ = ["DEFAULT_COLLATOR_SAMPLE", "TOKEN_MASK_COLUMNS", "check_taken_as_prepared",
           "default_collator_name", "labels_from_token_masks", "trained_token_summary"]
