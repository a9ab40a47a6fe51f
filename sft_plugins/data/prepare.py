"""Loading, canonicalising and validating SFT data: :func:`load_sft_dataset`.

Each piece of a source (one file, or one in-memory data set) goes through one batched
``Dataset.map`` that reads each example, converts it to canonical form and checks it: the
generic rules of :func:`sft_plugins.data.formats.check_conversation`, then the chat template's
own ``validate``. A bad example does not stop the map; it becomes a row with its reason and
message in two working columns. Afterwards Arrow compute finds the bad rows without reading the
good ones into Python: with ``on_bad_example="error"`` the first is raised as a ``DataError``
(file:line or example index, field, expectation, and how many more there are), with ``"skip"``
they are counted per reason and dropped. Results stay memory-mapped Arrow throughout.

``streaming=True`` does the same work while training reads the data: each piece becomes a
``datasets.IterableDataset`` whose batched ``map`` runs the same converter and checks, raises the
first bad example (naming its file and line) under ``"error"``, or drops it and counts it
(:class:`~sft_plugins.bad_examples.StreamCounts`, shown in the split's summary as it fills)
under ``"skip"``. Nothing is read before training but each file's first example, which says its
format.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from datasets import (
    Dataset,
    DatasetDict,
    IterableDataset,
    IterableDatasetDict,
    concatenate_datasets,
)
from datasets.fingerprint import Hasher

from sft_plugins._version import code_fingerprint
from sft_plugins.bad_examples import (
    QUOTED,
    CountingMapFunction,
    OnBadExample,
    StreamCounts,
    count_skips,
    describe_location,
    merge_counts,
)
from sft_plugins.cache_files import cached_step
from sft_plugins.data.formats import (
    CANONICALISERS,
    FORMAT_COLUMNS,
    check_conversation,
    detect_format,
    kind_of,
    message_field,
    missing_columns,
    normalise_format,
)
from sft_plugins.data.schema import (
    BAD_MESSAGE,
    BAD_REASON,
    CONVERSATION_FEATURES,
    TEXT_FEATURES,
    Kind,
    features_for,
    messages_from_row,
)
from sft_plugins.data.sources import (
    RAW,
    RAW_FEATURES,
    Piece,
    Source,
    load_pieces,
    loads_strict,
    rename,
    stream_pieces,
)
from sft_plugins.data.summary import DataSummary, SplitSummary
from sft_plugins.errors import DataError, SkipExample, TemplateError
from sft_plugins.processes import tokenizers_parallelism_kept

logger = logging.getLogger(__name__)

PARALLEL_MIN_ROWS = 20_000
"""Below this many rows one process prepares faster than starting workers."""


class ValidatingTemplate(Protocol):
    """What preparation needs of a chat template: ``validate`` raising ``TemplateError``."""

    def validate(self, messages: list[dict[str, Any]], *,
                 tools: list[dict[str, Any]] | None = None) -> None: ...


@dataclass
class SFTData:
    """Prepared training (and evaluation) data, all rows valid, with the preparation summary."""

    train: Dataset | IterableDataset
    """Memory-mapped rows, or with ``streaming=True`` a stream validated as it is read."""
    eval: Dataset | IterableDataset | None
    kind: Kind
    """``"conversation"`` (render with a chat template) or ``"text"`` (no template)."""
    summary: DataSummary

    def as_dataset_dict(self) -> DatasetDict | IterableDatasetDict:
        splits = {"train": self.train}
        if self.eval is not None:
            splits["eval"] = self.eval
        if isinstance(self.train, IterableDataset):
            return IterableDatasetDict(splits)
        return DatasetDict(splits)


def load_sft_dataset(
    train_dataset: Source | Sequence[str | os.PathLike[str]],
    *,
    format: str | None = None,
    column_map: Mapping[str, str] | None = None,
    template: ValidatingTemplate | None = None,
    on_bad_example: OnBadExample = "error",
    split: str = "train",
    eval_dataset: Source | Sequence[str | os.PathLike[str]] | None = None,
    eval_split: str | None = None,
    eval_split_ratio: float | None = None,
    seed: int = 42,
    num_proc: int | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | None = None,
    streaming: bool = False,
) -> SFTData:
    """Load, canonicalise and validate training (and evaluation) data before training starts.

    ``train_dataset`` / ``eval_dataset``: a path to a JSONL, JSON, Parquet, CSV or TSV file, a
    glob, a directory, a list of those, a ``Dataset``, a ``DatasetDict`` (``split`` /
    ``eval_split`` pick the split), or a name ``datasets.load_dataset`` accepts.
    ``format``: one of :data:`~sft_plugins.data.formats.FORMAT_COLUMNS` (detected from the
    columns when ``None``); ``column_map`` renames source columns to the names the format uses.
    ``template``: a chat template whose ``validate`` checks every conversation.
    ``on_bad_example``: ``"error"`` raises a ``DataError`` for the first bad example;
    ``"skip"`` drops bad examples, logs a summary and, with ``output_dir``, writes it to
    ``data_summary.json`` there. ``eval_split_ratio`` holds out that fraction of the training
    data (after validation, shuffled with ``seed``) when no ``eval_dataset`` is given.
    ``num_proc``: worker processes for preparation (default: every core, for large pieces).
    ``streaming=True``: ``train`` and ``eval`` are ``datasets.IterableDataset`` streams, each
    example read, converted and checked while training reads it, under the same
    ``on_bad_example`` policy (an error then stops training at that example; skips are counted
    in :attr:`SFTData.summary` as they are met). A ``datasets.IterableDataset`` source is
    accepted only then. ``eval_split_ratio`` needs the whole data set and is refused.
    """
    if on_bad_example not in ("error", "skip"):
        raise DataError(f"on_bad_example={on_bad_example!r}; expected 'error' or 'skip'")
    if eval_dataset is not None and eval_split_ratio is not None:
        raise DataError("pass eval_dataset or eval_split_ratio, not both")
    if streaming and eval_split_ratio is not None:
        raise DataError("eval_split_ratio holds out a fraction of the validated examples, which "
                        "a stream does not know before it is read; with streaming=True "
                        "(--streaming) pass eval_dataset (--eval_dataset) instead")
    if eval_split_ratio is not None and not 0 < eval_split_ratio < 1:
        raise DataError(f"eval_split_ratio={eval_split_ratio}; expected a number between 0 and 1")
    options = _Options(format=_format_option(format), column_map=dict(column_map or {}),
                       template=template, on_bad_example=on_bad_example, num_proc=num_proc,
                       cache_dir=cache_dir)
    summary = DataSummary(on_bad_example=on_bad_example)
    prepare = _stream_split if streaming else _prepare_split
    train, kind = prepare("train", train_dataset, split, options, summary)
    evaluation = None
    if eval_dataset is not None:
        evaluation, eval_kind = prepare("eval", eval_dataset, _eval_split(eval_dataset,
                                        eval_split), options, summary)
        if eval_kind != kind:
            raise DataError(f"the training data is {kind} data but the evaluation data is "
                            f"{eval_kind} data; both must use the same kind of format")
    elif eval_split_ratio is not None:
        train, evaluation = _hold_out(train, eval_split_ratio, seed, summary)
    if summary.skipped_total:
        logger.warning("skipped %d bad examples (on_bad_example='skip'):\n%s",
                       summary.skipped_total, summary.render())
    if output_dir is not None and on_bad_example == "skip":
        summary.write_json(output_dir)
    return SFTData(train=train, eval=evaluation, kind=kind, summary=summary)


@dataclass(frozen=True)
class _Options:
    format: str | None
    column_map: dict[str, str]
    template: ValidatingTemplate | None
    on_bad_example: OnBadExample
    num_proc: int | None
    cache_dir: str | None


def _format_option(name: str | None) -> str | None:
    if name is None:
        return None
    try:
        return normalise_format(name)
    except ValueError as exc:
        raise DataError(str(exc)) from None


def _eval_split(source: object, eval_split: str | None) -> str:
    """The split to evaluate on: as given, else a DatasetDict's evaluation split, else train."""
    if eval_split is not None:
        return eval_split
    if isinstance(source, DatasetDict):
        return next((s for s in ("validation", "eval", "test") if s in source), "validation")
    return "train"


