"""What was kept and skipped of each split, and why: the one summary of bad examples.

Reading and validating the data (:mod:`sft_plugins.data.prepare`) fills a :class:`SplitSummary`
per split; the trainer adds what labelling skipped (too long, nothing left to train...) with
:meth:`DataSummary.add_preparation`. Both go to one file, ``data_summary.json``, in the output
directory.

A streamed split is validated while training reads it, so its summary fills as the stream is
read (:meth:`SplitSummary.set_counts`); ``streaming`` says so, and the trainer writes the file
again once training ends.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sft_plugins.bad_examples import PRINTED, QUOTED, PassCounts, StreamCounts
from sft_plugins.data.schema import Kind
from sft_plugins.files import write_text_atomically

SUMMARY_FILE = "data_summary.json"


@dataclass
class SplitSummary:
    """One split (``train`` or ``eval``): its sources, format and what was skipped."""

    split: str
    sources: list[str]
    format: str
    kind: Kind
    examples: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    """Full messages (location, field, problem, expectation) of the first skipped examples."""
    preparation: dict[str, Any] | None = None
    """What labelling kept of the examples read (``total``, ``kept``, ``skipped`` by reason,
    ``first_skips``), once the trainer has prepared the split."""
    streaming: bool = False
    """Validated while training read it: the counts are those of the examples read (one pass
    over the data, once training has read that far; summed over the ranks that read disjoint
    parts)."""

    @property
    def skipped_total(self) -> int:
        """Examples skipped by the data rules and, once prepared, by labelling."""
        labelling = self.preparation["skipped"].values() if self.preparation else ()
        return sum(self.skipped.values()) + sum(labelling)

    def __post_init__(self) -> None:
        self._counters: list[StreamCounts] = []

    def count_with(self, counters: list[StreamCounts]) -> None:
        """The counters of a streamed split's pieces, which :meth:`restart_counts` resets."""
        self._counters = counters

    def restart_counts(self) -> None:
        """Count a streamed split from zero: whatever read it before training (a look at its
        first rows) is forgotten, so each piece is counted by the process that trains on it."""
        for counter in self._counters:
            counter.reset()
        self.set_counts(PassCounts())

    def set_counts(self, counts: PassCounts) -> None:
        """Take a stream's counts so far (:class:`~sft_plugins.bad_examples.StreamCounts`)."""
        self.examples, self.kept = counts.examples, counts.kept
        self.skipped, self.samples = dict(counts.skipped), list(counts.samples[:QUOTED])

    def counts(self) -> PassCounts:
        """The data rules' counts of this split, as a stream's are kept."""
        return PassCounts(self.examples, self.kept, dict(self.skipped), list(self.samples))

    def add_skipped(self, counts: dict[str, int], samples: list[str]) -> None:
        for reason, count in counts.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        self.samples.extend(samples[: QUOTED - len(self.samples)])


@dataclass
class DataSummary:
    """Every split's summary; printed before training and written to the output directory."""

    on_bad_example: str
    splits: list[SplitSummary] = field(default_factory=list)

    @property
    def skipped_total(self) -> int:
        return sum(s.skipped_total for s in self.splits)

    def add_preparation(self, split: str, report: Any, kind: Kind = "conversation") -> None:
        """Record what labelling kept of ``split`` (a ``PreparationReport``); a split the data
        loader did not read (a data set passed to the trainer as is) gets its own entry."""
        record = next((s for s in self.splits if s.split == split), None)
        if record is None:
            rows = report.total if report.rows is None else report.rows
            record = SplitSummary(split=split, sources=["given to the trainer"], format="rows",
                                  kind=kind, examples=rows, kept=rows)
            self.splits.append(record)
        record.preparation = {"total": report.total, "kept": report.kept,
                              "skipped": dict(report.skipped),
                              "first_skips": list(report.first_skips)}
        if report.rows is not None:
            record.preparation["expanded_from_rows"] = report.rows

    def to_dict(self) -> dict[str, object]:
        return {"on_bad_example": self.on_bad_example,
                "splits": [{**asdict(s), "skipped_total": s.skipped_total} for s in self.splits]}

    def write_json(self, output_dir: str | Path) -> Path:
        """Write the summary as ``data_summary.json`` in ``output_dir`` (created if needed)."""
        directory = Path(output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        return write_text_atomically(directory / SUMMARY_FILE,
                                     json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
                                     + "\n")

    def render(self) -> str:
        """A few human-readable lines: per split, kept and skipped by reason, then samples."""
        lines = []
        for s in self.splits:
            lines.append(f"{s.split}: {s.kept} of {s.examples} examples kept ({s.format} format, "
                         f"{', '.join(s.sources)})")
            for reason, count in sorted(s.skipped.items(), key=lambda item: -item[1]):
                lines.append(f"  skipped {count}: {reason}")
            lines.extend(f"    {sample}" for sample in s.samples[:PRINTED])
            if s.preparation is not None:
                kept, total = s.preparation["kept"], s.preparation["total"]
                lines.append(f"  labelling kept {kept} of {total}")
                for reason, count in sorted(s.preparation["skipped"].items()):
                    lines.append(f"  skipped {count}: {reason}")
        return "\n".join(lines)
