"""DeepSeek-V3: full-width bar tokens (``<｜User｜>``, ``<｜Assistant｜>``), tool calls as
fenced JSON, ``</think>`` reasoning dropped from earlier turns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sft_plugins.errors import ConversationError
from sft_plugins.templates import ChatTemplate, Fingerprint
from sft_plugins_templates._sources import load

EOS = "<｜end▁of▁sentence｜>"


def _string_tool_calls(messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
    """The template concatenates the call's type, name and arguments, and the content."""
    for index, message in enumerate(messages):
        for call in message.get("tool_calls") or ():
            if not isinstance(call.get("type"), str) or \
                    not isinstance(call["function"].get("arguments"), str):
                raise ConversationError(
                    f"deepseek-v3: message {index}: each tool call needs a string 'type' and "
                    "its 'arguments' as a JSON string", message_index=index,
                    rule="tool-call-arguments")
        if message.get("tool_calls") and not isinstance(message.get("content"), str):
            raise ConversationError(
                f"deepseek-v3: message {index}: an assistant message with tool calls needs "
                "string content (it may be empty)", message_index=index,
                rule="content-not-string")


DEEPSEEK_V3 = ChatTemplate(
    name="deepseek-v3",
    aliases=("deepseekv3", "deepseek"),
    description="DeepSeek-V3: <｜User｜>/<｜Assistant｜> turns, fenced-JSON tool calls.",
    source=load("deepseekv3.jinja"),
    bos_token="<｜begin▁of▁sentence｜>", eos_token=EOS, end_of_turn=EOS,
    pad_token="<｜▁pad▁｜>", stop_tokens=(EOS,), renders_bos=True,
    fingerprints=(Fingerprint(
        "563b1ce7d61d50a9b4c7439a912a1116f095b712df5b5e4d3e1116049874eb64",
        "DeepSeek-V3, official template"),),
    fixes=("marks each assistant turn (content or tool calls, plus the end-of-sentence token) "
           "with {% generation %}",
           "renders its BOS itself: tokenize with add_special_tokens=False (no double BOS)"),
    roles=("system", "user", "assistant", "tool"), tool_calls=True,
    checks=(_string_tool_calls,),
)

TEMPLATES = (DEEPSEEK_V3,)
