"""OpenAI gpt-oss: the harmony format, ``<|start|>role<|channel|>...<|message|>...<|end|>``.

An assistant turn is one or more harmony messages after the ``<|start|>assistant`` prompt: its
reasoning on the ``analysis`` channel, then either the answer on ``final`` or one tool call on
``commentary`` (``to=functions.NAME``, closed by ``<|call|>``). Generation stops at ``<|return|>``
(the answer is done) or ``<|call|>`` (a tool is to run), never at ``<|end|>``, which also closes
the analysis message the answer follows.

The official template renders the answer of the last message with ``<|return|>`` and its
reasoning, as training needs; every earlier answer appears as history: closed by ``<|end|>``
and without its reasoning (so masking refuses to train such a turn when the data gives it
reasoning, ``reasoning_dropped``). The reasoning of a tool call is kept only while no final
answer follows it. Multi-turn data trains as the model generates with the collator option
``expand=all``: each answer is then the last of its own example. The system message carries
today's date (``strftime_now``, no variable overrides it), ``model_identity``,
``reasoning_effort`` and ``builtin_tools``; the conversation's own system or developer message
becomes the developer message's instructions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sft_plugins.errors import ConversationError
from sft_plugins.templates import ChatTemplate, Fingerprint
from sft_plugins_templates._sources import load

RETURN = "<|return|>"
CALL = "<|call|>"
CHANNEL_TAGS = ("<|channel|>analysis<|message|>", "<|channel|>final<|message|>")


def _fail(index: int, rule: str, what: str) -> ConversationError:
    return ConversationError(f"gpt-oss: message {index}: {what}", message_index=index, rule=rule)


def _instructions_first(messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
    """The template takes a system or developer message only as the first message (it becomes
    the developer instructions) and renders nothing for one anywhere else."""
    for index, message in enumerate(messages):
        if message.get("role") == "developer" and index != 0:
            raise _fail(index, "system-not-first",
                        "a developer (or system) message is only accepted as the first "
                        "message; the template drops one anywhere else")


def _no_channel_tags(messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
    """Harmony tags written into the text are refused by the template itself; say which
    message and what to do before rendering."""
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        for field in ("content", "thinking", "reasoning_content", "reasoning"):
            text = message.get(field)
            if isinstance(text, str) and any(tag in text for tag in CHANNEL_TAGS):
                raise _fail(index, "channel-tags",
                            f"{field!r} holds harmony <|channel|> tags; put the analysis text "
                            "in 'reasoning_content' (or 'thinking') and the answer in "
                            "'content', without tags")


def _tool_calls(messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
    """What the template renders of a tool call: the first call only, its arguments through
    ``tojson`` (an object; a JSON string would be written as a quoted string), and the message's
    content as analysis text, dropped when a final answer follows; so one call per message, an
    object of arguments, and no content beside it."""
    for index, message in enumerate(messages):
        calls = message.get("tool_calls")
        if not calls:
            continue
        if message.get("content"):
            raise _fail(index, "tool-call-content",
                        "the template renders the content of a message with a tool call as "
                        "hidden analysis (and drops it when a final answer follows); put that "
                        "reasoning in 'reasoning_content' (or 'thinking') and leave content "
                        "empty")
        if len(calls) != 1:
            raise _fail(index, "one-tool-call",
                        f"harmony calls one tool per assistant message, got {len(calls)} (the "
                        "template renders only the first); give each call its own assistant "
                        "message, followed by its tool result")
        if not isinstance(calls[0]["function"].get("arguments"), Mapping):
            raise _fail(index, "tool-call-arguments",
                        "tool call arguments must be an object (the template writes them with "
                        "tojson, so a JSON string would become a quoted string)")


GPT_OSS = ChatTemplate(
    name="gpt-oss",
    aliases=("gptoss", "harmony", "gpt-oss-20b", "gpt-oss-120b"),
    description=(
        "OpenAI gpt-oss (harmony): reasoning on the analysis channel, the answer on final, one "
        "tool call per message on commentary.\n"
        "render(..., reasoning_effort='low'|'medium'|'high', model_identity=..., "
        "builtin_tools=['browser', 'python']) as in the official template; the system message "
        "holds today's date. Reasoning ('reasoning_content' or 'thinking') is trained with the "
        "last answer and with a tool call no answer follows; earlier answers are history "
        "(closed by <|end|>, reasoning dropped): train multi-turn data with the collator "
        "option expand=all."),
    source=load("gptoss.jinja"),
    bos_token="<|startoftext|>", eos_token=RETURN, end_of_turn=RETURN,
    pad_token="<|endoftext|>", stop_tokens=(RETURN, CALL, "<|endoftext|>"),
    fingerprints=(Fingerprint(
        "a4c9919cbbd4acdd51ccffe22da049264b1b73e59055fa58811a99efbd7c8146",
        "gpt-oss, official template"),),
    fixes=("marks each assistant turn with {% generation %}: everything after the "
           "<|start|>assistant prompt (its analysis where rendered, the answer or the tool "
           "call, and <|return|>, <|call|> or, for an earlier answer, <|end|>)",),
    roles=("system", "developer", "user", "assistant", "tool"),
    tools=True, tool_calls=True, reasoning=True,
    checks=(_instructions_first, _no_channel_tags, _tool_calls),
)

TEMPLATES = (GPT_OSS,)
