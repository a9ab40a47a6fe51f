"""The one policy for examples that cannot be trained on, wherever that is found out.

An example can fail when its data set is read (a missing field, bad JSON), when its chat
template checks it (an unknown role) or when its collator labels it (no trained token, longer
than ``max_length``). Every stage raises :class:`~sft_plugins.errors.SkipExample` with a short
``reason``, marks the row with that reason in a string column (``None`` for a kept row), and
settles the whole column the same way: under ``on_bad_example="error"`` the first bad example
stops the run, naming where it came from; under ``"skip"`` the examples are counted by reason,
the first few quoted, and dropped.

A streamed data set (``datasets.IterableDataset``) is settled batch by batch while training
reads it, with the same policy; :class:`StreamCounts` keeps its counts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger(__name__)

OnBadExample = Literal["error", "skip"]
POLICIES: tuple[str, ...] = ("error", "skip")

QUOTED = 20
"""How many skipped examples a count keeps in full, for ``data_summary.json`` (the counts cover
all of them)."""
PRINTED = 5
"""How many of those the log prints."""


def describe_location(source_file: str, source_row: int, source_line: int | None) -> str:
    """``file:line`` for JSON Lines, ``file, example index N`` for everything else."""
    if source_line is not None:
        return f"{source_file}:{source_line}"
    return f"{source_file}, example index {source_row}"


def location_of(row: Mapping[str, Any], index: int | None = None) -> str:
    """Where a row came from: its provenance columns (written by :mod:`sft_plugins.data`) when
    it has them, else ``example N``, its position in the data set it was given in."""
    if row.get("source_file") is None:
        return f"example {index}"
    return describe_location(row["source_file"], row.get("source_row", index),
                             row.get("source_line"))


@dataclass
class SkipCount:
    """The bad rows of one column of reasons: how many per reason, and where they are."""

    counts: dict[str, int] = field(default_factory=dict)
    positions: list[int] = field(default_factory=list)
    """Row positions of every bad example, in order."""

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def describe_counts(counts: Mapping[str, int]) -> str:
    """``"2 too_long, 1 invalid"``: skipped examples counted by reason."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


def count_skips(reasons: pa.Array | pa.ChunkedArray) -> SkipCount:
    """Count the non-null entries of a column of reasons (``None``: the row is kept) in Arrow,
    so that a million kept rows never become a million Python objects."""
    bad = pc.is_valid(reasons)
    if not (pc.sum(bad).as_py() or 0):
        return SkipCount()
    counts = pc.value_counts(pc.drop_null(reasons)).to_pylist()
    return SkipCount({str(c["values"]): int(c["counts"]) for c in counts},
                     pc.indices_nonzero(bad).to_pylist())


@dataclass
class PassCounts:
    """What one pass over a stream met: examples read, kept, skipped per reason, the first
    skipped quoted in full."""

    examples: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    rows: int = 0
    """Rows read: as many as ``examples``, unless a row becomes several examples."""

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


class StreamCounts:
    """Skips counted while a stream is read, batch by batch, by the map function that settles
    them (the counts live in the process that iterates the stream).

    A stream is read from its start again in every epoch, and a peek at its head (to choose a
    default collator, say) reads its first rows: counting every read would count a bad example
    once per pass. A ``datasets`` map function sees its indices start at 0 again with each new
    pass, so the counts are kept per pass and :attr:`counts` is the pass that read furthest:
    once a pass has finished, every example counted once. ``label`` prefixes the warnings that
    quote each of the first :data:`QUOTED` skips as they are met.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.reset()

    def reset(self) -> None:
        """Forget what was read so far (a look at the stream before training read it)."""
        self._current = PassCounts()
        self._furthest = PassCounts()

    def add(self, first_index: int, examples: int, reasons: Sequence[str],
            samples: Sequence[str], rows: int | None = None) -> None:
        """Count one batch: ``examples`` read from stream position ``first_index`` on (from
        ``rows`` rows, if not one each), of which those with ``reasons`` were skipped
        (``samples``: their messages, in order)."""
        if first_index == 0 and self._current.examples:
            self._furthest = self.counts
            self._current = PassCounts()
        current = self._current
        current.examples += examples
        current.rows += examples if rows is None else rows
        current.kept += examples - len(reasons)
        for reason in reasons:
            current.skipped[reason] = current.skipped.get(reason, 0) + 1
        for sample in samples[:QUOTED - len(current.samples)]:
            current.samples.append(sample)
            if self._current.examples > self._furthest.examples:
                logger.warning("%s: skipped %s", self.label, sample)

    @property
    def counts(self) -> PassCounts:
        """The counts of the pass that read the most examples (a copy)."""
        best = max(self._current, self._furthest, key=lambda c: c.examples)
        return replace(best, skipped=dict(best.skipped), samples=list(best.samples))


class CountingMapFunction:
    """Base of the batched ``IterableDataset.map`` functions that count what a stream holds
    (skips, packed rows) as it is read. ``datasets`` deep-copies the pipelines it concatenates,
    and a copy would count where nobody looks: a copy of such a function is the function."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self


def merge_counts(counts: Sequence[PassCounts]) -> PassCounts:
    """The counts of several disjoint parts of a stream (one per rank) as one."""
    merged = PassCounts()
    for part in counts:
        merged.examples += part.examples
        merged.kept += part.kept
        merged.rows += part.rows
        for reason, n in part.skipped.items():
            merged.skipped[reason] = merged.skipped.get(reason, 0) + n
        merged.samples.extend(part.samples[:QUOTED - len(merged.samples)])
    return merged


__all__ = ["POLICIES", "QUOTED", "CountingMapFunction", "OnBadExample", "PassCounts",
           "SkipCount", "StreamCounts", "count_skips", "describe_counts", "describe_location",
           "location_of", "merge_counts"]
