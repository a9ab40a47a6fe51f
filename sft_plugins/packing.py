"""Packing prepared examples into rows of ``max_length`` tokens, without cross-contamination.

Padding a batch to its longest example computes attention and MLPs on pads; on a data set whose
lengths are skewed (many short answers, a few long ones) most of a padded batch can be pads.
Packing puts several whole examples into each row instead, chosen best-fit decreasing (longest
example first, into the fullest row it still fits, else a new row), which fills rows to within a
few percent of ``max_length`` on realistic length distributions.

Three things keep a packed example exactly what it was on its own:

- ``position_ids`` restart at 0 at each example, so rotary positions are the example's own;
- the batch carries no ``attention_mask``: given ``position_ids``, no mask and no cache (the
  forward must get ``use_cache=False``, as the trainer passes it), transformers (5.x,
  ``masking_utils.find_packed_sequence_indices``) starts a new sequence wherever a position is not
  its predecessor + 1 and builds a block-diagonal causal mask for SDPA and eager attention;
  FlashAttention 2/3 turn the same ``position_ids`` into varlen ``cu_seqlens``;
- the label of each example's first token is ``-100`` (weight 0): the loss shifts labels by one,
  so that label is the target of the previous example's last token. Unpacked, the first label is
  never a target, so the loss of every example is unchanged (tested to float32 round-off).

Rows of a batch are padded to the batch's widest with pad tokens whose ``position_ids`` again
restart at 0: the pads form their own sequence, attend only to themselves and carry no loss.

An example longer than ``max_length`` is rejected with a :class:`~sft_plugins.errors.DataError`:
set the collator's ``max_length`` (its ``truncation`` rule then cuts or drops it during
preparation) to at most the packing length.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset

from sft_plugins.arrow_rows import visible_rows
from sft_plugins.errors import DataError, MaskingError
from sft_plugins.masking import IGNORE_INDEX, pad_batch

logger = logging.getLogger(__name__)

PACKED_COLUMNS = ("input_ids", "labels", "loss_weights")
"""Per-token columns carried into the packed rows (``loss_weights`` only when present)."""


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of total length at most ``capacity``, best-fit decreasing.

    Items are placed longest first, each into the open bin with the least room that still fits
    it (a new bin when none does). Open bins are kept by remaining room (at most ``capacity``
    distinct values), so placing an item is a binary search. Within a bin, items keep the order
    they were placed in. Raises :class:`DataError` for an item longer than ``capacity``.
    """
    if capacity < 1:
        raise DataError(f"packing max_length must be a positive number of tokens, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if order and lengths[order[0]] > capacity:
        first = order[0]
        raise DataError(
            f"example {first} has {lengths[first]} tokens, more than the packing max_length "
            f"{capacity}; set the collator's max_length to at most {capacity} (its truncation "
            f"rule then cuts or drops long examples during preparation)")
    bins: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct remaining rooms of open bins
    open_bins: dict[int, list[int]] = {}  # room -> indices of open bins with that room
    for item in order:
        size = lengths[item]
        if size == 0:
            raise DataError(f"example {item} has no tokens; prepared rows cannot be empty")
        at = bisect.bisect_left(rooms, size)
        if at == len(rooms):
            target, room = len(bins), capacity
            bins.append([])
        else:
            room = rooms[at]
            target = open_bins[room].pop()
            if not open_bins[room]:
                del open_bins[room]
                rooms.pop(at)
        bins[target].append(item)
        room -= size
        if room > 0:
            if room not in open_bins:
                open_bins[room] = []
                bisect.insort(rooms, room)
            open_bins[room].append(target)
    return bins


@dataclass(frozen=True)
class PackingReport:
    """What packing did: examples in, rows out, and how full the rows are."""

    examples: int
    rows: int
    tokens: int
    max_length: int

    @property
    def fill(self) -> float:
        """Real tokens over ``rows * max_length``."""
        return self.tokens / (self.rows * self.max_length) if self.rows else 0.0

    def summary(self) -> str:
        return (f"packed {self.examples} examples into {self.rows} rows of at most "
                f"{self.max_length} tokens ({self.fill:.1%} full)")


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """The values and the ``len + 1`` offsets of a list column, as numpy."""
    array = column.combine_chunks()
    if isinstance(array, pa.ChunkedArray):  # pyarrow < 15 may keep one chunk as a ChunkedArray
        array = array.chunk(0) if array.num_chunks else pa.array([], type=column.type)
    offsets = np.asarray(array.offsets, dtype=np.int64)
    values = np.asarray(array.values.to_numpy(zero_copy_only=False))
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]


