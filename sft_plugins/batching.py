"""Batching prepared examples: padded to the batch's widest, or packed into full rows.

Every batch of prepared rows (``input_ids``, ``labels``, maybe ``loss_weights``) is built here,
so one module says what a pad is: the pad token, label ``IGNORE_INDEX``, weight 0
(:func:`pad_batch`). The masking collators add an attention mask to padded rows;
:class:`PackedCollator` adds position ids to packed ones.

Packing, without cross-contamination: padding a batch to its longest example computes attention
and MLPs on pads; on a data set whose lengths are skewed (many short answers, a few long ones)
most of a padded batch can be pads. Packing puts several whole examples into each row of
``max_length`` tokens instead, chosen best-fit decreasing (longest example first, into the
fullest row it still fits, else a new row), which fills rows to within a few percent of
``max_length`` on realistic length distributions.

Three things keep a packed example exactly what it was on its own:

- ``position_ids`` restart at 0 at each example, so rotary positions are the example's own;
- the batch carries no ``attention_mask``: given ``position_ids``, no mask and no cache (the
  forward must get ``use_cache=False``, as the trainer passes it), transformers (5.x,
  ``masking_utils.find_packed_sequence_indices``) starts a new sequence wherever a position is not
  its predecessor + 1 and builds a block-diagonal causal mask for SDPA and eager attention;
  FlashAttention 2/3 turn the same ``position_ids`` into varlen ``cu_seqlens``;
- the label of each example's first token is ``IGNORE_INDEX`` (weight 0): the loss shifts labels
  by one, so that label is the target of the previous example's last token. Unpacked, the first
  label is never a target, so the loss of every example is unchanged (tested to float32
  round-off).

Rows of a batch are padded to the batch's widest with pad tokens whose ``position_ids`` again
restart at 0: the pads form their own sequence, attend only to themselves and carry no loss.

An example longer than ``max_length`` is rejected with a :class:`~sft_plugins.errors.DataError`:
set the collator's ``max_length`` (its ``truncation`` rule then cuts or drops it during
preparation) to at most the packing length.

A stream (``datasets.IterableDataset``) cannot be sorted whole: :class:`StreamPacker` packs it
best-fit decreasing over each buffer of the next ``buffer_size`` examples, the same packer on a
bounded window, so memory stays bounded whatever the stream's length; its fill is a little
below the whole-data-set packer's (``benchmarks/streaming.py`` measures both on the same data).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, IterableDataset, List, Value

from sft_plugins.arrow_rows import column_names, visible_rows
from sft_plugins.bad_examples import CountingMapFunction
from sft_plugins.errors import DataError, MaskingError
from sft_plugins.loss import IGNORE_INDEX, WEIGHTS_KEY

logger = logging.getLogger(__name__)

PACKED_COLUMNS = ("input_ids", "labels", WEIGHTS_KEY)
"""Per-token columns carried into the packed rows (``loss_weights`` only when present)."""


# ------------------------------------------------------------------------ padding ---------


def pad_batch(features: Sequence[Mapping[str, Any]], pad_token_id: int, *,
              pad_to_multiple_of: int | None = None,
              padding_side: Literal["right", "left"] = "right"
              ) -> tuple[dict[str, torch.Tensor], list[slice]]:
    """``input_ids`` (pads: the pad token), ``labels`` (pads: ``IGNORE_INDEX``) and, when any
    row has them, ``loss_weights`` (pads: 0; rows without: 1 where labelled) as tensors, and the
    columns each row's real tokens occupy. Shared by the padding and the packing collators."""
    lengths = [len(f["input_ids"]) for f in features]
    width = _padded_width(max(lengths), pad_to_multiple_of)
    shape = (len(features), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    weights = (torch.zeros(shape, dtype=torch.float32)
               if any(WEIGHTS_KEY in f for f in features) else None)
    rows = [slice(0, n) if padding_side == "right" else slice(width - n, width)
            for n in lengths]
    for row, (feature, cols) in enumerate(zip(features, rows, strict=True)):
        input_ids[row, cols] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
        labels[row, cols] = torch.as_tensor(feature["labels"], dtype=torch.long)
        if weights is not None:
            weights[row, cols] = _row_weights(feature, labels[row, cols])
    batch = {"input_ids": input_ids, "labels": labels}
    if weights is not None:
        batch[WEIGHTS_KEY] = weights
    return batch, rows


def _padded_width(longest: int, multiple: int | None) -> int:
    return -(-longest // multiple) * multiple if multiple else longest


def _row_weights(feature: Mapping[str, Any], labels: torch.Tensor) -> torch.Tensor:
    """A row's own weights, or 1 where it is labelled (a row prepared without weights)."""
    if WEIGHTS_KEY in feature:
        return torch.as_tensor(feature[WEIGHTS_KEY])
    return labels.ne(IGNORE_INDEX).float()


# ------------------------------------------------------------------------ packing ---------


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
    if order:
        _check_fits(order[0], lengths[order[0]], capacity)
    bins: list[list[int]] = []
    rooms = _OpenBins()
    for item in order:
        size = lengths[item]
        if size == 0:
            raise DataError(f"example {item} has no tokens; prepared rows cannot be empty")
        target, room = rooms.take(size)
        if target is None:
            target, room = len(bins), capacity
            bins.append([])
        bins[target].append(item)
        rooms.put(room - size, target)
    return bins


def _check_fits(item: int, length: int, capacity: int) -> None:
    if length > capacity:
        raise DataError(
            f"example {item} has {length} tokens, more than the packing max_length "
            f"{capacity}; set the collator's max_length to at most {capacity} (its truncation "
            f"rule then cuts or drops long examples during preparation)")


class _OpenBins:
    """The bins that still have room, by remaining room: the sorted distinct rooms, and the
    bins with each."""

    def __init__(self) -> None:
        self.rooms: list[int] = []
        self.bins: dict[int, list[int]] = {}

    def take(self, size: int) -> tuple[int | None, int]:
        """The bin with the least room that still fits ``size``, and its room; ``None`` (and 0)
        when no open bin does. The bin is no longer open until :meth:`put` back."""
        at = bisect.bisect_left(self.rooms, size)
        if at == len(self.rooms):
            return None, 0
        room = self.rooms[at]
        target = self.bins[room].pop()
        if not self.bins[room]:
            del self.bins[room]
            self.rooms.pop(at)
        return target, room

    def put(self, room: int, target: int) -> None:
        """Open ``target`` with ``room`` left (a full bin stays closed)."""
        if room <= 0:
            return
        if room not in self.bins:
            self.bins[room] = []
            bisect.insort(self.rooms, room)
        self.bins[room].append(target)


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
    weight) of each example's first token becomes ``IGNORE_INDEX`` (0), which the shifted loss
    never used
    unpacked. Work is done on Arrow buffers with numpy, not per token in Python.
    """
    _check_prepared(dataset.column_names)
    table, report = pack_table(visible_rows(dataset), max_length)
    return Dataset(table), report


def _check_prepared(columns: Sequence[str]) -> None:
    missing = [c for c in ("input_ids", "labels") if c not in columns]
    if missing:
        raise DataError(f"packing needs prepared rows with input_ids and labels; missing "
                        f"{', '.join(missing)}. Prepare the data set with the collator first")


def pack_table(table: pa.Table, max_length: int) -> tuple[pa.Table, PackingReport]:
    """:func:`pack_dataset` on an Arrow table of prepared rows (all of them in one packing)."""
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    bins = best_fit_decreasing(lengths.tolist(), max_length)
    layout = _Layout.of(lengths, bins)
    arrays = {name: _packed_column(table, name, layout)
              for name in PACKED_COLUMNS if name in table.column_names}
    arrays["position_ids"] = pa.ListArray.from_arrays(
        pa.array(layout.row_offsets), pa.array(layout.positions.astype(np.int32),
                                               type=pa.int32()))
    report = PackingReport(examples=len(lengths), rows=len(bins), tokens=layout.total,
                           max_length=max_length)
    return pa.table(arrays), report


@dataclass(frozen=True)
class _Layout:
    """Where every example goes in the packed rows."""

    order: np.ndarray
    """Example indices, row after row."""
    example_starts: np.ndarray
    """The first token of each example (in ``order``) among all packed tokens."""
    row_offsets: np.ndarray
    positions: np.ndarray
    """Each packed token's position within its example."""
    total: int

    @classmethod
    def of(cls, lengths: np.ndarray, bins: list[list[int]]) -> _Layout:
        order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(lengths))
        ordered_lengths = lengths[order].astype(np.int64)
        example_starts = np.cumsum(ordered_lengths) - ordered_lengths
        total = int(ordered_lengths.sum())
        row_offsets = np.concatenate(
            [[0], np.cumsum([int(lengths[b].sum()) for b in bins])]).astype(np.int32)
        positions = np.arange(total, dtype=np.int64) - np.repeat(example_starts, ordered_lengths)
        return cls(order, example_starts, row_offsets, positions, total)


