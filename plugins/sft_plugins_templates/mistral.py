"""Mistral-7B-Instruct-v0.3: ``<s>[INST] user[/INST] answer</s>``, with ``[AVAILABLE_TOOLS]``,
``[TOOL_CALLS]`` and ``[TOOL_RESULTS]`` blocks.

The official template enforces its rules with ``raise_exception`` in the middle of rendering;
here they are checked up front, naming the message and the rule. Two of its behaviours would
change a training example in silence, so they are refused instead. It writes the system prompt
only into the last message, and only when that is a user message: a conversation that ends
with an answer, as every training example does, is rendered without it, so this family takes
no system message (``no-system``; put the instructions into the first user message). And it
never renders the content of an assistant message with tool calls. It has no generation
prompt: ``[/INST]`` ends the prompt, and the model's answer starts with a space.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from sft_plugins.errors import ConversationError
from sft_plugins.templates import ChatTemplate, Fingerprint
from sft_plugins_templates._sources import load

EOS = "</s>"
TOOL_CALL_ID = re.compile(r"[A-Za-z0-9]{9}")
"""What Mistral's tool call ids are: nine letters or digits (the template checks the length)."""


def _fail(index: int, rule: str, what: str) -> ConversationError:
    return ConversationError(f"mistral: message {index}: {what}", message_index=index, rule=rule)


def _alternation(messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
    """User and assistant turns alternate starting with a user turn; assistant tool calls and
    their results sit between them without counting."""
    turns = 0
    for index, message in enumerate(messages):
        if message.get("role") == "tool" or message.get("tool_calls") is not None:
            continue
        expected = "user" if turns % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise _fail(index, "alternation",
                        f"roles must alternate user/assistant (tool calls and their results "
                        f"aside); expected {expected!r}, got {message.get('role')!r}")
        turns += 1


def _tool_list(messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
    """The template writes the tool list before each user message equal to the last one (it
    compares whole messages), and an empty list as a broken ``[AVAILABLE_TOOLS] [``: so the
    list must hold tools, and exactly one user message must be the last one."""
    if tools is None:
        return
    if not tools:
        raise _fail(len(messages) - 1, "empty-tools",
                    "an empty tool list is written as a broken '[AVAILABLE_TOOLS] [' block; "
                    "pass no tools instead")
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise _fail(len(messages) - 1, "tools-need-user-message",
                    "the template writes the tool list before the last user message, and this "
                    "conversation has none")
    last = _as_rendered(messages[users[-1]])
    repeated = next((i for i in users[:-1] if _as_rendered(messages[i]) == last), None)
    if repeated is not None:
        raise _fail(repeated, "tools-repeated",
                    f"this user message equals the last one (message {users[-1]}), so the "
                    "template would write the tool list before both; reword one of them")


def _as_rendered(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message as the template compares it (fields that are None are not passed)."""
    return {key: value for key, value in message.items() if value is not None}


def _tool_calls(messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
    """A tool call is written as its ``function`` object (arguments as an object, since a JSON
    string would be quoted again) plus its nine-character ``id``; the message's content is not
    rendered."""
    for index, message in enumerate(messages):
        for call in message.get("tool_calls") or ():
            if not isinstance(call["function"].get("arguments"), Mapping):
                raise _fail(index, "tool-call-arguments",
                            "tool call arguments must be an object (the template writes the "
                            "function with tojson, so a JSON string would be quoted again)")
            _check_id(index, call.get("id"), "each tool call needs an 'id'")
        if message.get("tool_calls") and message.get("content"):
            raise _fail(index, "tool-call-content",
                        "the template drops the content of an assistant message with tool "
                        "calls; move the text to its own assistant message or leave content "
                        "empty")
        if message.get("role") == "tool":
            _check_id(index, message.get("tool_call_id"),
                      "a tool message needs the 'tool_call_id' of its call")


def _check_id(index: int, value: Any, what: str) -> None:
    if not isinstance(value, str) or not TOOL_CALL_ID.fullmatch(value):
        raise _fail(index, "tool-call-id",
                    f"{what}: nine letters or digits (Mistral's tool call ids), got {value!r}")


MISTRAL = ChatTemplate(
    name="mistral",
    aliases=("mistral-v0.3", "mistral-7b-instruct-v0.3"),
    description=(
        "Mistral-7B-Instruct-v0.3: [INST] ... [/INST] turns, strict alternation, "
        "[TOOL_CALLS] with nine-character ids; no generation prompt ([/INST] ends the prompt).\n"
        "No system message: the official template keeps one only in a conversation that ends "
        "with a user message, never in a training example."),
    source=load("mistral.jinja"),
    bos_token="<s>", eos_token=EOS, end_of_turn=EOS, stop_tokens=(EOS,), renders_bos=True,
    # v0.3 declares no pad token; <unk> (id 0) is in every Mistral SentencePiece vocabulary
    pad_token="<unk>",
    fingerprints=(Fingerprint(
        "cafb64e0e9e5fd2503054b3479593fae39cbdfd52338ce8af9bb4664a8eb05bd",
        "Mistral-7B-Instruct-v0.3, official template"),),
    fixes=("marks each assistant turn (' ' + content + '</s>', or the [TOOL_CALLS] list + "
           "'</s>') with {% generation %}",
           "renders <s> itself: tokenize with add_special_tokens=False (no double BOS)"),
    roles=("system", "user", "assistant", "tool"), system="none", tools=True, tool_calls=True,
    checks=(_alternation, _tool_list, _tool_calls),
)

TEMPLATES = (MISTRAL,)