def pack_dataset(dataset: Dataset, max_length: int) -> tuple[Dataset, PackingReport]:
    """Pack prepared rows (``input_ids``, ``labels``, optional ``loss_weights``) into rows of at
    most ``max_length`` tokens with ``position_ids`` restarting at each example.

    Every token is kept exactly once, each example contiguous and in order; the label (and
    weight) of each example's first token becomes ``-100`` (0), which the shifted loss never used
    unpacked. Work is done on Arrow buffers with numpy, not per token in Python.
    """
    missing = [c for c in ("input_ids", "labels") if c not in dataset.column_names]
    if missing:
        raise DataError(f"packing needs prepared rows with input_ids and labels; missing "
                        f"{', '.join(missing)}. Prepare the data set with the collator first")
    columns = [c for c in PACKED_COLUMNS if c in dataset.column_names]
    table = visible_rows(dataset)
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    bins = best_fit_decreasing(lengths.tolist(), max_length)
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(lengths))
    ordered_lengths = lengths[order].astype(np.int64)
    example_starts = np.cumsum(ordered_lengths) - ordered_lengths
    total = int(ordered_lengths.sum())
    row_offsets = np.concatenate(
        [[0], np.cumsum([int(lengths[b].sum()) for b in bins])]).astype(np.int32)
    positions = np.arange(total, dtype=np.int64) - np.repeat(example_starts, ordered_lengths)
    arrays: dict[str, pa.Array] = {}
    indices = pa.array(order)
    for name in columns:
        values, _ = _flat(table.column(name).take(indices))
        if values.shape[0] != total:
            raise DataError(f"column {name!r} does not have one entry per token of input_ids")
        if name == "labels":
            values = values.copy()
            values[example_starts] = IGNORE_INDEX
        elif name == "loss_weights":
            values = values.copy()
            values[example_starts] = 0.0
        value_type = table.schema.field(name).type.value_type
        arrays[name] = pa.ListArray.from_arrays(pa.array(row_offsets),
                                                pa.array(values, type=value_type))
    arrays["position_ids"] = pa.ListArray.from_arrays(
        pa.array(row_offsets), pa.array(positions.astype(np.int32), type=pa.int32()))
    packed = Dataset(pa.table(arrays))
    report = PackingReport(examples=len(lengths), rows=len(bins), tokens=total,
                           max_length=max_length)
    return packed, report


def pack_prepared(dataset: Dataset, max_length: int | None) -> Dataset:
    """:func:`pack_dataset` for the trainer: ``max_length`` is the packing length, or else the
    collator's; the report is logged."""
    if max_length is None:
        raise DataError("packing needs a row length: pass packing_max_length, or give the "
                        "collator a max_length")
    packed, report = pack_dataset(dataset, max_length)
    logger.warning("train: %s", report.summary())
    return packed


@dataclass
class PackedCollator:
    """Pad packed rows into a batch of ``input_ids``, ``position_ids``, ``labels`` (and
    ``loss_weights`` when any row has them), with no ``attention_mask``.

    A row without ``position_ids`` (an unpacked example, say in evaluation) is one sequence
    numbered from 0. Pads are ``pad_token_id`` with positions restarting at 0, label ``-100``,
    weight 0: a sequence of their own that no real token attends to.
    """

    pad_token_id: int | None
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if self.pad_token_id is None:
            raise MaskingError("PackedCollator has no pad token id: bind the masking collator "
                               "to the tokenizer first (collator.prepare or collator.bind)")
        batch, rows = pad_batch(features, self.pad_token_id,
                                pad_to_multiple_of=self.pad_to_multiple_of)
        width = batch["input_ids"].shape[1]
        position_ids = torch.zeros_like(batch["input_ids"])
        for row, (feature, cols) in enumerate(zip(features, rows, strict=True)):
            n = cols.stop
            given = feature.get("position_ids")
            position_ids[row, :n] = (torch.arange(n) if given is None
                                     else torch.as_tensor(given, dtype=torch.long))
            position_ids[row, n:] = torch.arange(width - n)
        batch["position_ids"] = position_ids
        return batch


__all__ = ["PackedCollator", "PackingReport", "best_fit_decreasing", "pack_dataset",
           "pack_prepared"]