_FIRST_TOKEN_VALUES = {"labels": IGNORE_INDEX, WEIGHTS_KEY: 0.0}
"""What a packed example's first token gets in each column: the previous example's last token
predicts it, which the shifted loss never did unpacked."""


def _packed_column(table: pa.Table, name: str, layout: _Layout) -> pa.Array:
    """One per-token column, its examples in packed order, cut into the packed rows."""
    values, _ = _flat(table.column(name).take(pa.array(layout.order)))
    if values.shape[0] != layout.total:
        raise DataError(f"column {name!r} does not have one entry per token of input_ids")
    if name in _FIRST_TOKEN_VALUES:
        values = values.copy()
        values[layout.example_starts] = _FIRST_TOKEN_VALUES[name]
    value_type = table.schema.field(name).type.value_type
    return pa.ListArray.from_arrays(pa.array(layout.row_offsets),
                                    pa.array(values, type=value_type))


def pack_prepared(dataset: Dataset, max_length: int | None) -> Dataset:
    """:func:`pack_dataset` for the trainer: ``max_length`` is the packing length, or else the
    collator's; the report is logged."""
    if max_length is None:
        raise DataError("packing needs a row length: pass packing_max_length, or give the "
                        "collator a max_length")
    packed, report = pack_dataset(dataset, max_length)
    logger.warning("train: %s", report.summary())
    return packed


