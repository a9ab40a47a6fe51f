"""Labelling a whole data set once, before training: the ``datasets.map`` driver and its report.

:meth:`MaskingCollator.prepare` runs :func:`~sft_plugins.masking.labeller.label_rows` (what
:func:`~sft_plugins.masking.label_examples` gives, as flat token columns) on every batch inside
``datasets.map`` (``num_proc`` and the ``datasets`` cache work), settles every example it
could not label with the one bad-example policy (:mod:`sft_plugins.bad_examples`): raise, naming
where the example came from, or mark it, count it by reason and drop it. The report says what was
kept and skipped before training starts.

A stream (``datasets.IterableDataset``) is labelled while training reads it: :func:`prepare_stream`
maps :class:`StreamLabeller`, which runs the same :func:`label_batch` on each batch, settles its
skips at once (raise, or count and drop) and keeps its report up to date as the stream is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Features, IterableDataset, List, Value
from datasets.fingerprint import Hasher, generate_random_fingerprint, is_caching_enabled

from sft_plugins._version import code_fingerprint
from sft_plugins.arrow_rows import column_names
from sft_plugins.bad_examples import (
    PRINTED,
    QUOTED,
    CountingMapFunction,
    StreamCounts,
    count_skips,
    describe_counts,
    location_of,
)
from sft_plugins.cache_files import cached_step
from sft_plugins.errors import MaskingError, SkipExample
from sft_plugins.loss import WEIGHTS_KEY
from sft_plugins.masking.labeller import label_rows, without_cycle_collection
from sft_plugins.masking.labels import LabelledTokens
from sft_plugins.processes import tokenizers_parallelism_kept

if TYPE_CHECKING:
    import datasets

    from sft_plugins.masking.collator import MaskingCollator
    from sft_plugins.templates import ChatTemplate

SKIP_COLUMN = "skip_reason"
"""Column of the mapped (not yet filtered) data set: why a row is skipped, null if kept."""
DETAIL_COLUMN = "skip_detail"
"""The skipped row's full message (where it came from, the reason, what was wrong)."""

COUNTED_ONLY = ("too_long", "truncated_away")
"""Reasons counted whatever ``on_bad_example`` says: the collator's own truncation rule asked
for the skip (a ``strict`` collator raises for ``truncated_away``)."""


@dataclass
class PreparationReport:
    """What preparation did: how many examples it kept, and every skip, counted by reason."""

    total: int
    kept: int
    skipped: dict[str, int] = field(default_factory=dict)
    first_skips: list[str] = field(default_factory=list)
    """The messages of the first skipped examples (where it came from, what was wrong), as
    many as ``data_summary.json`` keeps; the log prints the first few."""
    rows: int | None = None
    """How many rows the examples came from, when the collator's ``expand`` option split
    conversations into one example per assistant turn (``None``: one example per row)."""

    def skip_counts(self) -> str:
        """``"2 too_long, 1 invalid"``: the skipped examples counted by reason."""
        return describe_counts(self.skipped)

    def summary(self) -> str:
        """One paragraph for the log, printed before training starts."""
        line = f"prepared {self.kept} of {self.total} examples"
        if self.rows is not None:
            line += f" (expanded from {self.rows} rows, one example per assistant turn)"
        if not self.skipped:
            return line + "; none skipped"
        return "\n  ".join([f"{line}; skipped {self.total - self.kept}: {self.skip_counts()}",
                            *self.first_skips[:PRINTED]])


@dataclass
class PreparedDataset:
    """A prepared data set (``input_ids``, ``labels``, maybe ``loss_weights``) and its report
    (for a stream, one that fills as the stream is read)."""

    dataset: datasets.Dataset | datasets.IterableDataset
    report: PreparationReport


