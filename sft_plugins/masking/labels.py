"""From token ranges to labels: token weights, labels and truncation of a batch of tokenized
examples, as flat token columns.

Given a collator's weighted spans and the token range each one touches, every token gets a
weight: the span's (the largest, for a token two spans share), else the collator's background
weight. Labels are the token ids where the weight is above 0 and ``IGNORE_INDEX`` elsewhere;
weights leave this module only for collators that can give fractional ones. ``max_length`` then
cuts the example (or drops it), and an example left with no trained token is skipped with its
reason, never trained as all ``IGNORE_INDEX`` in silence.

A batch is labelled in numpy over all its tokens at once (:func:`label_token_batch`): what is
left in Python is a few comparisons per span, which is what keeps preparation near the cost of
tokenization itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np

from sft_plugins.errors import MaskingError, SkipExample
from sft_plugins.loss import IGNORE_INDEX
from sft_plugins.masking.rendering import RenderedExample, WeightedSpan, Weighting

if TYPE_CHECKING:
    from sft_plugins.masking.collator import MaskingCollator

TokenRanges = Sequence[tuple[int, int]]


def token_weights(n_tokens: int, ranges: TokenRanges, spans: Sequence[WeightedSpan],
                  background: float) -> list[float]:
    """Per-token weights: the span's weight for tokens touching a span (the largest, for a
    token shared by two), ``background`` for the rest."""
    weights = np.empty(n_tokens, dtype=np.float64)
    _write_weights(weights, 0, n_tokens, ranges, spans, background)
    return weights.tolist()


def _write_weights(out: np.ndarray, base: int, n_tokens: int, ranges: TokenRanges,
                   spans: Sequence[WeightedSpan], background: float) -> None:
    """:func:`token_weights` of the example whose tokens start at ``out[base]``, in place."""
    out[base:base + n_tokens] = background
    previous_end = -1
    for (a, b), span in zip(ranges, spans, strict=True):
        if a >= b:
            continue
        # a token that also touches the spans before keeps the largest weight of them all
        shared = out[base + a] if a == previous_end - 1 else span.weight
        out[base + a:base + b] = span.weight
        out[base + a] = max(span.weight, shared)
        previous_end = b


def check_spans(spans: Sequence[WeightedSpan], text_length: int) -> None:
    """A :class:`MaskingError` unless the spans lie inside the text, sorted, without overlap,
    with weights in [0, 1]."""
    previous = 0
    for span in spans:
        if not 0 <= span.start <= span.end <= text_length:
            raise MaskingError(f"span [{span.start}, {span.end}) falls outside the text "
                               f"(length {text_length})")
        if span.start < previous:
            raise MaskingError("weighted spans must be sorted and must not overlap")
        if not 0.0 <= span.weight <= 1.0 or math.isnan(span.weight):
            raise MaskingError(f"span weight {span.weight} is not in [0, 1]")
        previous = span.end


@dataclass(frozen=True)
class LabelledTokens:
    """The kept examples of a batch as flat token columns: kept example ``k`` has the tokens
    ``[offsets[k], offsets[k + 1])`` of each column."""

    input_ids: np.ndarray
    """``int32``."""
    labels: np.ndarray
    """``int32``: the token id where the token carries loss, ``IGNORE_INDEX`` elsewhere."""
    loss_weights: np.ndarray | None
    """``float64``, for :attr:`~MaskingCollator.weighted` collators only."""
    offsets: np.ndarray
    """``int32``, one more than the kept examples."""
    outcomes: list[int | SkipExample]
    """Per example of the batch: its index among the kept ones, or why it was skipped."""


def label_token_batch(collator: MaskingCollator, weightings: Sequence[Weighting],
                      ids: Sequence[Sequence[int]], ranges: Sequence[TokenRanges]
                      ) -> LabelledTokens:
    """``input_ids``, ``labels`` and (for a :attr:`~MaskingCollator.weighted` collator)
    ``loss_weights`` of a batch of tokenized examples, truncated as the collator says.

    An example that cannot be trained on is a :class:`SkipExample` in ``outcomes``:
    ``too_long`` (``truncation="drop"``), ``no_trained_token``, or ``truncated_away``
    (truncation cut every trained token; ``strict`` collators raise it).

    Plain masks (every span trained with weight 1, nothing in between) are the common case: one
    running count over the batch's tokens, opened at each trained range and closed after it,
    marks every trained token. Other weightings write their weights into a flat array.
    """
    lengths = [len(example) for example in ids]
    starts = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    total = int(starts[-1])
    bases = starts.tolist()
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=total)
    weights = np.zeros(total, dtype=np.float64) if collator.weighted else None
    opened: list[int] = []
    closed: list[int] = []
    dropped: list[tuple[int, int]] = []  # token ranges of the batch that are cut or skipped
    outcomes: list[int | SkipExample] = []
    kept_lengths: list[int] = []
    limit = collator.max_length
    for k, (weighting, example_ranges) in enumerate(zip(weightings, ranges, strict=True)):
        n_tokens, base = lengths[k], bases[k]
        trained = [(a, b) for (a, b), s in zip(example_ranges, weighting.spans, strict=True)
                   if s.weight > 0 and a < b]
        lo, hi = 0, n_tokens
        try:
            if not trained:
                raise SkipExample("no_trained_token", "has no token to train on")
            if limit is not None and n_tokens > limit:  # the rare case: truncation
                lo, hi = _kept_window(collator, n_tokens)
                _check_trained_left(collator, trained, lo, hi)
        except SkipExample as skip:
            outcomes.append(skip)
            dropped.append((base, base + n_tokens))
            continue
        if weights is None and not weighting.background and len(trained) == len(example_ranges):
            opened += [base + a for a, _ in trained]
            closed += [base + b for _, b in trained]
        else:
            if weights is None:
                weights = np.zeros(total, dtype=np.float64)
            _write_weights(weights, base, n_tokens, example_ranges, weighting.spans,
                           weighting.background)
        if (lo, hi) != (0, n_tokens):
            dropped += [(base, base + lo), (base + hi, base + n_tokens)]
        outcomes.append(len(kept_lengths))
        kept_lengths.append(hi - lo)
    trained_mask = _covered(opened, closed, total)
    if weights is not None:
        trained_mask |= weights > 0
    labels = np.where(trained_mask, flat, np.int32(IGNORE_INDEX)).astype(np.int32, copy=False)
    if dropped:
        keep = np.ones(total, dtype=bool)
        for a, b in dropped:
            keep[a:b] = False
        flat, labels = flat[keep], labels[keep]
        weights = None if weights is None else weights[keep]
    offsets = np.zeros(len(kept_lengths) + 1, dtype=np.int32)
    np.cumsum(kept_lengths, out=offsets[1:])
    return LabelledTokens(flat, labels, weights if collator.weighted else None, offsets,
                          outcomes)


def _covered(opened: list[int], closed: list[int], total: int) -> np.ndarray:
    """Which of ``total`` tokens lie in some range ``[opened[i], closed[i])``."""
    count = np.bincount(opened, minlength=total + 1) - np.bincount(closed, minlength=total + 1)
    return np.cumsum(count[:total]) > 0


def _kept_window(collator: MaskingCollator, n_tokens: int) -> tuple[int, int]:
    """The tokens ``[lo, hi)`` that ``max_length`` and ``truncation`` keep of an example
    longer than ``max_length``."""
    limit = collator.max_length
    if collator.truncation == "drop":
        raise SkipExample("too_long", f"has {n_tokens} tokens, more than max_length={limit} "
                                      "(truncation='drop')")
    return (0, limit) if collator.truncation == "keep_start" else (n_tokens - limit, n_tokens)


def _check_trained_left(collator: MaskingCollator, trained: list[tuple[int, int]], lo: int,
                        hi: int) -> None:
    if any(a < hi and b > lo for a, b in trained):
        return
    raise SkipExample("truncated_away", f"has no trained token left after truncation to "
                                        f"max_length={collator.max_length} "
                                        f"({collator.truncation})")


def check_reasoning_trained(rendered: RenderedExample, weighting: Weighting) -> None:
    """Refuse to train an assistant turn whose reasoning the template dropped: the model would
    learn to answer without thinking in a context where, at inference, it always thinks first,
    and the reasoning the data holds would never be trained."""
    for turn in rendered.turns:
        if not turn.reasoning_dropped or turn.trained is None:
            continue
        start, end = turn.trained
        if weighting.background > 0 or any(s.weight > 0 and s.start < end and s.end > start
                                           for s in weighting.spans):
            raise SkipExample(
                "reasoning_dropped",
                f"message {turn.index} is trained, but the chat template renders it without its "
                "reasoning at this point of the conversation, so the model would learn to "
                "answer without thinking; train each assistant turn as its own example (collator "
                "option expand=reasoning), or only the last turn (collator last-turn)")


__all__ = ["LabelledTokens", "check_reasoning_trained", "check_spans", "label_token_batch",
           "token_weights"]
