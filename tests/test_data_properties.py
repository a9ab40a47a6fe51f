"""Invariants of preparation over generated files: nothing lost, nothing invented, lines right."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft_plugins.data import load_sft_dataset, messages_from_row
from sft_plugins.errors import DataError

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
answer = text.filter(lambda s: bool(s.strip()))


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, str]]:
    """user/assistant turns, optionally after a system message; the last assistant non-empty."""
    turns = draw(st.integers(1, 3))
    messages = [{"role": "system", "content": draw(text)}] if draw(st.booleans()) else []
    for turn in range(turns):
        messages.append({"role": "user", "content": draw(text)})
        messages.append({"role": "assistant",
                         "content": draw(answer if turn == turns - 1 else text)})
    return messages


def as_format(messages: list[dict[str, str]], format_name: str) -> dict[str, Any]:
    if format_name == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": names[m["role"]], "value": m["content"]}
                                  for m in messages]}
    if format_name == "prompt_completion":
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    return {"messages": messages}


def write(directory: str, rows: list[str | None]) -> Path:
    """One line per row; ``None`` is a blank line."""
    path = Path(directory) / "data.jsonl"
    path.write_text("".join((row if row is not None else "  ") + "\n" for row in rows))
    return path


@PROPERTY_SETTINGS
@given(st.lists(st.tuples(conversations(), st.booleans()), min_size=1, max_size=8),
       st.sampled_from(["messages", "sharegpt", "prompt_completion"]))
def test_messages_and_lines_survive_preparation(rows: list[tuple[list[dict[str, str]], bool]],
                                                format_name: str) -> None:
    lines: list[str | None] = []
    expected_lines = []
    for messages, blank_before in rows:
        if blank_before:
            lines.append(None)
        lines.append(json.dumps(as_format(messages, format_name)))
        expected_lines.append(len(lines))
    with tempfile.TemporaryDirectory() as directory:
        data = load_sft_dataset(write(directory, lines), cache_dir=directory)
        assert [messages_from_row(r) for r in data.train] == [m for m, _ in rows]
        assert [r["source_line"] for r in data.train] == expected_lines
        assert [r["source_row"] for r in data.train] == list(range(len(rows)))
        if format_name == "prompt_completion":
            assert [r["completion_index"] for r in data.train] == [len(m) - 1 for m, _ in rows]


BAD_ROWS = st.sampled_from([
    "not json",
    json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
    json.dumps({"messages": [{"role": "narrator", "content": "x"},
                             {"role": "assistant", "content": "y"}]}),
    json.dumps({"messages": [{"role": "user", "content": 7},
                             {"role": "assistant", "content": "y"}]}),
])


@PROPERTY_SETTINGS
@given(st.lists(st.one_of(conversations().map(lambda m: ("good", json.dumps({"messages": m}))),
                          BAD_ROWS.map(lambda line: ("bad", line))), min_size=1, max_size=12))
def test_skip_keeps_exactly_the_good_rows_and_counts_the_rest(rows: list[tuple[str, str]]) -> None:
    good_lines = [i + 1 for i, (kind, _) in enumerate(rows) if kind == "good"]
    bad_lines = [i + 1 for i, (kind, _) in enumerate(rows) if kind == "bad"]
    with tempfile.TemporaryDirectory() as directory:
        path = write(directory, [line for _, line in rows])
        if not good_lines:  # a file-level error: nothing to train on, or no JSON object at all
            with pytest.raises(DataError, match=r"every train example was skipped|none of the "
                                                r"first examples is a JSON object"):
                load_sft_dataset(path, on_bad_example="skip", cache_dir=directory)
            return
        data = load_sft_dataset(path, on_bad_example="skip", cache_dir=directory)
        split = data.summary.splits[0]
        assert [r["source_line"] for r in data.train] == good_lines
        assert (split.examples, split.kept, split.skipped_total) == (
            len(rows), len(good_lines), len(bad_lines))
        if bad_lines:
            with pytest.raises(DataError, match=rf"^{path}:{bad_lines[0]}: "):
                load_sft_dataset(path, cache_dir=directory)


cell = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=20)


@PROPERTY_SETTINGS
@given(st.lists(st.tuples(cell.filter(str.strip), cell, cell.filter(str.strip)), min_size=1,
                max_size=6))
def test_csv_cells_survive_exactly(rows: list[tuple[str, str, str]]) -> None:
    """Any text in an Alpaca CSV (commas, quotes, newlines, "NA", digits) comes back as written;
    only an empty cell is missing."""
    import csv

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "alpaca.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["instruction", "input", "output"])
            writer.writerows(rows)
        data = load_sft_dataset(path, cache_dir=directory)
        assert [messages_from_row(r) for r in data.train] == [
            [{"role": "user", "content": f"{i}\n\n{x}" if x.strip() else i},
             {"role": "assistant", "content": o}] for i, x, o in rows]
