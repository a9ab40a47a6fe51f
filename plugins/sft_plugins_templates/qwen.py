"""Qwen2.5 and Qwen3 Instruct: ChatML with a default system prompt (2.5), tool calls in
``<tool_call>`` tags and, for Qwen3, ``<think>`` blocks (``enable_thinking`` on or off)."""

from __future__ import annotations

from typing import Any

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

TEMPLATES = (QWEN2_5, QWEN3)
