"""OLMo 3 (Ai2): ChatML turns with OLMo's own function calling: a ``functions`` string on a
system or user message, ``function_calls`` (a string) on an assistant message, results in an
``environment`` message. A default system prompt is written when the conversation has none, and
the generation prompt opens a ``<think>`` block.

The template reads neither the ``tools`` list, nor ``tool_calls``, nor a ``tool`` role, nor a
reasoning field: each is refused rather than dropped. Reasoning is written inline, as
``<think>...</think>`` at the start of the assistant's content (the trained turn starts after
``<|im_start|>assistant\\n``, so the model learns to open the block itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sft_plugins.errors import ConversationError
from sft_plugins.templates import ChatTemplate, Fingerprint
from sft_plugins_templates._sources import load

IM_END = "<|im_end|>"
EOS = "<|endoftext|>"
"""The template closes a conversation's last assistant message with it (earlier ones with
``<|im_end|>``): the end of turn a one-exchange example, the common case, trains."""

FUNCTION_ROLES = {"functions": ("system", "user"), "function_calls": ("assistant",)}
"""OLMo's function-calling fields and the roles whose turns render them."""


def _function_fields(messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
    """The template concatenates ``functions`` and ``function_calls`` as text, and renders each
    only on the roles that carry it: anything else would fail or vanish."""
    for index, message in enumerate(messages):
        for field, roles in FUNCTION_ROLES.items():
            value = message.get(field)
            if value is None:
                continue
            if message.get("role") not in roles or not isinstance(value, str):
                raise ConversationError(
                    f"olmo-3: message {index}: {field!r} must be a string on a "
                    f"{' or '.join(roles)} message (the template renders it nowhere else)",
                    message_index=index, rule="function-fields")


OLMO_3 = ChatTemplate(
    name="olmo-3",
    aliases=("olmo3",),
    description=(
        "OLMo 3 (Think): ChatML with OLMo's default system prompt; functions/function_calls "
        "strings and environment messages for function calling; the generation prompt opens "
        "<think>.\n"
        "Write reasoning inline as <think>...</think> at the start of the assistant content; "
        "the last assistant turn ends with <|endoftext|>, earlier ones with <|im_end|>."),
    source=load("olmo3.jinja"),
    eos_token=EOS, end_of_turn=EOS, pad_token="<|pad|>", stop_tokens=(IM_END, EOS),
    fingerprints=(Fingerprint(
        "6d549883b5ed12879e191845c256a30c7dfd4eced0a4f160060a3ea0199d9e3a",
        "OLMo 3 Think, official template"),),
    fixes=("marks each assistant turn (content, function calls and its closing token: "
           "<|im_end|>, or <|endoftext|> for the last message) with {% generation %}",),
    roles=("system", "user", "assistant", "environment"), system="anywhere",
    function_fields=True, checks=(_function_fields,),
)

TEMPLATES = (OLMO_3,)
