"""GLM-4.5 / GLM-4.6 (GLM-4-MoE): ``[gMASK]<sop>`` then ``<|system|>``, ``<|user|>``,
``<|assistant|>`` and ``<|observation|>`` turns, ``<think>`` blocks and tool calls written as
``<tool_call>name<arg_key>..</arg_key><arg_value>..</arg_value></tool_call>``.

GLM has no end-of-turn token: an assistant turn ends where the next role token begins, and the
model stops generating at ``<|user|>`` or ``<|observation|>``. So the trained span of an assistant
turn runs through that next role token, and a turn that nothing follows is closed with
``<|user|>`` (the official template leaves it open: trained as is, the model would never learn to
stop; ``close_last_turn=False`` renders the official text byte for byte).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sft_plugins.errors import ConversationError
from sft_plugins.templates import ChatTemplate, Fingerprint
from sft_plugins_templates._sources import load

USER = "<|user|>"
OBSERVATION = "<|observation|>"
ENDOFTEXT = "<|endoftext|>"


def _arguments_are_objects(messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
    """The template iterates ``arguments.items()``: a JSON string would fail to render."""
    for index, message in enumerate(messages):
        for call in message.get("tool_calls") or ():
            if not isinstance(call["function"].get("arguments"), Mapping):
                raise ConversationError(
                    f"glm-4-moe: message {index}: tool call arguments must be an object (the "
                    "template writes each key and value as <arg_key>/<arg_value>); decode the "
                    "JSON string first", message_index=index, rule="tool-call-arguments")


def _assistant_turns_end(messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
    """An assistant turn is closed by the role token of the message after it; only a user
    (``<|user|>``) or tool (``<|observation|>``) message gives it one the model stops at."""
    for index, message in enumerate(messages[:-1]):
        following = messages[index + 1].get("role")
        if message.get("role") == "assistant" and following not in ("user", "tool"):
            raise ConversationError(
                f"glm-4-moe: message {index}: an assistant message followed by a {following} "
                "message has no end-of-turn token in GLM's format (the model stops at <|user|> or "
                "<|observation|>), so it would be trained without learning to stop; merge the "
                "two messages or move the other message after the next user message",
                message_index=index, rule="assistant-turn-end")


GLM_4_MOE = ChatTemplate(
    name="glm-4-moe",
    aliases=("glm-4.5", "glm-4.6", "glm4moe"),
    description=(
        "GLM-4.5 / GLM-4.6 (MoE): <|user|>/<|assistant|>/<|observation|> turns, <think> blocks, "
        "<tool_call> with <arg_key>/<arg_value>.\n"
        "An assistant turn is trained through the role token that follows it (<|user|> or "
        "<|observation|>), the token the model stops at; the last turn is closed with <|user|> "
        "unless close_last_turn=False (the official text). Reasoning ('reasoning_content' or a "
        "<think> block in the content) is kept for the turns after the last user message; "
        "enable_thinking=False appends /nothink to user messages and an empty <think> block to "
        "the generation prompt."),
    source=load("glm4moe.jinja"),
    eos_token=ENDOFTEXT, end_of_turn=USER, pad_token=ENDOFTEXT,
    stop_tokens=(USER, OBSERVATION, ENDOFTEXT), renders_bos=True,
    fingerprints=(
        Fingerprint("44f815868bf02fa458dd2f741a338046f4bf45f398eb6d067766726b9d96cce3",
                    "GLM-4.5, official template"),
        # GLM-4.6 writes `tc.arguments or {}`: the same text for every call with arguments
        Fingerprint("b1e56a48a6c16b1ccc8c3c8f2e2a28d6627efb93f15fbfe13eb1bbd175a4756b",
                    "GLM-4.6, official template"),
    ),
    fixes=("marks each assistant turn (thinking, content, tool calls and the role token that "
           "ends it, <|user|> or <|observation|>) with {% generation %}",
           "closes the last assistant turn with <|user|>, which the official template leaves "
           "open, so the model learns to stop (close_last_turn=False turns this off)",
           "renders its [gMASK]<sop> prefix itself: tokenize with add_special_tokens=False"),
    roles=("system", "user", "assistant", "tool"), system="anywhere",
    tools=True, tool_calls=True, reasoning=True,
    checks=(_arguments_are_objects, _assistant_turns_end),
)

TEMPLATES = (GLM_4_MOE,)
