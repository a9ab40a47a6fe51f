"""DeepSeek-V3 and the DeepSeek-R1-Distill models: full-width bar tokens (``<｜User｜>``,
``<｜Assistant｜>``), ``</think>`` reasoning dropped from every assistant turn.

DeepSeek-V3 (DeepSeek-R1's template) writes tool calls as fenced JSON. The R1-Distill template
(the Qwen- and Llama-based distills ship the same text) cannot express tool calls through
``transformers`` at all: its tool-call branch needs ``content`` to be ``None``, a key
``apply_chat_template`` drops, and with any other content the calls are left out. It also
ignores ``tools`` and keeps only the last system message, so all three are refused.
"""

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

DEEPSEEK_R1_DISTILL = ChatTemplate(
    name="deepseek-r1-distill",
    aliases=("deepseek-r1-distill-qwen", "deepseek-r1-distill-llama", "r1-distill"),
    description=(
        "DeepSeek-R1-Distill-Qwen / -Llama: <｜User｜>/<｜Assistant｜> turns, generation prompt "
        "opening a <think> block.\n"
        "The template keeps only what follows </think> in every assistant turn, so reasoning "
        "cannot be trained with it (a reasoning field is refused, a <think> block in the "
        "content stops preparation with reasoning_dropped); no tools, no tool calls."),
    source=load("deepseek_r1_distill.jinja"),
    bos_token="<｜begin▁of▁sentence｜>", eos_token=EOS, end_of_turn=EOS, stop_tokens=(EOS,),
    renders_bos=True,
    # the checkpoints pad with their end of sentence; train with an unused token the vocabulary
    # has: <｜▁pad▁｜> or <|finetune_right_pad_id|> (Llama distills), <|fim_pad|> or
    # <|vision_pad|> (Qwen distills)
    pad_fallbacks=("<｜▁pad▁｜>", "<|finetune_right_pad_id|>", "<|fim_pad|>", "<|vision_pad|>"),
    fingerprints=(Fingerprint(
        "56a1447ad31926fdc21fb07e56e5642bd9c850c4f52d8c8af7bbe5f079a84f5f",
        "DeepSeek-R1-Distill (Qwen and Llama), official template"),),
    fixes=("marks each assistant turn (content after </think>, plus the end-of-sentence token) "
           "with {% generation %}",
           "renders its BOS itself: tokenize with add_special_tokens=False (no double BOS)"),
)

TEMPLATES = (DEEPSEEK_V3, DEEPSEEK_R1_DISTILL)
