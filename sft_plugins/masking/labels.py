"""From token ranges to labels: token weights, labels and truncation of one tokenized example.

Given a collator's weighted spans and the token range each one touches, every token gets a
weight: the span's (the largest, for a token two spans share), else the collator's background
weight. Labels are the token ids where the weight is above 0 and ``IGNORE_INDEX`` elsewhere;
weights leave this module only for collators that can give fractional ones. ``max_length`` then
cuts the example (or drops it), and an example left with no trained token is skipped with its
reason, never trained as all ``IGNORE_INDEX`` in silence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

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
    weights = [background] * n_tokens
    previous_end, previous_weight = -1, 0.0
    for (a, b), span in zip(ranges, spans, strict=True):
        if a >= b:
            continue
        weights[a:b] = [span.weight] * (b - a)
        if a == previous_end - 1:  # this token also touches the previous span
            weights[a] = max(weights[a], previous_weight)
        previous_end, previous_weight = b, span.weight
    return weights


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


def label_tokens(collator: MaskingCollator, weighting: Weighting, ids: list[int],
                 ranges: TokenRanges) -> tuple[list[int], list[int], list[float] | None]:
    """``input_ids``, ``labels`` and (for a :attr:`~MaskingCollator.weighted` collator, else
    ``None``) ``loss_weights`` of one tokenized example, truncated as the collator says.

    Raises :class:`SkipExample`: ``too_long`` (``truncation="drop"``), ``no_trained_token``,
    or ``truncated_away`` (truncation cut every trained token; ``strict`` collators raise it).
    """
    trained = [(a, b) for (a, b), s in zip(ranges, weighting.spans, strict=True)
               if s.weight > 0 and a < b]
    labels, weights = _labels(collator.weighted, weighting, ids, ranges, trained)
    lo, hi = _kept_window(collator, len(ids))
    _check_trained_left(collator, trained, lo, hi, len(ids))
    if (lo, hi) != (0, len(ids)):
        ids, labels = ids[lo:hi], labels[lo:hi]
        weights = None if weights is None else weights[lo:hi]
    return ids, labels, weights if collator.weighted else None


def _labels(weighted: bool, weighting: Weighting, ids: list[int], ranges: TokenRanges,
            trained: list[tuple[int, int]]) -> tuple[list[int], list[float] | None]:
    """Labels of every token, and their weights when anything but a plain 0/1 mask needs them."""
    if weighted or weighting.background or len(trained) < len(ranges):
        weights = token_weights(len(ids), ranges, weighting.spans, weighting.background)
        return [t if w > 0 else IGNORE_INDEX for t, w in zip(ids, weights, strict=True)], weights
    labels = [IGNORE_INDEX] * len(ids)  # the plain mask: copy the trained slices
    for a, b in trained:
        labels[a:b] = ids[a:b]
    return labels, None


def _kept_window(collator: MaskingCollator, n_tokens: int) -> tuple[int, int]:
    """The tokens ``[lo, hi)`` that ``max_length`` and ``truncation`` keep."""
    limit = collator.max_length
    if limit is None or n_tokens <= limit:
        return 0, n_tokens
    if collator.truncation == "drop":
        raise SkipExample("too_long", f"has {n_tokens} tokens, more than max_length={limit} "
                                      "(truncation='drop')")
    return (0, limit) if collator.truncation == "keep_start" else (n_tokens - limit, n_tokens)


def _check_trained_left(collator: MaskingCollator, trained: list[tuple[int, int]], lo: int,
                        hi: int, n_tokens: int) -> None:
    if any(a < hi and b > lo for a, b in trained):
        return
    if (lo, hi) == (0, n_tokens):
        raise SkipExample("no_trained_token", "has no token to train on")
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


__all__ = ["check_reasoning_trained", "check_spans", "label_tokens", "token_weights"]
