"""Qwen2.5, Qwen3 and Qwen3-Instruct-2507: ChatML with a default system prompt (2.5), tool
calls as JSON in ``<tool_call>`` tags and, for the hybrid Qwen3, ``<think>`` blocks
(``enable_thinking`` on or off). Qwen 3.5 and 3.6 live in :mod:`sft_plugins_templates.qwen3_5`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sft_plugins.errors import ConversationError
from sft_plugins.templates import ChatTemplate, Fingerprint
from sft_plugins_templates._sources import load

IM_END = "<|im_end|>"

_COMMON: dict[str, Any] = {
    "eos_token": IM_END, "end_of_turn": IM_END, "pad_token": "<|endoftext|>",
    "stop_tokens": (IM_END, "<|endoftext|>"), "system": "anywhere",
    "roles": ("system", "user", "assistant", "tool"), "tools": True, "tool_calls": True,
}

QWEN2_5 = ChatTemplate(
    name="qwen2.5",
    aliases=("qwen-2.5", "qwen2"),
    description="Qwen2.5 Instruct (ChatML, default system prompt, <tool_call> tool calls).",
    source=load("qwen2_5.jinja"),
    fingerprints=(Fingerprint(
        "55b2f4a26ac9ee719330a61a0c39d9e538b0e9322212f048326318cff4f8674a",
        "Qwen2.5 Instruct, official template"),),
    fixes=("marks each assistant turn (content, tool calls, <|im_end|>) with {% generation %}",),
    **_COMMON,
)

QWEN3 = ChatTemplate(
    name="qwen3",
    aliases=("qwen-3",),
    description=(
        "Qwen3 hybrid thinking: <think> blocks; render(..., enable_thinking=False) for the "
        "non-thinking generation prompt.\n"
        "Reasoning from 'reasoning_content' (or 'thinking'/'reasoning', or a <think> block in "
        "the content) is kept for the turns after the last user query and trained with them."),
    source=load("qwen3.jinja"),
    fingerprints=(Fingerprint(
        "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8",
        "Qwen3, official template"),),
    fixes=("marks each assistant turn (thinking, content, tool calls, <|im_end|>) with "
           "{% generation %}",),
    reasoning=True,
    **_COMMON,
)


def _arguments_given(messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
    """The template writes a call's arguments as they are (a JSON string) or as JSON (an
    object); a call without them fails inside the template."""
    for index, message in enumerate(messages):
        for call in message.get("tool_calls") or ():
            if "arguments" not in call["function"]:
                raise ConversationError(
                    f"qwen3-instruct-2507: message {index}: each tool call needs 'arguments' "
                    "(an object or a JSON string; {} when the tool takes none)",
                    message_index=index, rule="tool-call-arguments")


QWEN3_INSTRUCT_2507 = ChatTemplate(
    name="qwen3-instruct-2507",
    aliases=("qwen3-2507", "qwen3_instruct_2507"),
    description=(
        "Qwen3-*-Instruct-2507 (non-thinking): ChatML, <tool_call> JSON tool calls, no "
        "default system prompt.\n"
        "The template has no reasoning: a turn's reasoning field is refused (no-reasoning); a "
        "<think> block written in the content is rendered and trained as plain text."),
    source=load("qwen3_instruct_2507.jinja"),
    fingerprints=(Fingerprint(
        "64f85b198065d0fba2a81f37e10ed68161ce2c19a754c7100e67e0ca2ee9c326",
        "Qwen3-Instruct-2507, official template"),),
    fixes=("marks each assistant turn (content, tool calls, <|im_end|>) with {% generation %}",),
    checks=(_arguments_given,),
    **_COMMON,
)

TEMPLATES = (QWEN2_5, QWEN3, QWEN3_INSTRUCT_2507)