def _prepare_split(split_name: str, source: Any, split: str, options: _Options,
                   summary: DataSummary) -> tuple[Dataset, Kind]:
    pieces = load_pieces(source, split=split, cache_dir=options.cache_dir)
    plans, record = _plan_split(split_name, pieces, options, summary)
    prepared = [_prepare_piece(piece, fmt, kind, options, record)
                for piece, (fmt, kind) in zip(pieces, plans, strict=True)]
    dataset = prepared[0] if len(prepared) == 1 else concatenate_datasets(prepared)
    if len(dataset) == 0:
        raise DataError(f"every {split_name} example was skipped as bad:\n{summary.render()}")
    return dataset, record.kind


def _plan_split(split_name: str, pieces: list[Piece], options: _Options,
                summary: DataSummary) -> tuple[list[tuple[str, Kind]], SplitSummary]:
    """Every piece's format and kind (one kind for the split), and the split's summary."""
    plans = [_plan(piece, options) for piece in pieces]
    kinds = {kind for _, kind in plans}
    if len(kinds) > 1:
        described = ", ".join(f"{p.name} ({fmt}, {kind})"
                              for p, (fmt, kind) in zip(pieces, plans, strict=True))
        raise DataError(f"the {split_name} files mix conversation and text formats: {described}. "
                        "Use one kind of format per split.")
    formats = sorted({fmt for fmt, _ in plans})
    record = SplitSummary(split=split_name, sources=[p.name for p in pieces],
                          format="+".join(formats), kind=next(iter(kinds)))
    summary.splits.append(record)
    return plans, record


