"""The one policy for examples that cannot be trained on, wherever that is found out.

An example can fail when its data set is read (a missing field, bad JSON), when its chat
template checks it (an unknown role) or when its collator labels it (no trained token, longer
than ``max_length``). Every stage raises :class:`~sft_plugins.errors.SkipExample` with a short
``reason``, marks the row with that reason in a string column (``None`` for a kept row), and
settles the whole column the same way: under ``on_bad_example="error"`` the first bad example
stops the run, naming where it came from; under ``"skip"`` the examples are counted by reason,
the first few quoted, and dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

OnBadExample = Literal["error", "skip"]
POLICIES: tuple[str, ...] = ("error", "skip")

QUOTED = 20
"""How many skipped examples a count quotes in full (the counts cover all of them)."""


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


__all__ = ["POLICIES", "QUOTED", "OnBadExample", "SkipCount", "count_skips",
           "describe_counts", "describe_location", "location_of"]