DEFAULT_PACKING_BUFFER = 1000
"""Examples a stream is packed over at a time (:class:`StreamPacker`): enough for best-fit
decreasing to fill rows almost as full as packing the whole data set (measured in
``benchmarks/streaming.py``), few enough to hold (a thousand token lists)."""

_STREAM_TYPES = {"input_ids": pa.list_(pa.int32()), "labels": pa.list_(pa.int32()),
                 WEIGHTS_KEY: pa.list_(pa.float32())}
_STREAM_FEATURES = {"input_ids": List(Value("int32")), "labels": List(Value("int32")),
                    WEIGHTS_KEY: List(Value("float32")), "position_ids": List(Value("int32"))}
"""The columns of a packed stream, declared: ``datasets`` cannot infer a mapped stream's."""


class StreamPacker(CountingMapFunction):
    """The batched ``IterableDataset.map`` function that packs a stream: each batch of the next
    ``buffer_size`` prepared examples is packed best-fit decreasing (:func:`pack_table`) into
    rows of at most ``max_length`` tokens, which leave before the next batch is read. Memory
    is one buffer; :meth:`report` adds up what has been packed so far (its fill, against
    :func:`pack_dataset`'s on the whole data, is what the bounded buffer costs)."""

    def __init__(self, max_length: int, buffer_size: int = DEFAULT_PACKING_BUFFER) -> None:
        if buffer_size < 1:
            raise DataError(f"packing buffer_size must be a positive number of examples, got "
                            f"{buffer_size}")
        self.max_length = max_length
        self.buffer_size = buffer_size
        self.examples = self.rows = self.tokens = 0

    def __call__(self, batch: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
        _check_prepared(list(batch))
        table = pa.table({name: pa.array(batch[name], type=_STREAM_TYPES[name])
                          for name in PACKED_COLUMNS if name in batch})
        packed, report = pack_table(table, self.max_length)
        self.examples += report.examples
        self.rows += report.rows
        self.tokens += report.tokens
        return packed.to_pydict()

    def report(self) -> PackingReport:
        return PackingReport(examples=self.examples, rows=self.rows, tokens=self.tokens,
                             max_length=self.max_length)


def pack_stream(stream: IterableDataset, max_length: int | None,
                buffer_size: int = DEFAULT_PACKING_BUFFER
                ) -> tuple[IterableDataset, StreamPacker]:
    """:class:`StreamPacker` over a prepared stream, for the trainer: ``max_length`` is the
    packing length, or else the collator's."""
    if max_length is None:
        raise DataError("packing needs a row length: pass packing_max_length, or give the "
                        "collator a max_length")
    packer = StreamPacker(max_length, buffer_size)
    columns = column_names(stream)
    features = Features({name: feature for name, feature in _STREAM_FEATURES.items()
                         if name in columns or name == "position_ids"})
    return stream.map(packer, batched=True, batch_size=buffer_size, features=features,
                      remove_columns=columns), packer


@dataclass
class PackedCollator:
    """Pad packed rows into a batch of ``input_ids``, ``position_ids``, ``labels`` (and
    ``loss_weights`` when any row has them), with no ``attention_mask``.

    A row without ``position_ids`` (an unpacked example, say in evaluation) is one sequence
    numbered from 0. Pads are ``pad_token_id`` with positions restarting at 0, label
    ``IGNORE_INDEX``, weight 0: a sequence of their own that no real token attends to.
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


__all__ = ["DEFAULT_PACKING_BUFFER", "PackedCollator", "PackingReport", "StreamPacker",
           "best_fit_decreasing", "pack_dataset", "pack_prepared", "pack_stream", "pack_table",
           "pad_batch"]
