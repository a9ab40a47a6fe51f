"""Qwen 3.5, 3.6 and 3.8: ChatML turns, a ``<think>`` block on every assistant turn after the
last user query, tool calls as ``<tool_call><function=NAME><parameter=KEY>`` XML.

Qwen 3.5 ships two templates that differ only in the generation prompt's default: the 4B and
larger checkpoints open a ``<think>`` block unless ``enable_thinking=False`` ("think"); the 2B and
smaller ones close an empty block unless ``enable_thinking=True`` ("nothink"). Qwen 3.6 is the
"think" template plus ``preserve_thinking``, which keeps the reasoning of every turn. Qwen 3.8
keeps every turn's reasoning unless ``preserve_thinking=False``, adds a system instruction per
``reasoning_effort`` (``xhigh`` by default, ``medium``, ``low``) and reads reasoning only from
``reasoning_content``, never from ``<think>`` in the content.

The templates trim every message's text, drop the reasoning of turns before the last user query
(unless they preserve it), write each tool-call argument as its own ``<parameter=...>`` block (so
arguments must be an object), and refuse a conversation without a user query. The checks below
turn what the official templates would render wrongly, or fail on with a jinja error, into
refusals that name the message and the rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sft_plugins.data.schema import reasoning_of
from sft_plugins.errors import ConversationError
from sft_plugins.templates import ChatTemplate, Check, Fingerprint
from sft_plugins_templates._sources import load

IM_END = "<|im_end|>"

TOOL_RESPONSE = ("<tool_response>", "</tool_response>")
"""A user message wrapped in these is a tool result to the template, not a user query."""


def _is_query(message: Mapping[str, Any]) -> bool:
    """Whether the template counts ``message`` as a user query (its ``last_query_index``)."""
    content = message.get("content")
    text = content.strip() if isinstance(content, str) else ""
    return message.get("role") == "user" and not (
        text.startswith(TOOL_RESPONSE[0]) and text.endswith(TOOL_RESPONSE[1]))


def _inline_reasoning_loses_text(content: str) -> bool:
    """Whether cutting a ``<think>`` block out of ``content`` as the template does (reasoning:
    what precedes the first ``</think>``, after its last ``<think>``; answer: what follows the
    last ``</think>``) drops text: text before ``<think>``, or between two ``</think>``."""
    text = content.strip()
    head = text.split("</think>")[0]
    return text.count("</think>") > 1 or head.rpartition("<think>")[0] != ""


THINK_SPLIT = ("the content holds '</think>' but is not one '<think>...</think>' block followed "
               "by the answer; the template would cut the text before '<think>' or between the "
               "'</think>' tags out of the turn. Put the reasoning in 'reasoning_content' and "
               "the answer in 'content'")
THINK_KEPT = ("the content holds '</think>', but the template reads reasoning only from "
              "'reasoning_content': it would write an empty <think> block and then this one as "
              "the answer. Put the reasoning in 'reasoning_content' and the answer in 'content'")


def _rules(family: str, *, splits_content: bool = True) -> Check:
    """The conversation rules of a Qwen 3.5 / 3.6 / 3.8 template, naming ``family`` in
    refusals. ``splits_content``: the template takes a ``<think>`` block out of the content
    (3.5, 3.6); otherwise it renders the content as it is (3.8) and accepts ``arguments: ""``
    for a call without arguments."""

    def fail(index: int | None, rule: str, what: str) -> ConversationError:
        where = "" if index is None else f" message {index}:"
        return ConversationError(f"{family}:{where} {what}", message_index=index, rule=rule)

    def check(messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
        if not any(_is_query(m) for m in messages):
            raise fail(None, "no-user-query",
                       "the conversation needs a user message that is not only a "
                       "<tool_response> block (the template refuses one without a user query)")
        for index, message in enumerate(messages):
            _check_tool_calls(fail, index, message, empty_ok=not splits_content)
            content = message.get("content")
            if message.get("role") != "assistant" or reasoning_of(message) is not None \
                    or not isinstance(content, str) or "</think>" not in content:
                continue
            if not splits_content:
                raise fail(index, "think-in-content", THINK_KEPT)
            if _inline_reasoning_loses_text(content):
                raise fail(index, "think-in-content", THINK_SPLIT)

    return check


def _check_tool_calls(fail: Callable[[int | None, str, str], ConversationError], index: int,
                      message: Mapping[str, Any], *, empty_ok: bool) -> None:
    """Each argument becomes a ``<parameter=NAME>`` block, read with ``|items``: a JSON string
    (or any non-object) of arguments fails inside the template; ``empty_ok`` where it skips
    ``arguments: ""``."""
    for call in message.get("tool_calls") or ():  # each has a 'function' object (validated)
        function = call["function"]
        arguments = function.get("arguments", {})
        if not isinstance(arguments, Mapping) and not (empty_ok and arguments == ""):
            raise fail(index, "tool-call-arguments",
                       "tool call arguments must be an object (a dict), one <parameter=...> "
                       "block each; decode a JSON string of arguments first")


_COMMON: dict[str, Any] = {
    "eos_token": IM_END, "end_of_turn": IM_END,
    # Qwen 3.5 and later tokenizers pad with <|vision_pad|>; <|endoftext|> where one lacks it
    "pad_token": "<|vision_pad|>", "pad_fallbacks": ("<|endoftext|>",),
    "stop_tokens": (IM_END, "<|endoftext|>"), "system": "first",
    "roles": ("system", "user", "assistant", "tool"), "tools": True, "tool_calls": True,
    "reasoning": True,
}

FIXES = ("marks each assistant turn (its <think> block where the template writes one, content, "
         "tool calls, <|im_end|>) with {% generation %}",)

_REASONING = (
    "Reasoning ('reasoning_content', or 'thinking'/'reasoning', or one <think> block opening "
    "the content) is kept for the turns after the last user query, each of which gets a "
    "<think> block (empty without reasoning); earlier turns are rendered without it.")

QWEN3_5_THINK = ChatTemplate(
    name="qwen3.5-think",
    aliases=("qwen-3.5-think", "qwen3_5_think"),
    description=(
        "Qwen 3.5, 4B and larger (thinking by default; enable_thinking=False for the "
        "non-thinking generation prompt), <function=...> XML tool calls.\n" + _REASONING),
    source=load("qwen3_5_think.jinja"),
    fingerprints=(Fingerprint(
        "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715",
        "Qwen 3.5 (4B and larger), official template"),),
    fixes=FIXES, checks=(_rules("qwen3.5-think"),),
    **_COMMON,
)

QWEN3_5_NOTHINK = ChatTemplate(
    name="qwen3.5-nothink",
    aliases=("qwen-3.5-nothink", "qwen3_5_nothink"),
    description=(
        "Qwen 3.5, 2B and smaller (not thinking by default; enable_thinking=True for the "
        "thinking generation prompt), <function=...> XML tool calls.\n" + _REASONING),
    source=load("qwen3_5_nothink.jinja"),
    fingerprints=(Fingerprint(
        "273d8e0e683b885071fb17e08d71e5f2a5ddfb5309756181681de4f5a1822d80",
        "Qwen 3.5 (2B and smaller), official template"),),
    fixes=FIXES, checks=(_rules("qwen3.5-nothink"),),
    **_COMMON,
)

QWEN3_6 = ChatTemplate(
    name="qwen3.6",
    aliases=("qwen-3.6", "qwen3_6"),
    description=(
        "Qwen 3.6 (thinking by default), <function=...> XML tool calls; "
        "render(..., preserve_thinking=True) keeps every turn's <think> block.\n" + _REASONING
        + " With preserve_thinking=True every turn keeps its reasoning, so all of them train."),
    source=load("qwen3_6.jinja"),
    fingerprints=(Fingerprint(
        "e84f32a23fdda27689f868aa4a1a5621f41133e51a48d7f3efcbea2839574259",
        "Qwen 3.6, official template"),),
    fixes=FIXES, checks=(_rules("qwen3.6"),),
    **_COMMON,
)

QWEN3_8 = ChatTemplate(
    name="qwen3.8",
    aliases=("qwen-3.8", "qwen3_8"),
    description=(
        "Qwen 3.8 (thinking by default), <function=...> XML tool calls; every turn keeps its "
        "<think> block unless preserve_thinking=False; reasoning_effort (xhigh by default, "
        "medium, low) writes an instruction into the system prompt.\n"
        "Reasoning comes from 'reasoning_content' (or 'thinking'/'reasoning') only; a <think> "
        "block in the content is refused (the template would render it as the answer). Train "
        "with the reasoning_effort the model will be served with."),
    source=load("qwen3_8.jinja"),
    fingerprints=(Fingerprint(
        "c3cf9e34abf4f9e36c2d72165aa9c132d3e2a725b6c2586aaa3a8af9d7a81041",
        "Qwen 3.8, official template"),),
    fixes=FIXES, checks=(_rules("qwen3.8", splits_content=False),),
    **_COMMON,
)

TEMPLATES = (QWEN3_5_THINK, QWEN3_5_NOTHINK, QWEN3_6, QWEN3_8)
