"""The canonical columns every prepared data set has, and how to read a row back.

Two kinds of prepared data exist. A *conversation* row holds ``messages`` (each with ``role``,
``content`` and, where present, ``tool_calls``, ``tool_call_id``, ``name`` and OLMo's
``functions``/``function_calls``), the ``tools``
offered to the model, and ``completion_index``: the index of the first message that belongs to
the completion of prompt/completion data (``None`` when every assistant turn is a candidate for
training). A *text* row holds ``text`` and ``completion_offset``: the character where the
completion starts (``None`` when every token is trained).

``tool_calls`` and ``tools`` are stored as JSON text rather than nested Arrow structs on purpose:
Arrow gives every struct in a column the union of the keys seen in any row, so a tool call's
``arguments`` would gain ``null`` keys from other tools, and the rendered prompt would change.
:func:`messages_from_row` and :func:`tools_from_row` decode them back exactly.

Every row also carries its provenance so that a later error (masking, truncation) can point at
the source: ``source_file`` (a path, or a description of an in-memory data set), ``source_row``
(0-based position of the example in that file or data set) and ``source_line`` (1-based line in
a JSON Lines file; ``None`` for other formats).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from datasets import Features, List, Value

Kind = Literal["conversation", "text"]

MESSAGE_FIELDS = ("role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name",
                  "functions", "function_calls")
"""Keys a canonical message may carry; ``tool_calls`` is JSON text. ``reasoning_content`` is an
assistant turn's reasoning, read from ``reasoning_content``, ``thinking`` or ``reasoning``.
``functions`` and ``function_calls`` are OLMo 3's own function calling (strings the template
writes as they are), kept so that only a template that renders them accepts them."""

REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
"""Where data sets put an assistant turn's reasoning (OpenAI-style APIs, TRL, others), in the
order they are looked for; the canonical field is ``reasoning_content``."""


def reasoning_of(message: Mapping[str, Any]) -> str | None:
    """A message's reasoning, from the first of :data:`REASONING_KEYS` it has."""
    return next((message[k] for k in REASONING_KEYS if message.get(k) is not None), None)


PROVENANCE = Features({
    "source_file": Value("string"),
    "source_row": Value("int64"),
    "source_line": Value("int64"),
})

CONVERSATION_FEATURES = Features({
    "messages": List({field: Value("string") for field in MESSAGE_FIELDS}),
    "tools": Value("string"),
    "completion_index": Value("int32"),
    **PROVENANCE,
})

TEXT_FEATURES = Features({
    "text": Value("string"),
    "completion_offset": Value("int64"),
    **PROVENANCE,
})

BAD_REASON = "_bad_reason"
BAD_MESSAGE = "_bad_message"
"""Working columns of a data set under preparation: why a row is bad, and the full message."""

WORKING = Features({BAD_REASON: Value("string"), BAD_MESSAGE: Value("string")})


def trains_something(message: Mapping[str, Any]) -> bool:
    """Whether ``message`` gives a model something to learn: an assistant turn with content
    that is not blank, a tool call, or OLMo's ``function_calls``. (Content that is not text at
    all counts here, so that the template's validation names what is wrong with it.)"""
    if message.get("role") != "assistant":
        return False
    content = message.get("content")
    return bool(content.strip() if isinstance(content, str) else content) \
        or bool(message.get("tool_calls") or message.get("function_calls"))


def features_for(kind: Kind) -> Features:
    """The canonical features of ``kind`` plus the working columns used during preparation."""
    base = CONVERSATION_FEATURES if kind == "conversation" else TEXT_FEATURES
    return Features({**base, **WORKING})


def decode_json(value: Any) -> Any:
    """A field stored as JSON text (``tools``, a message's ``tool_calls``) as Python objects;
    anything else (already objects, or ``None``) as it is."""
    return json.loads(value) if isinstance(value, str) else value


def decode_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as a chat template expects them: without the ``None`` fields Arrow adds to unify
    a column's schema (absent fields stay absent) and with ``tool_calls`` decoded. Fields other
    than the canonical ones (``reasoning_content`` of a row given as is) are kept."""
    decoded = []
    for stored in messages:
        message = {k: v for k, v in stored.items() if v is not None}
        if "tool_calls" in message:
            message["tool_calls"] = decode_json(message["tool_calls"])
        decoded.append(message)
    return decoded


def messages_from_row(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The messages of a prepared conversation row, as a chat template expects them, so the
    result renders exactly like the messages in the source file."""
    return decode_messages(row["messages"])


def tools_from_row(row: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The tool definitions of a prepared conversation row, or ``None`` if it offers none."""
    return decode_json(row.get("tools"))