def _stream_split(split_name: str, source: Any, split: str, options: _Options,
                  summary: DataSummary) -> tuple[IterableDataset, Kind]:
    """The split as one stream: each piece (one shard) validated by a batched map, in order."""
    pieces = stream_pieces(source, split=split, cache_dir=options.cache_dir)
    plans, record = _plan_split(split_name, pieces, options, summary)
    record.streaming = True
    counts = [StreamCounts(f"{split_name} data") for _ in pieces]
    record.count_with(counts)
    streams = []
    for piece, (fmt, kind), piece_counts in zip(pieces, plans, counts, strict=True):
        validate = _StreamValidator(
            _Canonicaliser(piece.name, fmt, kind, options.column_map, options.template,
                           piece.raw),
            options.on_bad_example, record, piece_counts, counts)
        streams.append(piece.dataset.map(
            validate, batched=True, with_indices=True,
            features=CONVERSATION_FEATURES if kind == "conversation" else TEXT_FEATURES,
            remove_columns=list(RAW_FEATURES) if piece.raw else list(piece.columns)))
    return (streams[0] if len(streams) == 1 else concatenate_datasets(streams)), record.kind


class _StreamValidator(CountingMapFunction):
    """The batched map function of a streamed piece: :class:`_Canonicaliser` on the batch,
    then the bad-example policy at once: raise the first bad example, or drop and count the
    bad ones (in the piece's :class:`StreamCounts`, which the split's summary adds up)."""

    def __init__(self, canonicalise: _Canonicaliser, on_bad_example: OnBadExample,
                 record: SplitSummary, counts: StreamCounts,
                 split_counts: list[StreamCounts]) -> None:
        self.canonicalise = canonicalise
        self.on_bad_example = on_bad_example
        self.record = record
        self.counts = counts
        self.split_counts = split_counts

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out = self.canonicalise(batch, indices)
        reasons, messages = out.pop(BAD_REASON), out.pop(BAD_MESSAGE)
        bad = [i for i, reason in enumerate(reasons) if reason is not None]
        if bad and self.on_bad_example == "error":
            raise DataError(f"{messages[bad[0]]}. Fix the data, or pass on_bad_example='skip' "
                            "(--on_bad_example skip) to drop bad examples and report them.")
        self.counts.add(indices[0] if indices else 0, len(reasons),
                        [reasons[i] for i in bad], [messages[i] for i in bad])
        self.record.set_counts(merge_counts([c.counts for c in self.split_counts]))
        if not bad:
            return out
        kept = [i for i, reason in enumerate(reasons) if reason is None]
        return {column: [values[i] for i in kept] for column, values in out.items()}


