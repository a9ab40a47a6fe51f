"""The rows of a data set as one Arrow table, for counting and packing without a Python object
per token; and the columns of a data set, streamed or not.

``Dataset.data`` is the whole table underneath: after ``filter``, ``select``, ``shuffle`` or
``train_test_split`` a data set is that table plus an indices mapping, so reading ``.data``
directly sees rows that are not in the data set (and in another order).
"""

from __future__ import annotations

import pyarrow as pa
from datasets import Dataset, IterableDataset


def visible_rows(dataset: Dataset) -> pa.Table:
    """The rows ``dataset`` holds, in its order: a zero-copy slice when it has no indices
    mapping, a ``take`` of the mapped rows when it has one."""
    return dataset.with_format("arrow")[:]


def column_names(dataset: Dataset | IterableDataset) -> list[str]:
    """A data set's columns; a stream whose features are not known shows its first row's."""
    names = dataset.column_names
    if names is None:
        names = list(next(iter(dataset.take(1)), {}))
    return list(names)


__all__ = ["column_names", "visible_rows"]
