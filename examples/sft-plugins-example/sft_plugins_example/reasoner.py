"""A family with reasoning and tool calls, added entirely from outside sft-plugins.

The chat format is this example's own: Markdown headings per turn, the tool list at the top,
each tool call as ``<call>{"name": ..., "arguments": {...}}</call>``, tool output under its own
heading. Like Qwen3, it shows the reasoning (``<think>...</think>``) only for the assistant turns
after the last user message, so earlier turns lose it; sft-plugins then refuses to train such a
turn as an answer without thinking, and the collator option ``expand=reasoning`` trains each
assistant turn as its own example instead.

Everything the model must produce (reasoning, answer, tool calls, end-of-turn token) sits inside
``{% generation %}``; the tool list, the user's messages and tool output stay outside, so they
are never trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sft_plugins.errors import ConversationError
from sft_plugins.templates import ChatTemplate

END = "<|end_of_text|>"

REASONER_SOURCE = (
    "{{ '<|begin_of_text|>' }}"
    "{% if tools %}{{ '### Tools:\\n' }}{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}"
    "{% endfor %}{{ '\\n' }}{% endif %}"
    "{% set ns = namespace(last_user=-1) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}"
    "{% endif %}{% endfor %}"
    "{% for m in messages %}{% message m %}"
    "{% if m['role'] == 'assistant' %}{{ '### Assistant:\\n' }}{% generation %}"
    "{% if m.reasoning_content and loop.index0 > ns.last_user %}"
    "{{ '<think>' + m.reasoning_content + '</think>\\n' }}{% endif %}"
    "{% if m.content %}{{ m.content }}{% endif %}"
    "{% for call in m.tool_calls or [] %}"
    "{{ '<call>' + {'name': call.function.name, 'arguments': call.function.arguments} | tojson"
    " + '</call>' }}{% endfor %}"
    "{{ '" + END + "' }}{% endgeneration %}{{ '\\n\\n' }}"
    "{% elif m['role'] == 'tool' %}{{ '### Tool result:\\n' + m['content'] + '\\n\\n' }}"
    "{% else %}{{ '### ' + m['role'] | capitalize + ':\\n' + m['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}{% endmessages %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)


def _object_arguments(messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
    """The format writes the arguments as a JSON object; a JSON string would be written as a
    quoted string inside it, which is not what the model should learn to emit."""
    for index, message in enumerate(messages):
        for call in message.get("tool_calls") or ():
            if not isinstance(call["function"].get("arguments"), Mapping):
                raise ConversationError(
                    f"example-reasoner: message {index}: tool call arguments must be an object "
                    "(decode a JSON string first)", message_index=index,
                    rule="tool-call-arguments")


EXAMPLE_REASONER = ChatTemplate(
    name="example-reasoner",
    description="Markdown turns with <think> reasoning and <call> tool calls (example plugin).",
    source=REASONER_SOURCE,
    bos_token="<|begin_of_text|>", eos_token=END, end_of_turn=END,
    pad_token="<|finetune_right_pad_id|>", stop_tokens=(END,), renders_bos=True,
    roles=("system", "user", "assistant", "tool"), tools=True, tool_calls=True, reasoning=True,
    checks=(_object_arguments,),
)
