"""The canonical columns every prepared data set has, and how to read a row back.

Two kinds of prepared data exist. A *conversation* row holds ``messages`` (each with ``role``,
``content`` and, where present, ``tool_calls``, ``tool_call_id`` and ``name``), the ``tools``
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
from collections.abc import Mapping
from typing import Any, Literal

from datasets import Features, List, Value

Kind = Literal["conversation", "text"]

MESSAGE_FIELDS = ("role", "content", "tool_calls", "tool_call_id", "name")
"""Keys a canonical message may carry; ``tool_calls`` is JSON text."""

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


def features_for(kind: Kind) -> Features:
    """The canonical features of ``kind`` plus the working columns used during preparation."""
    base = CONVERSATION_FEATURES if kind == "conversation" else TEXT_FEATURES
    return Features({**base, **WORKING})


def messages_from_row(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The messages of a prepared conversation row, as a chat template expects them.

    Absent optional fields are left out (not set to ``None``) and ``tool_calls`` is decoded,
    so the result renders exactly like the messages in the source file.
    """
    messages = []
    for stored in row["messages"]:
        message: dict[str, Any] = {"role": stored["role"], "content": stored["content"]}
        if stored.get("tool_calls") is not None:
            message["tool_calls"] = json.loads(stored["tool_calls"])
        for field in ("tool_call_id", "name"):
            if stored.get(field) is not None:
                message[field] = stored[field]
        messages.append(message)
    return messages


def tools_from_row(row: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The tool definitions of a prepared conversation row, or ``None`` if it offers none."""
    tools = row.get("tools")
    return None if tools is None else json.loads(tools)
