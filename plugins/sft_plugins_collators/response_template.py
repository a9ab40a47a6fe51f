"""Compatibility with TRL-style data that has no template spans: find the answer by a marker.

The marker (``"### Response:"``, or the token ids of one) is searched in the example's *text*,
and the tokens are then found through the offsets of the whole text. The marker is therefore
always tokenized in its left context: the failure of token-id search, where a marker tokenizes
differently inside a sentence than alone and is never found, cannot happen. An example without
the marker is never trained as all ``-100`` in silence: it raises with its index, or with
``on_bad_example="skip"`` it is skipped and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sft_plugins.errors import MaskingError
from sft_plugins.masking import (
    MaskingCollator,
    RenderedExample,
    SkipExample,
    WeightedSpan,
    Weighting,
)

if TYPE_CHECKING:
    from sft_plugins.templates import ChatTemplate


def _occurrences(text: str, marker: str) -> list[int]:
    found, at = [], text.find(marker)
    while at >= 0:
        found.append(at)
        at = text.find(marker, at + len(marker))
    return found


class ResponseTemplate(MaskingCollator):
    """Loss after a response marker found in the text (TRL-style data without spans).

    ``response_template``: the marker, as text or token ids (decoded with the tokenizer).
    ``instruction_template``: optional marker of the next user turn. Without it, the loss is on
    everything after the last response marker; with it, on each stretch from a response marker
    to the next instruction marker (multi-turn). The marker itself is never trained.
    """

    name = "response-template"
    aliases = ("response_template", "completion-marker")

    def __init__(self, *, response_template: str | Sequence[int] = "",
                 instruction_template: str | Sequence[int] | None = None,
                 **options: Any) -> None:
        super().__init__(**options)
        if not response_template:
            raise self._option_error("response_template", response_template,
                                     "the non-empty text (or token ids) that starts an answer")
        self.response_template = response_template
        self.instruction_template = instruction_template
        self._response_text = response_template if isinstance(response_template, str) else None
        self._instruction_text = (instruction_template
                                  if isinstance(instruction_template, str) else None)

    def bind(self, tokenizer: Any, template: ChatTemplate | None) -> None:
        super().bind(tokenizer, template)
        if not isinstance(self.response_template, str):
            self._response_text = tokenizer.decode(list(self.response_template))
        if self.instruction_template is not None and not isinstance(self.instruction_template,
                                                                    str):
            self._instruction_text = tokenizer.decode(list(self.instruction_template))

    def weigh(self, example: RenderedExample) -> Weighting:
        response = self._response_text
        if response is None:
            raise MaskingError("response-template: call bind(tokenizer, template) (prepare() "
                               "does) before weigh()")
        text = example.text
        starts = _occurrences(text, response)
        if not starts:
            raise SkipExample("marker_not_found",
                              f"does not contain the response marker {response!r}")
        if self._instruction_text is None:
            return Weighting((WeightedSpan(starts[-1] + len(response), len(text)),))
        instructions = _occurrences(text, self._instruction_text)
        spans: list[WeightedSpan] = []
        for start in starts:
            begin = start + len(response)
            if spans and begin < spans[-1].end:
                continue  # a second response marker inside an answer: part of that answer
            end = min((i for i in instructions if i >= begin), default=len(text))
            spans.append(WeightedSpan(begin, end))
        return Weighting(tuple(spans))
