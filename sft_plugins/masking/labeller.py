"""The one labeller: rows in, the ``input_ids``/``labels``/``loss_weights`` training sees out.

:func:`label_examples` renders a list of rows (:mod:`.rendering`), lets the collator weigh them,
tokenizes them in batched calls (on a second thread, beside the rendering), finds each span's
tokens (:mod:`.alignment`) and labels and truncates them (:mod:`.labels`), the whole batch as
flat token columns (:func:`label_rows`).
Preparation (:mod:`.preparation`) runs that inside ``datasets.map`` and writes the columns to
Arrow as they are; anything that wants to show what training would learn from a row (``render``)
calls it on a plain list and gets the same answer. Special-token text inside the data is kept as
text here (:mod:`sft_plugins.literal_text`), as in training.

It applies no bad-example policy: an example that cannot be trained on comes back as the
:class:`~sft_plugins.errors.SkipExample` that says why, and the caller decides whether to raise.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sft_plugins.errors import MaskingError, SFTPluginsError, SkipExample
from sft_plugins.literal_text import (
    SpecialText,
    plain_encoder,
    protect,
    restore,
    special_text,
    splice,
    token_ranges_from_offsets,
)
from sft_plugins.masking.alignment import (
    ByteLevelSpans,
    byte_level_spans,
    encode_batch,
    encode_slow,
    token_ranges_fast,
    unpadded_backend,
)
from sft_plugins.masking.labels import (
    LabelledTokens,
    check_reasoning_trained,
    check_spans,
    label_token_batch,
)
from sft_plugins.masking.rendering import RenderedExample, Weighting, render_examples

if TYPE_CHECKING:
    from sft_plugins.masking.collator import MaskingCollator
    from sft_plugins.templates import ChatTemplate

TokenRanges = list[tuple[int, int]]


@dataclass(frozen=True)
class Labelled:
    """One example as training sees it."""

    input_ids: list[int]
    labels: list[int]
    """The token id where the token carries loss, ``IGNORE_INDEX`` elsewhere."""
    loss_weights: list[float] | None
    """Per-token weights, for collators with fractional weights only."""
    text: str
    """The rendered text the tokens come from (before truncation)."""


@dataclass(frozen=True)
class LabelledRows:
    """:func:`label_rows`' answer: the kept examples as flat token columns, and what became of
    every example of every row."""

    tokens: LabelledTokens
    rows: list[list[int | SkipExample]]
    """Per row, its examples: the index of each kept one in :attr:`tokens`, or why it was
    skipped."""
    texts: list[str]
    """The rendered text of each kept example (before truncation)."""


def label_examples(collator: MaskingCollator, rows: Sequence[Mapping[str, Any]],
                   tokenizer: Any, template: ChatTemplate | None = None
                   ) -> list[list[Labelled | SkipExample]]:
    """For each row, its examples labelled exactly as training labels them, or the
    :class:`SkipExample` saying why one cannot be (its ``__cause__`` is the original error when
    one was raised).

    A row gives one example, or one per assistant turn when the collator's ``expand`` option splits
    it (:func:`~sft_plugins.masking.rendering.render_examples`); a row that cannot be rendered
    gives one :class:`SkipExample`. Rows are the canonical rows of :mod:`sft_plugins.data` or
    TRL's formats (:func:`~sft_plugins.masking.render_example`). The collator must be bound to
    the tokenizer and template first (:meth:`~MaskingCollator.bind`, which
    :meth:`~MaskingCollator.prepare` calls). No policy is applied here: ``on_bad_example`` and
    ``strict`` are the caller's.
    """
    labelled = label_rows(collator, rows, tokenizer, template)
    tokens, bounds = labelled.tokens, labelled.tokens.offsets.tolist()

    def example(k: int) -> Labelled:
        a, b = bounds[k], bounds[k + 1]
        weights = None if tokens.loss_weights is None else tokens.loss_weights[a:b].tolist()
        return Labelled(tokens.input_ids[a:b].tolist(), tokens.labels[a:b].tolist(), weights,
                        labelled.texts[k])

    return [[example(r) if isinstance(r, int) else r for r in row] for row in labelled.rows]


def label_rows(collator: MaskingCollator, rows: Sequence[Mapping[str, Any]], tokenizer: Any,
               template: ChatTemplate | None = None) -> LabelledRows:
    """:func:`label_examples` as flat token columns, which preparation writes to Arrow as
    they are (no Python list per example)."""
    with without_cycle_collection():
        context = _Context.of(collator, tokenizer, template)
        if context.fast:
            weighed, items, encodings = _weigh_while_encoding(collator, rows, context)
            tokens = _tokenize(items, encodings, tokenizer, context)
        else:
            weighed = [_weigh(collator, row, context) for row in rows]
            items = _waiting(weighed)
            tokens = [_encode_slow(item, tokenizer) for item in items]
        encoded = [k for k, found in enumerate(tokens) if not isinstance(found, SkipExample)]
        labelled = label_token_batch(collator, [items[k].weighting for k in encoded],
                                     [tokens[k][0] for k in encoded],  # type: ignore[index]
                                     [tokens[k][1] for k in encoded])  # type: ignore[index]
        outcomes: list[int | SkipExample] = list(tokens)  # type: ignore[arg-type]
        texts: list[str] = []
        for k, outcome in zip(encoded, labelled.outcomes, strict=True):
            outcomes[k] = outcome
            if not isinstance(outcome, SkipExample):
                texts.append(items[k].rendered.text)
        found = iter(outcomes)
        return LabelledRows(labelled, [[next(found) if isinstance(w, _Weighed) else w
                                        for w in row] for row in weighed], texts)


@contextmanager
def without_cycle_collection() -> Iterator[None]:
    """Python's cycle collector paused (if it runs), for labelling one batch.

    A batch makes a few dozen containers per example (the row's messages, the rendered turns,
    the spans, the label lists) and keeps most of them until the batch is written. Each
    collection promotes the survivors, and every so often they add up to a full collection,
    which walks every object the process holds (torch's and transformers' included): a tenth to
    a sixth of preparation's time on the real Llama 3.1 vocabulary. Reference counting frees
    all of it anyway; the few cycles labelling makes (a skipped example's error and its
    traceback) wait for the collector's next run, after the batch. Preparation's
    ``datasets.map`` function pauses it for the whole batch, Arrow conversion included.
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