def prepare_dataset(collator: MaskingCollator, dataset: datasets.Dataset, tokenizer: Any,
                    template: ChatTemplate | None, *, num_proc: int | None, batch_size: int,
                    load_from_cache_file: bool | None, desc: str | None) -> PreparedDataset:
    """:meth:`MaskingCollator.prepare`: bind, label every batch, count and drop the skips."""
    collator.bind(tokenizer, template)
    fn_kwargs = {"collator": collator, "tokenizer": tokenizer, "template": template}
    # the cache key: the rows, the code (the package's, and the files of the collator's
    # classes and the template's checks), the collator with its options, the tokenizer and the
    # template with its variables. Hashing the tokenizer serialises all
    # of it (0.15 s for a 128 256-entry vocabulary), so only data that ``datasets`` caches
    # (read from files, caching on) pays for it; other results get the random fingerprint
    # ``datasets`` gives whatever it does not cache
    checks = getattr(template, "checks", ())
    fingerprint = (Hasher.hash([dataset._fingerprint, label_batch, fn_kwargs, batch_size,
                                code_fingerprint(collator, *checks)])
                   if is_caching_enabled() and dataset.cache_files
                   else generate_random_fingerprint())
    with tokenizers_parallelism_kept():
        mapped = cached_step(lambda load: dataset.map(
            label_batch, batched=True, batch_size=batch_size, with_indices=True,
            num_proc=num_proc, remove_columns=dataset.column_names, load_from_cache_file=load,
            desc=desc, fn_kwargs=fn_kwargs, new_fingerprint=fingerprint),
            load_from_cache_file, "labelling")
        return _drop_skipped(mapped, num_proc, load_from_cache_file,
                             rows=len(dataset) if collator.expand != "off" else None)


def label_batch(batch: Mapping[str, list[Any]], indices: Sequence[int], *,
                collator: MaskingCollator, tokenizer: Any,
                template: ChatTemplate | None) -> pa.Table:
    """The ``datasets.map`` function: :func:`~sft_plugins.masking.labeller.label_rows` on the
    batch's rows, as an Arrow table with explicit column types (``datasets`` would otherwise
    scan every value to infer them), one row per example (a row the collator expands gives
    several); a skipped example is empty, with its reason and message. Python's cycle
    collector waits until the batch's objects are gone
    (:func:`~sft_plugins.masking.labeller.without_cycle_collection`)."""
    with without_cycle_collection():
        return _labelled_table(batch, indices, collator, tokenizer, template)


def _labelled_table(batch: Mapping[str, list[Any]], indices: Sequence[int],
                    collator: MaskingCollator, tokenizer: Any,
                    template: ChatTemplate | None) -> pa.Table:
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    labelled = label_rows(collator, rows, tokenizer, template)
    kept = np.diff(labelled.tokens.offsets).tolist()
    lengths: list[int] = []  # tokens of every example, kept or skipped (none)
    reasons: list[str | None] = []
    details: list[str | None] = []
    for index, row, results in zip(indices, rows, labelled.rows, strict=True):
        for part, result in enumerate(results, 1):
            if not isinstance(result, SkipExample):
                lengths.append(kept[result])
                reasons.append(None)
                details.append(None)
                continue
            where = location_of(row, index)
            if len(results) > 1:
                where += f", turn {part} of {len(results)}"
            _settle(collator, result, where)
            lengths.append(0)
            reasons.append(result.reason)
            details.append(f"{where}: {result.reason}: {result}")
    return _table(labelled.tokens, lengths, reasons, details)


def _table(tokens: LabelledTokens, lengths: list[int], reasons: list[str | None],
           details: list[str | None]) -> pa.Table:
    """The map's output, built on the flat token columns as they are (the kept examples' tokens
    in order; a skipped example is an empty list): converting a Python list per example cost
    as much as labelling the batch."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    bounds = pa.array(offsets)
    columns = {"input_ids": pa.ListArray.from_arrays(bounds, pa.array(tokens.input_ids)),
               "labels": pa.ListArray.from_arrays(bounds, pa.array(tokens.labels))}
    if tokens.loss_weights is not None:
        columns[WEIGHTS_KEY] = pa.ListArray.from_arrays(
            bounds, pa.array(tokens.loss_weights.astype(np.float32)))
    columns[SKIP_COLUMN] = pa.array(reasons, type=pa.string())
    columns[DETAIL_COLUMN] = pa.array(details, type=pa.string())
    return pa.table(columns)


def _settle(collator: MaskingCollator, skip: SkipExample, where: str) -> None:
    """Raise for a skip the collator's options do not allow; return for one to count."""
    if skip.reason == "truncated_away" and collator.strict:
        raise MaskingError(f"{where}: {skip} (strict mode)") from skip
    if skip.reason in COUNTED_ONLY or collator.on_bad_example == "skip":
        return
    cause = skip.__cause__
    kind = type(cause) if cause is not None and not isinstance(cause, SkipExample) \
        else MaskingError
    raise kind(f"{where}: {skip}. Fix the example, or skip such examples with "
               "on_bad_example='skip'") from (cause or skip)


