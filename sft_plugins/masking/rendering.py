"""From a data set row to text: what a collator sees of an example before anything is tokenized.

A row (TRL's formats, or the canonical rows of :mod:`sft_plugins.data`) becomes one text and the
character span of each turn the model should learn (:class:`RenderedExample`). A collator then
answers with weighted character spans (:class:`Weighting`); nothing here knows about tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from sft_plugins.data.schema import (
    REASONING_KEYS,
    decode_json,
    decode_messages,
    reasoning_of,
    trains_something,
)
from sft_plugins.errors import DataError, MaskingError

if TYPE_CHECKING:
    from sft_plugins.templates import ChatTemplate


Expansion = Literal["off", "reasoning", "all"]
EXPANSIONS: tuple[str, ...] = ("off", "reasoning", "all")
"""When a conversation becomes one example per assistant turn (:func:`render_examples`):
never, only when its template would drop the reasoning of a trained turn, or always."""


@dataclass(frozen=True)
class WeightedSpan:
    """Characters ``[start, end)`` of an example's text and the loss weight of their tokens."""

    start: int
    end: int
    weight: float = 1.0


@dataclass(frozen=True)
class Turn:
    """One message of a rendered example, as the collators see it."""

    index: int
    role: str
    trained: tuple[int, int] | None
    """For assistant turns: the characters of the content and its end-of-turn token."""
    completion: bool = False
    """True for the messages of a prompt/completion example's completion."""
    reasoning_dropped: bool = False
    """An assistant turn that has reasoning the template left out of its trained span (a
    Qwen3-style template keeps only the reasoning of turns after the last user message)."""


@dataclass(frozen=True)
class RenderedExample:
    """An example as text, with the character span of each turn the model should learn."""

    text: str
    turns: tuple[Turn, ...]
    has_completion: bool
    """True for prompt/completion data (the turns marked ``completion`` are the answer)."""
    add_special_tokens: bool
    """Let the tokenizer add its special tokens (plain text). Templated text carries its own
    (as with ``apply_chat_template``), so it is tokenized without."""

    @property
    def assistant_spans(self) -> list[tuple[int, int]]:
        """The trained character spans of every assistant turn, in order."""
        return [t.trained for t in self.turns if t.trained is not None]

    @property
    def completion_spans(self) -> list[tuple[int, int]]:
        """The trained character spans of the completion's assistant turns, in order."""
        return [t.trained for t in self.turns if t.trained is not None and t.completion]


@dataclass(frozen=True)
class Weighting:
    """What a collator decided for one example: weighted spans and the weight of the rest."""

    spans: tuple[WeightedSpan, ...]
    background: float = 0.0


def render_example(example: Mapping[str, Any], template: ChatTemplate | None,
                   eos_text: str | None) -> RenderedExample:
    """Turn one data set row into text and turns.

    Accepted rows (TRL's formats and the canonical rows of :mod:`sft_plugins.data`):

    - ``messages``, with an optional ``completion_index`` (the first message of the
      completion, for prompt/completion data) and ``tools``;
    - ``prompt`` + ``completion``, both message lists (rendered together) or both strings;
    - ``text``, with an optional ``completion_offset`` (the character where the completion
      starts).

    Plain text gets ``eos_text`` appended unless it already ends with it (as TRL does), so the
    model learns to stop; the completion span of plain prompt/completion covers the completion
    and that end-of-sequence text. Templated text is tokenized without the tokenizer's special
    tokens (the template writes its own), plain text with them.
    """
    tools = decode_json(example.get("tools")) or None
    if example.get("messages") is not None:
        return _render_conversation(example, template, tools)
    if example.get("prompt") is not None or example.get("completion") is not None:
        return _render_prompt_completion(example, template, tools, eos_text)
    if isinstance(example.get("text"), str):
        return _render_text(example["text"], example.get("completion_offset"), eos_text)
    columns = ", ".join(sorted(example)) or "none"
    raise DataError(f"no 'messages', 'prompt'/'completion' or 'text' field (columns: {columns})")


