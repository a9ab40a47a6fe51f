"""What preparation did with each split: examples read, kept, and skipped for which reason."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sft_plugins.bad_examples import QUOTED
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

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

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
            lines.extend(f"    {sample}" for sample in s.samples[:5])
        return "\n".join(lines)