@dataclass(frozen=True)
class _Context:
    """What labelling needs from the tokenizer and template, found once per call."""

    eos_text: str | None
    template: ChatTemplate | None
    fast: bool
    special: SpecialText | None
    """The tokenizer's special tokens, when their text in the data is to stay text."""
    byte_level: ByteLevelSpans | None
    backend: Any
    """The fast tokenizer's backend, without padding (:func:`unpadded_backend`)."""

    @classmethod
    def of(cls, collator: MaskingCollator, tokenizer: Any,
           template: ChatTemplate | None) -> _Context:
        fast = bool(getattr(tokenizer, "is_fast", False))
        literal = collator.literal_special_tokens and fast
        return cls(eos_text=template.eos_token if template is not None else tokenizer.eos_token,
                   template=template, fast=fast,
                   special=special_text(tokenizer) if literal else None,
                   byte_level=byte_level_spans(tokenizer) if fast else None,
                   backend=unpadded_backend(tokenizer) if fast else None)


@dataclass(frozen=True)
class _Weighed:
    """A rendered example and its collator's weighting, waiting for its tokens."""

    rendered: RenderedExample
    weighting: Weighting
    literal: tuple[tuple[int, int], ...]
    """Where special-token text from the data sits in the rendered text."""


def _weigh(collator: MaskingCollator, row: Mapping[str, Any],
           context: _Context) -> list[_Weighed | SkipExample]:
    """Render one row into its examples (special-token text in it kept as text) and let the
    collator weigh each."""
    try:
        originals: list[str] = []
        if context.special is not None:
            row, originals = protect(row, context.special)
        examples = render_examples(row, context.template, context.eos_text, collator.expand)
    except SkipExample as skip:
        return [skip]
    except SFTPluginsError as error:  # DataError, TemplateError, MaskingError...
        return [_skip(getattr(error, "rule", None) or "invalid", error)]
    return [_weigh_example(collator, rendered, originals) for rendered in examples]


def _weigh_example(collator: MaskingCollator, rendered: RenderedExample,
                   originals: list[str]) -> _Weighed | SkipExample:
    try:
        literal: tuple[tuple[int, int], ...] = ()
        if originals:
            text, places = restore(rendered.text, originals)
            rendered, literal = replace(rendered, text=text), tuple(places)
        weighting = collator.weigh(rendered)
        check_spans(weighting.spans, len(rendered.text))
        check_reasoning_trained(rendered, weighting)
    except SkipExample as skip:
        return skip
    except SFTPluginsError as error:
        return _skip(getattr(error, "rule", None) or "invalid", error)
    return _Weighed(rendered, weighting, literal)


def _skip(reason: str, error: SFTPluginsError) -> SkipExample:
    skip = SkipExample(reason, str(error))
    skip.__cause__ = error
    return skip