def _plan(piece: Piece, options: _Options) -> tuple[str, Kind]:
    """The format and kind of one piece, or a ``DataError`` saying which columns are missing."""
    columns = rename(piece.columns, options.column_map)
    first = None if piece.first_example is None else {
        options.column_map.get(k, k): v for k, v in piece.first_example.items()}
    where = f"{piece.name}" + (" (first example)" if piece.raw else "")
    if options.format is not None:
        missing = missing_columns(options.format, columns)
        if missing:
            raise DataError(f"{where}: format {options.format!r} needs the column(s) "
                            f"{', '.join(missing)}, but the data has "
                            f"{', '.join(columns) or 'none'}. Rename them with column_map "
                            "(--column_map) or choose another format.")
        return options.format, kind_of(options.format, first)
    if piece.raw and first is None:
        why = f" (the first, {piece.first_problem})" if piece.first_problem else ""
        raise DataError(f"{piece.name}: none of the first examples is a JSON object{why}; "
                        "expected one JSON object per example")
    detected = detect_format(columns)
    if detected is None:
        needs = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in FORMAT_COLUMNS.items())
        raise DataError(f"{where}: cannot tell the data set format from the columns "
                        f"{', '.join(columns) or '(none)'}. Each format needs: {needs}. "
                        "Rename columns with column_map or pass format= (--dataset_format).")
    return detected, kind_of(detected, first)


def _prepare_piece(piece: Piece, format_name: str, kind: Kind, options: _Options,
                   record: SplitSummary) -> Dataset:
    function = _Canonicaliser(piece.name, format_name, kind, options.column_map,
                              options.template, piece.raw)
    num_proc = options.num_proc
    if num_proc is None:
        num_proc = _cores() if len(piece.dataset) >= PARALLEL_MIN_ROWS else 1
    num_proc = min(num_proc, len(piece.dataset))
    fingerprint = Hasher.hash([piece.dataset._fingerprint, format_name, kind,
                               sorted(options.column_map.items()),
                               _template_fingerprint(options.template),
                               code_fingerprint(*getattr(options.template, "checks", ()))])
    with tokenizers_parallelism_kept():
        dataset = cached_step(lambda load: piece.dataset.map(
            function, batched=True, with_indices=True, features=features_for(kind),
            remove_columns=piece.dataset.column_names,
            num_proc=num_proc if num_proc > 1 else None,  # 1 would still start a worker pool
            new_fingerprint=fingerprint, load_from_cache_file=load,
            desc=f"Preparing {os.path.basename(piece.name)}"), None, piece.name)
    record.examples += len(dataset)
    dataset = _drop_bad(dataset, piece.name, options.on_bad_example, record)
    record.kept += len(dataset)
    return dataset


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _template_fingerprint(template: object) -> str:
    if template is None:
        return "none"
    try:
        return Hasher.hash(template)
    except Exception:  # unpicklable templates fall back to their identity
        return repr((type(template).__qualname__, getattr(template, "name", None),
                     getattr(template, "source", None)))


def _drop_bad(dataset: Dataset, name: str, on_bad_example: OnBadExample,
              record: SplitSummary) -> Dataset:
    """Raise for, or count and drop, the rows the map marked bad; then drop the working columns."""
    bad = count_skips(dataset.data.column(BAD_REASON))
    if bad.total:
        messages = dataset.data.column(BAD_MESSAGE).take(bad.positions[:QUOTED]).to_pylist()
        if on_bad_example == "error":
            more = (f" {bad.total - 1} more bad example(s) in {name}." if bad.total > 1 else "")
            raise DataError(f"{messages[0]}.{more} Fix the data, or pass on_bad_example='skip' "
                            "(--on_bad_example skip) to drop bad examples and report them.")
        record.add_skipped(bad.counts, [str(m) for m in messages])
        dataset = dataset.select(np.setdiff1d(np.arange(len(dataset)), bad.positions))
    return dataset.remove_columns([BAD_REASON, BAD_MESSAGE])


