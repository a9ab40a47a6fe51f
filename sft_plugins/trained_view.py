"""What training learns from a conversation, token by token, as ``render`` and the demo show it.

The labels come from :func:`sft_plugins.masking.label_examples`, the function preparation runs
on every training example, so the view a user checks is computed by the code that trains: a
collator that trains only the last turn, only the completion or the prompt at a small weight
shows exactly that. Without a tokenizer there are no tokens; the view is then the template's
trained characters (every assistant turn).

This module builds values (and an HTML page as text); the command line prints them.
"""

from __future__ import annotations

import html
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sft_plugins.errors import SkipExample
from sft_plugins.loss import IGNORE_INDEX
from sft_plugins.masking import Labelled, MaskingCollator, label_examples
from sft_plugins.templates import ChatTemplate, RenderedConversation


@dataclass(frozen=True)
class Tokens:
    """A labelled example: ids, labels (``IGNORE_INDEX`` where no loss), per-token weights and
    the text each token shows."""

    input_ids: list[int]
    labels: list[int]
    weights: list[float]
    pieces: list[str]
    text: str
    """The example's rendered text (a conversation expanded per assistant turn has several)."""

    @property
    def trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class TrainedExample:
    """One conversation: what the template made of it, and, with a tokenizer, the tokens of
    each example training makes of it (one, or one per assistant turn when the collator expands it),
    as the collator labels them."""

    line: int
    messages: list[Any]
    tools: Any
    rendered: RenderedConversation
    tokens: tuple[Tokens, ...] = ()


def label_conversations(conversations: Sequence[Mapping[str, Any]], collator: MaskingCollator,
                        tokenizer: Any, template: ChatTemplate
                        ) -> list[tuple[Tokens, ...] | SkipExample]:
    """The tokens of each example training makes of each conversation
    (``{"messages": ..., "tools": ...}`` or any row the collators take) exactly as ``collator``
    prepares them, or the :class:`SkipExample` saying why training would skip one."""
    collator.bind(tokenizer, template)
    out: list[tuple[Tokens, ...] | SkipExample] = []
    for results in label_examples(collator, conversations, tokenizer, template):
        skip = next((r for r in results if isinstance(r, SkipExample)), None)
        out.append(skip if skip is not None else
                   tuple(_tokens(r, tokenizer) for r in results if isinstance(r, Labelled)))
    return out


def _tokens(labelled: Labelled, tokenizer: Any) -> Tokens:
    weights = labelled.loss_weights or [float(label != IGNORE_INDEX)
                                        for label in labelled.labels]
    return Tokens(labelled.input_ids, labelled.labels, list(weights),
                  _pieces(labelled, tokenizer), labelled.text)


def _pieces(labelled: Labelled, tokenizer: Any) -> list[str]:
    """The text of each token: from the tokenizer's offsets when they spell the labelled ids
    (a byte-level token that holds part of a character shows nothing; the next shows the whole
    character), else each token decoded on its own."""
    ids = labelled.input_ids
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer.backend_tokenizer.encode(labelled.text, add_special_tokens=False)
        if encoding.ids == ids:
            pieces, shown = [], 0
            for start, end in encoding.offsets:
                pieces.append(labelled.text[max(start, shown):end])
                shown = max(shown, end)
            return pieces
    return [tokenizer.decode([token]) for token in ids]


def trained_mask(rendered: RenderedConversation) -> list[bool]:
    """Per character of the rendered text: inside a trained span."""
    mask = [False] * len(rendered.text)
    for start, end in rendered.trained_spans:
        mask[start:end] = [True] * (end - start)
    return mask


def runs(text: str, mask: list[bool]) -> Iterator[tuple[str, bool]]:
    """Maximal runs of characters with the same trained flag."""
    start = 0
    for i in range(1, len(text) + 1):
        if i == len(text) or mask[i] != mask[start]:
            yield text[start:i], mask[start]
            start = i


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8" />
<title>sft-plugins render: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; background: #fafafa; }}
pre {{ white-space: pre-wrap; word-break: break-word; background: #fff; padding: 1em;
       border: 1px solid #ddd; border-radius: 6px; line-height: 1.6; }}
.trained {{ background: #c8f7c5; color: #064; font-weight: 600; }}
.prompt {{ color: #777; }}
.tok {{ border-right: 1px solid #bbb; }}
.tok.loss {{ background: #c8f7c5; color: #064; }}
.legend span {{ padding: 0 .4em; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p class="legend">template <b>{template}</b>{collator}:
<span class="trained">trained (carries loss)</span> <span class="prompt">not trained</span></p>
{body}
</body>
</html>
"""


def heading(example: TrainedExample, part: int) -> str:
    """``line 3``, or ``line 3, turn 2 of 4`` for an expanded conversation's examples."""
    count = len(example.tokens)
    return f"line {example.line}" + (f", turn {part} of {count}" if count > 1 else "")


def as_html(examples: Sequence[TrainedExample], template: ChatTemplate, title: str,
            collator: str | None = None) -> str:
    """A standalone page, one ``<pre>`` per conversation (well-formed XHTML-compatible markup);
    a token's tooltip is its id and, for fractional weights, its weight."""
    sections = []
    for example in examples:
        if not example.tokens:
            parts = [f'<span class="{"trained" if trained else "prompt"}">'
                     f"{html.escape(piece)}</span>"
                     for piece, trained in runs(example.rendered.text,
                                                trained_mask(example.rendered))]
            sections.append(f"<h2>line {example.line}</h2>\n<pre>{''.join(parts)}</pre>")
        for part, tokens in enumerate(example.tokens, 1):
            parts = [f'<span class="tok{" loss" if label != IGNORE_INDEX else ""}" '
                     f'title="{token}{f" weight {weight:g}" if 0 < weight < 1 else ""}">'
                     f"{html.escape(piece)}</span>"
                     for piece, label, token, weight in zip(tokens.pieces, tokens.labels,
                                                            tokens.input_ids, tokens.weights,
                                                            strict=True)]
            sections.append(f"<h2>{heading(example, part)}</h2>\n<pre>{''.join(parts)}</pre>")
    by = f", collator <b>{html.escape(collator)}</b>" if collator else ""
    return _PAGE.format(title=html.escape(title), template=html.escape(template.name),
                        collator=by, body="\n".join(sections))


__all__ = ["Tokens", "TrainedExample", "as_html", "heading", "label_conversations", "runs",
           "trained_mask"]