def render_examples(example: Mapping[str, Any], template: ChatTemplate | None,
                    eos_text: str | None, expand: Expansion = "off") -> list[RenderedExample]:
    """One row as the examples training sees: the row itself, or, expanded, one example per
    assistant turn.

    An expanded example is the conversation up to and including one assistant turn, rendered
    as the template renders that history at that point; only that last turn is trained, the
    earlier ones are context. So each turn is learnt in exactly the context the model sees when
    it generates it, as the last turn, which every template renders in full: a Qwen3-style
    template keeps its reasoning, gpt-oss its analysis and ``<|return|>``, and no turn is
    trained as an answer without thinking. ``expand="reasoning"`` expands only rows where a
    turn's reasoning would otherwise be dropped; ``"all"`` every conversation with more than
    one assistant turn. Rows that are not a plain ``messages`` conversation are never expanded.
    """
    rendered = render_example(example, template, eos_text)
    if expand == "off" or example.get("messages") is None \
            or example.get("completion_index") is not None:
        return [rendered]
    if expand == "reasoning" and not any(turn.reasoning_dropped for turn in rendered.turns):
        return [rendered]
    messages = decode_messages(example["messages"])
    answers = [i for i, message in enumerate(messages) if message.get("role") == "assistant"]
    if len(answers) <= 1:
        return [rendered]
    return [_only_the_last_turn_trained(render_example(
        {**example, "messages": messages[:answer + 1]}, template, eos_text), answer)
        for answer in answers]


def _only_the_last_turn_trained(rendered: RenderedExample, last: int) -> RenderedExample:
    """The example with every assistant turn before message ``last`` left untrained."""
    turns = tuple(replace(turn, trained=None, reasoning_dropped=False)
                  if turn.index < last else turn for turn in rendered.turns)
    return replace(rendered, turns=turns)


def _render_conversation(example: Mapping[str, Any], template: ChatTemplate | None,
                         tools: Any) -> RenderedExample:
    """``messages``, split at ``completion_index`` when the row has one."""
    first = example.get("completion_index")
    messages = decode_messages(example["messages"])
    if first is None:
        return _render_messages([], messages, template, tools, completion=False)
    return _render_messages(messages[:first], messages[first:], template, tools)


def _render_prompt_completion(example: Mapping[str, Any], template: ChatTemplate | None,
                              tools: Any, eos_text: str | None) -> RenderedExample:
    prompt, completion = example.get("prompt"), example.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return _plain_completion(prompt, prompt + completion, eos_text)
    if isinstance(prompt, list) and isinstance(completion, list):
        return _render_messages(decode_messages(prompt), decode_messages(completion),
                                template, tools)
    raise DataError("'prompt' and 'completion' must both be strings or both be message lists, "
                    f"got {type(prompt).__name__} and {type(completion).__name__}")


def _render_text(text: str, offset: int | None, eos_text: str | None) -> RenderedExample:
    if offset is not None:
        return _plain_completion(text[:offset], text, eos_text)
    return RenderedExample(text=_with_eos(text, eos_text), turns=(), has_completion=False,
                           add_special_tokens=True)


def _with_eos(text: str, eos_text: str | None) -> str:
    return text if not eos_text or text.endswith(eos_text) else text + eos_text


def _plain_completion(prompt: str, text: str, eos_text: str | None) -> RenderedExample:
    if len(text) == len(prompt):
        raise DataError("the completion is empty; there is nothing to train on")
    text = _with_eos(text, eos_text)
    return RenderedExample(
        text=text,
        turns=(Turn(0, "user", None), Turn(1, "assistant", (len(prompt), len(text)), True)),
        has_completion=True, add_special_tokens=True)


def _render_messages(prompt: list[dict[str, Any]], rest: list[dict[str, Any]],
                     template: ChatTemplate | None, tools: Any, *,
                     completion: bool = True) -> RenderedExample:
    if template is None:
        raise MaskingError("conversational data needs a chat template; name one with "
                           "--chat_template or pass template= to prepare()")
    if completion and not any(map(trains_something, rest)):
        raise DataError("the completion has no assistant turn with non-empty content or tool "
                        "calls; nothing to train on")
    messages = [*prompt, *rest]
    rendered = template.render(messages, tools=tools)
    first = len(prompt)
    turns = tuple(Turn(m.index, m.role, m.trained, completion and m.index >= first,
                       m.trained is not None
                       and _reasoning_dropped(messages[m.index], rendered.text, m.trained))
                  for m in rendered.messages)
    return RenderedExample(text=rendered.text, turns=turns, has_completion=completion,
                           add_special_tokens=False)


def _reasoning_dropped(message: Mapping[str, Any], text: str, trained: tuple[int, int]) -> bool:
    """Whether the message (a trained turn) has reasoning (a field, or a ``<think>`` block
    closing in its content, as Qwen3 and DeepSeek-R1 data write it) that its trained span does
    not hold."""
    reasoning = None if message.keys().isdisjoint(REASONING_KEYS) else reasoning_of(message)
    content = message.get("content")
    if reasoning is None and isinstance(content, str) and "</think>" in content:
        reasoning = content.split("</think>")[0].split("<think>")[-1]
    return bool(reasoning and reasoning.strip()
                and reasoning.strip() not in text[trained[0]:trained[1]])


__all__ = ["EXPANSIONS", "Expansion", "RenderedExample", "Turn", "WeightedSpan", "Weighting",
           "render_example", "render_examples"]