def _hold_out(train: Dataset, ratio: float, seed: int,
              summary: DataSummary) -> tuple[Dataset, Dataset]:
    try:
        parts = train.train_test_split(test_size=ratio, seed=seed, shuffle=True)
    except ValueError as exc:
        raise DataError(f"eval_split_ratio={ratio} cannot split {len(train)} examples: {exc}") \
            from None
    train_record = summary.splits[0]
    summary.splits.append(SplitSummary(split="eval", sources=[f"{ratio:g} of train"],
                                       format=train_record.format, kind=train_record.kind,
                                       examples=len(parts["test"]), kept=len(parts["test"])))
    return parts["train"], parts["test"]


class _Canonicaliser:
    """The batched map function: raw or typed rows in, canonical rows (or bad marks) out.

    A class rather than a closure so that worker processes receive it by pickling.
    """

    def __init__(self, source_file: str, format_name: str, kind: Kind,
                 column_map: dict[str, str], template: ValidatingTemplate | None,
                 raw: bool) -> None:
        self.source_file = source_file
        self.format_name = format_name
        self.kind = kind
        self.column_map = column_map
        self.template = template if kind == "conversation" else None
        self.raw = raw
        self.convert = CANONICALISERS[(format_name, kind)]
        self.columns = tuple(features_for(kind))

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {column: [] for column in self.columns}
        lines = batch["source_line"] if self.raw else [None] * len(indices)
        for position, (row, line) in enumerate(zip(indices, lines, strict=True)):
            try:
                fields = self._canonical(batch, position)
                reason = message = None
            except SkipExample as bad:
                fields, reason = self._empty(), bad.reason
                message = f"{describe_location(self.source_file, row, line)}: {bad}"
            fields.update(source_file=self.source_file, source_row=row, source_line=line)
            fields[BAD_REASON], fields[BAD_MESSAGE] = reason, message
            for column in self.columns:
                out[column].append(fields[column])
        return out

    def _canonical(self, batch: dict[str, list[Any]], position: int) -> dict[str, Any]:
        example = self._example(batch, position)
        fields = self.convert(example)
        if self.kind == "conversation":
            check_conversation(self.format_name, fields["messages"], fields["completion_index"])
            if self.template is not None:
                self._validate_with_template(self.template, fields)
        return fields

    def _validate_with_template(self, template: ValidatingTemplate,
                                fields: dict[str, Any]) -> None:
        """The template's own rules; its complaint becomes a bad example naming the field."""
        tools = None if fields["tools"] is None else json.loads(fields["tools"])
        try:
            template.validate(messages_from_row(fields), tools=tools)
        except TemplateError as exc:
            index = getattr(exc, "message_index", None)
            field = ("" if index is None else
                     message_field(self.format_name, index, fields["completion_index"]))
            raise SkipExample(_template_reason(template, exc), str(exc), field=field) from None

    def _example(self, batch: dict[str, list[Any]], position: int) -> dict[str, Any]:
        if not self.raw:
            return {self.column_map.get(k, k): v[position] for k, v in batch.items()}
        try:
            value = loads_strict(batch[RAW][position])
        except UnicodeDecodeError:
            raise SkipExample("invalid_json", "the line is not valid UTF-8", field="(line)",
                              expected="one JSON object per line, UTF-8 encoded") from None
        except ValueError as exc:
            raise SkipExample("invalid_json", f"not valid JSON ({exc})", field="(line)",
                              expected="one JSON object per line") from None
        if not isinstance(value, dict):
            unit = "line" if batch["source_line"][position] is not None else "array element"
            raise SkipExample("invalid_json", f"a JSON {type(value).__name__}", field=f"({unit})",
                              expected=f"one JSON object per {unit}")
        return {self.column_map.get(k, k): v for k, v in value.items()}

    def _empty(self) -> dict[str, Any]:
        if self.kind == "conversation":
            return {"messages": [], "tools": None, "completion_index": None}
        return {"text": "", "completion_offset": None}


def _template_reason(template: object, exc: TemplateError) -> str:
    """A reason code for a template's complaint: its ``rule`` if it gives one, else its text.

    Digits are replaced so that the same rule broken at different message indices counts once.
    """
    name = getattr(template, "name", type(template).__name__)
    rule = getattr(exc, "rule", None) or re.sub(r"\d+", "N", str(exc).split(";")[0])[:100]
    return f"template {name}: {rule}"


__all__ = ["OnBadExample", "SFTData", "ValidatingTemplate", "load_sft_dataset"]
