"""Gemma 4 instruction-tuned: ``<|turn>role ... <turn|>`` turns, tool calls and their results
inside the model's turn, thinking in a ``<|channel>thought ... <channel|>`` block.

The template keeps the shape of a tool-using turn in one model turn: the model writes its tool
calls and stops at ``<|tool_response>``, the results follow, and the model goes on with its answer
without a new header. It renders an assistant message's reasoning only on turns that call tools
after the last user message, strips ``<|channel>...<channel|>`` from content, and writes content
given beside tool calls after their results. Conversations it would render differently from what
they say are refused here, naming the rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sft_plugins.data.schema import reasoning_of
from sft_plugins.errors import ConversationError
from sft_plugins.templates import ChatTemplate, Fingerprint
from sft_plugins_templates._sources import load

END_OF_TURN = "<turn|>"
TOOL_RESPONSE = "<|tool_response>"
"""The model stops here after its tool calls; the results are appended after it."""

SCHEMA_KEY_BUG = ("leaves tool parameters named 'description', 'type', 'properties', "
                  "'required' or 'nullable' out of the tool declarations it renders, so the "
                  "model is trained with tools that lack them")
FIRST_TEXT_BUGS = (
    "renders OpenAI-style tool messages (role 'tool') as a '<|turn>tool' turn of their own and "
    "closes the model turn right after its tool calls, where the current template writes the "
    "results inside the model turn after <|tool_response>",
    "never renders an assistant turn's reasoning (reasoning_content), not even on tool-call turns",
    SCHEMA_KEY_BUG,
)


def _fail(index: int, rule: str, what: str) -> ConversationError:
    return ConversationError(f"gemma-4: message {index}: {what}", message_index=index, rule=rule)


def _assistant_rules(index: int, message: Mapping[str, Any]) -> None:
    """What the template would reorder, rewrite or drop in an assistant message."""
    calls = message.get("tool_calls")
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    if "<|channel>" in text or "<channel|>" in text:
        raise _fail(index, "thinking-in-content",
                    "the template strips <|channel>...<channel|> blocks (and stray markers) from "
                    "assistant content; give a tool-call turn's reasoning as reasoning_content "
                    "(an answer's reasoning cannot be rendered)")
    for call in calls or ():
        if not isinstance(call["function"].get("arguments"), Mapping):
            raise _fail(index, "tool-call-arguments",
                        "tool call arguments must be an object: the template writes a string "
                        "verbatim inside its own braces instead of in Gemma's argument syntax "
                        "(decode a JSON string with json.loads first)")
    if calls and text.strip():
        raise _fail(index, "tool-call-content",
                    "the template writes content given beside tool calls after their results, "
                    "as the answer; put the answer in its own assistant message after the tool "
                    "messages, and leave this content empty")
    reasoning = reasoning_of(message)
    if not calls and isinstance(reasoning, str) and reasoning.strip():
        raise _fail(index, "reasoning-needs-tool-call",
                    "the template renders reasoning only on turns that call tools (after the "
                    "last user message); an answer's reasoning is never in the text, so it "
                    "cannot be trained. Remove it, or use a family that renders it")


def _result_name(index: int, message: Mapping[str, Any],
                 calls: Sequence[Mapping[str, Any]]) -> None:
    """The template writes a tool result as ``response:NAME{...}``, NAME being the last call
    whose ``id`` equals the result's ``tool_call_id`` (both missing counts as equal), else the
    result's ``name``. With neither it fails; with calls of different names it mislabels."""
    matching = {call["function"]["name"] for call in calls
                if call.get("id") == message.get("tool_call_id")}
    if len(matching) == 1 or (not matching and isinstance(message.get("name"), str)):
        return
    raise _fail(index, "tool-result-name",
                "the template writes the tool's name before its result: give the tool message a "
                "'tool_call_id' equal to the 'id' of the call it answers (or, when the calls have "
                "no ids, a 'name' and a single call)")


def _turn_rules(messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
    """Gemma 4 writes tool results into the model turn that called the tools (a tool message
    anywhere else is refused by every template), never results given on the assistant message,
    and an assistant message right after another one would lose its header."""
    previous: Mapping[str, Any] | None = None
    calls: Sequence[Mapping[str, Any]] = ()
    for index, message in enumerate(messages):
        if message.get("role") == "assistant":
            calls = message.get("tool_calls") or ()
        elif message.get("role") == "tool":
            _result_name(index, message, calls)
        if message.get("tool_responses") is not None:
            raise _fail(index, "tool-responses",
                        "write each tool result as a tool message after the assistant message "
                        "that calls the tools (tool_responses is not supported)")
        if message.get("role") == "assistant":
            if previous is not None and previous.get("role") == "assistant":
                raise _fail(index, "consecutive-assistant",
                            "an assistant message right after another one is rendered as the "
                            "same model turn without a header; put the tool results between "
                            "them, or merge the two messages")
            _assistant_rules(index, message)
        previous = message


GEMMA_4 = ChatTemplate(
    name="gemma-4",
    aliases=("gemma4",),
    description=(
        "Gemma 4 IT: <|turn>/<turn|> turns, tool calls and results inside the model turn, "
        "thinking on tool-call turns; render(..., enable_thinking=True) turns thinking on.\n"
        "Reasoning (reasoning_content, thinking or reasoning) is rendered and trained on "
        "assistant turns with tool calls after the last user message; the template never "
        "renders an answer's reasoning, so it is refused there."),
    source=load("gemma4_v4.jinja"),
    bos_token="<bos>", eos_token="<eos>", end_of_turn=END_OF_TURN, pad_token="<pad>",
    stop_tokens=(END_OF_TURN, TOOL_RESPONSE, "<eos>"), renders_bos=True,
    fingerprints=(
        Fingerprint("2f1b4d75d067bae3fe44e676721c7f077d243bc007156cb9c2f8b5836613d082",
                    "Gemma 4 IT, current official template"),
        Fingerprint("781d10940fbc44be40064b5d43a056fc486c84ceaa55538226368b57314132bf",
                    "Gemma 4 IT, earlier template (tool results in the model turn)",
                    bugs=(SCHEMA_KEY_BUG,)),
        Fingerprint("55572b8d3c8342044e25874c73fe5234b661fa0a57a57f6ef75b58e03d7d959a",
                    "Gemma 4 IT, first template", bugs=FIRST_TEXT_BUGS),
    ),
    fixes=("marks each model turn's own output (thinking, tool calls and the <|tool_response> "
           "it stops at, or content and <turn|>) with {% generation %}",
           "renders <bos> itself: tokenize with add_special_tokens=False (no double BOS)",
           "renders the current text: tool results inside the model turn, reasoning on "
           "tool-call turns, every tool parameter declared"),
    roles=("system", "user", "assistant", "tool"), system="anywhere",
    tools=True, tool_calls=True, reasoning=True, checks=(_turn_rules,),
)

TEMPLATES = (GEMMA_4,)
