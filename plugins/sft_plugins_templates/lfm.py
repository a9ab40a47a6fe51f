"""Liquid AI LFM2 and LFM2.5: ChatML turns after ``<|startoftext|>``, the tool list in the system
prompt, tool calls as one ``<|tool_call_start|>[name(key=value, ...)]<|tool_call_end|>`` block of
Python-style calls after the content; LFM2.5 adds ``<think>`` reasoning.

LFM2's first published template never read ``tool_calls``, so tool calls were dropped from the
text in silence (the model writes them as text in its content); its current template renders
them, and that is what ``lfm2`` renders. LFM2.5 keeps the reasoning of the turns after the last
user message only (all of it with ``preserve_thinking=True``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sft_plugins.errors import ConversationError
from sft_plugins.templates import ChatTemplate, Fingerprint
from sft_plugins_templates._sources import load

IM_END = "<|im_end|>"


def _object_arguments(family: str, messages: Sequence[Mapping[str, Any]]) -> None:
    """Both templates write each argument as ``key=value``, so they need an object."""
    for index, message in enumerate(messages):
        for call in message.get("tool_calls") or ():
            if not isinstance(call["function"].get("arguments"), Mapping):
                raise ConversationError(
                    f"{family}: message {index}: tool call arguments must be an object (decode "
                    "a JSON string with json.loads first)", message_index=index,
                    rule="tool-call-arguments")


def _lfm2_rules(messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
    """LFM2 leaves out the content beside tool calls when it is the text ``null``."""
    _object_arguments("lfm2", messages)
    for index, message in enumerate(messages):
        if message.get("tool_calls") and message.get("content") == "null":
            raise ConversationError(
                f"lfm2: message {index}: the template drops the content 'null' beside tool "
                "calls; leave the content empty", message_index=index, rule="tool-call-content")


def _lfm2_5_rules(messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
    """LFM2.5 quotes a string argument with single quotes and escapes nothing, so a quote in it
    would end the string early: the model would learn calls no parser reads back."""
    _object_arguments("lfm2.5", messages)
    for index, message in enumerate(messages):
        for call in message.get("tool_calls") or ():
            for key, value in call["function"]["arguments"].items():
                if isinstance(value, str) and "'" in value:
                    raise ConversationError(
                        f"lfm2.5: message {index}: the string argument {key!r} holds a single "
                        "quote, which the template writes unescaped inside single quotes (the "
                        "call would not parse back)", message_index=index,
                        rule="tool-call-argument-quote")


_COMMON: dict[str, Any] = {
    "bos_token": "<|startoftext|>", "eos_token": IM_END, "end_of_turn": IM_END,
    "pad_token": "<|pad|>", "stop_tokens": (IM_END, "<|endoftext|>"), "renders_bos": True,
    "roles": ("system", "user", "assistant", "tool"), "system": "anywhere",
    "tools": True, "tool_calls": True,
}
_BOS_FIX = "renders <|startoftext|> itself: tokenize with add_special_tokens=False (no double BOS)"

LFM2 = ChatTemplate(
    name="lfm2",
    aliases=("lfm-2",),
    description=(
        "LFM2 (Liquid AI): ChatML after <|startoftext|>, tools in the system prompt, tool calls "
        "as <|tool_call_start|>[name(key='value')]<|tool_call_end|> after the content, tool "
        "results in <|tool_response_start|>/<|tool_response_end|>."),
    source=load("lfm2_v2.jinja"),
    fingerprints=(
        Fingerprint("5504d163d879bfb6fd4135b7fa3d56768b2e69dd718338f7b146750289f46ab0",
                    "LFM2, current official template"),
        Fingerprint("cef187400d62a59507aab3a642ea9a8d2a2ef263562bc3430560e116945273cf",
                    "LFM2, first official template",
                    bugs=("never reads an assistant message's tool_calls: tool calls are left "
                          "out of the text in silence, and a turn that only calls tools is "
                          "trained as an empty answer",)),
    ),
    fixes=("marks each assistant turn (content, tool calls, <|im_end|>) with {% generation %}",
           "renders tool calls, as the current template does", _BOS_FIX),
    checks=(_lfm2_rules,),
    **_COMMON,
)

LFM2_5 = ChatTemplate(
    name="lfm2.5",
    aliases=("lfm-2.5", "lfm2_5"),
    description=(
        "LFM2.5 (Liquid AI): LFM2's format with <think> reasoning and tool calls after the "
        "content.\n"
        "Reasoning (reasoning_content, thinking or reasoning) is kept for the turns after the "
        "last user message; render(..., preserve_thinking=True) keeps it in every turn."),
    source=load("lfm2_2_5_v2.jinja"),
    fingerprints=(
        Fingerprint("c5b67247c9f736f6c40eaa91ae1ef27dc67f5b041eedaadb97a1bea5030fb0ff",
                    "LFM2.5, current official template"),
        Fingerprint("6d65c8804847ad74eea912dd7eca3dc1cf7a457b53a77f47d841a14121910963",
                    "LFM2.5, first official template"),
    ),
    fixes=("marks each assistant turn (thinking, content, tool calls, <|im_end|>) with "
           "{% generation %}, without the newline after <|im_end|>",
           _BOS_FIX),
    reasoning=True, checks=(_lfm2_5_rules,),
    **_COMMON,
)

TEMPLATES = (LFM2, LFM2_5)