def _waiting(weighed: list[list[_Weighed | SkipExample]]) -> list[_Weighed]:
    """The examples that still wait for their tokens, in order."""
    return [w for row in weighed for w in row if isinstance(w, _Weighed)]


ENCODED_TOGETHER = 128
"""Rows rendered before their examples go to the tokenizer, while the next rows are rendered."""


def _weigh_while_encoding(collator: MaskingCollator, rows: Sequence[Mapping[str, Any]],
                          context: _Context
                          ) -> tuple[list[list[_Weighed | SkipExample]], list[_Weighed],
                                     list[Any]]:
    """Every row weighed (:func:`_weigh`) and every waiting example (:func:`_waiting`) encoded,
    side by side.

    The fast tokenizer's batched encoding runs in Rust without holding the GIL, and rendering
    is Python: so each ``ENCODED_TOGETHER`` rows, once rendered, are encoded on a second thread
    while the main thread renders the next ones. Where the tokenizer keeps to one thread
    (``TOKENIZERS_PARALLELISM=false``, and in forked workers) and a core is free, the rendering
    hides behind the tokenization: about 0.9x the wall time of rendering first, for 1.07x to
    1.12x the CPU time (benchmarks/README.md); with the tokenizer's own thread pool, about the
    same time as before. The rows are weighed in order on the calling thread, so a collator or
    template never runs on another thread, and an error while rendering is raised here.
    """
    weighed: list[list[_Weighed | SkipExample]] = []
    items: list[_Weighed] = []
    pending: list[Future[list[Any]]] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sft-plugins-encode") as encoder:
        for start in range(0, len(rows), ENCODED_TOGETHER):
            some = [_weigh(collator, row, context) for row in rows[start:start + ENCODED_TOGETHER]]
            waiting = _waiting(some)
            weighed += some
            items += waiting
            pending.append(encoder.submit(encode_batch, [w.rendered for w in waiting],
                                          context.backend, offsets=context.byte_level is None))
        return weighed, items, [encoding for future in pending for encoding in future.result()]


def _tokenize(items: list[_Weighed], encodings: list[Any], tokenizer: Any,
              context: _Context) -> list[tuple[list[int], TokenRanges]]:
    """Token ids and each span's token range, from the items' encodings by the fast tokenizer
    (:func:`_weigh_while_encoding`): for a byte-level tokenizer, by byte lengths, the batch at
    once, where they add up; else, or where they do not, from offsets."""
    ids = [encoding.ids for encoding in encodings]
    by_bytes: list[TokenRanges | None] = [None] * len(items)
    if context.byte_level is not None:
        plain = [k for k, item in enumerate(items)
                 if not item.literal and not item.rendered.add_special_tokens]
        found = context.byte_level.ranges_batch([items[k].rendered.text for k in plain],
                                                [ids[k] for k in plain],
                                                [items[k].weighting.spans for k in plain])
        for k, ranges in zip(plain, found, strict=True):
            by_bytes[k] = ranges
    encoder = plain_encoder(tokenizer) if any(item.literal for item in items) else None
    return [(ids[k], ranges) if ranges is not None else
            _align(item, encodings[k], context, encoder)
            for k, (item, ranges) in enumerate(zip(items, by_bytes, strict=True))]


def _encode_slow(item: _Weighed, tokenizer: Any) -> tuple[list[int], TokenRanges] | SkipExample:
    try:
        return encode_slow(tokenizer, item.rendered.text, item.weighting.spans,
                           item.rendered.add_special_tokens)
    except MaskingError as error:
        return _skip("invalid", error)


def _align(item: _Weighed, encoding: Any, context: _Context,
           encoder: Any) -> tuple[list[int], TokenRanges]:
    """Ids and ranges from a fast encoding's offsets (the byte lengths did not add up, or the
    tokenizer is not byte-level); special-token text from the data spliced back in as the
    plain text it is."""
    text, spans = item.rendered.text, item.weighting.spans
    encoding = _with_offsets(item, encoding, context)
    if item.literal:
        ids, offsets = splice(encoding.ids, encoding.offsets, text, item.literal,
                              context.special, encoder)  # type: ignore[arg-type]
        return ids, token_ranges_from_offsets(offsets, spans)
    return encoding.ids, token_ranges_fast(encoding, spans)


def _with_offsets(item: _Weighed, encoding: Any, context: _Context) -> Any:
    """The item's encoding with offsets: the batch's, or, when the batch was encoded without
    them (byte-level tokenizers), once more with them."""
    if context.byte_level is None:
        return encoding
    return encode_batch([item.rendered], context.backend)[0]


__all__ = ["Labelled", "LabelledRows", "label_examples", "label_rows"]