def _drop_skipped(mapped: datasets.Dataset, num_proc: int | None,
                  load_from_cache_file: bool | None, *, rows: int | None) -> PreparedDataset:
    """Count the marked rows in Arrow (a million kept rows never become a million Python
    strings), quote the first, drop them and the marks."""
    bad = count_skips(mapped.data.column(SKIP_COLUMN))
    first_skips: list[str] = []
    total = len(mapped)
    if bad.total:
        first_skips = mapped.data.column(DETAIL_COLUMN).take(
            bad.positions[:QUOTED]).to_pylist()
        marked = mapped
        mapped = cached_step(lambda load: marked.filter(
            _kept, input_columns=SKIP_COLUMN, batched=True, num_proc=num_proc,
            load_from_cache_file=load), load_from_cache_file, "dropping skipped examples")
    mapped = mapped.remove_columns([SKIP_COLUMN, DETAIL_COLUMN])
    report = PreparationReport(total=total, kept=len(mapped), skipped=bad.counts,
                               first_skips=first_skips, rows=rows)
    return PreparedDataset(mapped, report)


def _kept(reasons: list[str | None]) -> list[bool]:
    return [reason is None for reason in reasons]


def labelled_features(weighted: bool) -> Features:
    """The declared columns of a labelled stream (``datasets`` cannot infer a mapped stream's,
    and the collator and the packer need them)."""
    features = {"input_ids": List(Value("int32")), "labels": List(Value("int32"))}
    if weighted:
        features[WEIGHTS_KEY] = List(Value("float32"))
    return Features(features)


def prepare_stream(collator: MaskingCollator, dataset: IterableDataset, tokenizer: Any,
                   template: ChatTemplate | None, *, batch_size: int,
                   split: str = "train") -> PreparedDataset:
    """:meth:`MaskingCollator.prepare` for a stream: bind, then label each batch of
    ``batch_size`` rows as training reads it. The report fills as the stream is read."""
    collator.bind(tokenizer, template)
    report = PreparationReport(total=0, kept=0)
    labeller = StreamLabeller(collator, tokenizer, template, report,
                              StreamCounts(f"{split} labelling"))
    columns = column_names(dataset)
    stream = dataset.map(labeller, batched=True, batch_size=batch_size, with_indices=True,
                         features=labelled_features(collator.weighted), remove_columns=columns)
    return PreparedDataset(stream, report)


class StreamLabeller(CountingMapFunction):
    """The batched ``IterableDataset.map`` function of a labelled stream: :func:`label_batch`,
    then its skips settled at once (the policy raised already in :func:`label_batch`; what is
    left is counted in :attr:`counts` and dropped) and :attr:`report` brought up to date."""

    def __init__(self, collator: MaskingCollator, tokenizer: Any,
                 template: ChatTemplate | None, report: PreparationReport,
                 counts: StreamCounts) -> None:
        self.collator = collator
        self.tokenizer = tokenizer
        self.template = template
        self.report = report
        self.counts = counts

    def __call__(self, batch: Mapping[str, list[Any]], indices: Sequence[int]) -> dict[str, list]:
        table = label_batch(batch, indices, collator=self.collator, tokenizer=self.tokenizer,
                            template=self.template)
        reasons = table.column(SKIP_COLUMN)
        bad = count_skips(reasons)
        samples: list[str] = []
        if bad.total:
            samples = table.column(DETAIL_COLUMN).take(bad.positions[:QUOTED]).to_pylist()
            table = table.filter(pc.is_null(reasons))
        self.counts.add(indices[0] if len(indices) else 0, len(reasons),
                        pc.drop_null(reasons).to_pylist() if bad.total else [], samples,
                        rows=len(indices))
        counts = self.counts.counts
        self.report.total, self.report.kept = counts.examples, counts.kept
        self.report.skipped = counts.skipped
        self.report.first_skips = counts.samples[:QUOTED]
        self.report.rows = counts.rows if self.collator.expand != "off" else None
        return table.drop_columns([SKIP_COLUMN, DETAIL_COLUMN]).to_pydict()


__all__ = ["PreparationReport", "PreparedDataset", "StreamLabeller", "label_batch",
           "labelled_features", "prepare_dataset", "prepare_stream"]
