"""The SFT data formats: detecting them from columns and turning one example into canonical form.

Every function here works on one example (a ``dict`` read from a file) and either returns the
canonical fields of :mod:`sft_plugins.data.schema` or raises
:class:`~sft_plugins.errors.SkipExample`, which names the field, what was found and what was
expected. Turning that into an error or a skip is the job of
:mod:`sft_plugins.data.prepare`; nothing here knows about files or Arrow.

Formats (names accepted by ``format=`` / ``--dataset_format``):

- ``messages``: ``{"messages": [{"role", "content", "tool_calls"?}, ...], "tools"?: [...]}``
  (OpenAI style, as TRL and transformers' ``apply_chat_template`` take it).
- ``prompt_completion``: ``{"prompt", "completion"}``, both message lists (a conversation whose
  completion part is trained) or both strings (plain text, no template, completion trained), as
  TRL accepts them.
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?}``.
- ``sharegpt``: ``{"conversations": [{"from", "value"}, ...]}`` with ``from`` one of
  ``system``/``human``/``gpt``/``tool`` (also ``user``/``assistant``/``observation``).
- ``text``: ``{"text"}``; every token is trained and no chat template is applied.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sft_plugins.data.schema import REASONING_KEYS, Kind, trains_something
from sft_plugins.errors import DataError, SkipExample

KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython", "environment")
"""Roles any template might accept; a template's own ``validate`` narrows them further."""

OPTIONAL_STRINGS = ("tool_call_id", "name", "functions", "function_calls")
"""Message fields kept as the strings they are when present: a tool result's call id and name,
and OLMo 3's ``functions`` (on a system or user message) and ``function_calls`` (on an assistant
message), which its template writes as text."""

SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant",
    "assistant": "assistant", "tool": "tool", "observation": "tool",
}

FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
    "text": ("text",),
}
"""The columns each format needs, in the order detection tries the formats."""

FORMAT_ALIASES = {
    "conversational": "messages", "openai": "messages", "chatml": "messages",
    "prompt-completion": "prompt_completion",
    "share_gpt": "sharegpt", "share-gpt": "sharegpt",
}


def normalise_format(name: str) -> str:
    """The canonical name of a format given by the user, or a clear ``ValueError``."""
    key = name.strip().lower()
    key = FORMAT_ALIASES.get(key, key).replace("-", "_")
    if key not in FORMAT_COLUMNS:
        raise ValueError(f"unknown data set format {name!r}; expected one of "
                         f"{', '.join(FORMAT_COLUMNS)}")
    return key


def detect_format(columns: Iterable[str]) -> str | None:
    """The first format whose columns are all present, or ``None``."""
    present = set(columns)
    for name, needed in FORMAT_COLUMNS.items():
        if present.issuperset(needed):
            return name
    return None


def missing_columns(format_name: str, columns: Iterable[str]) -> list[str]:
    """The columns ``format_name`` needs that are not among ``columns``."""
    present = set(columns)
    return [c for c in FORMAT_COLUMNS[format_name] if c not in present]


def kind_of(format_name: str, first_example: Mapping[str, Any] | None) -> Kind:
    """Conversation or text. Prompt/completion data is text when its prompt is a string."""
    if format_name == "text":
        return "text"
    if format_name == "prompt_completion" and first_example is not None:
        prompt = _decoded(first_example.get("prompt"))
        if not (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt)):
            return "text"  # a string, including one that merely looks like a JSON list
    return "conversation"


def _decoded(value: Any) -> Any:
    """A JSON-encoded list (a CSV cell holding messages or tools) decoded; else unchanged."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _require(example: Mapping[str, Any], field: str) -> Any:
    value = example.get(field)
    if value is None:
        raise SkipExample("missing_field", "it is missing or null", field=field,
                          expected="a value (or remap a column with column_map)")
    return value


def _string(value: Any, field: str, *, reason: str = "content_not_string") -> str:
    if not isinstance(value, str):
        raise SkipExample(reason, f"found {_type_name(value)}", field=field, expected="a string")
    return value


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _tool_calls(value: Any, field: str) -> str | None:
    """Tool calls as canonical JSON: ``[{"type": "function", "function": {name, arguments}}]``.

    Arguments given as a JSON string (OpenAI's wire format) are decoded to an object, because
    chat templates serialise them themselves and would otherwise quote them twice.
    """
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise SkipExample("bad_tool_calls", f"found {_type_name(value)}", field=field,
                          expected="a list of tool calls")
    calls = []
    for i, call in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(call, dict):
            raise SkipExample("bad_tool_calls", f"found {_type_name(call)}", field=where,
                              expected="an object with 'function': {'name', 'arguments'}")
        function = call.get("function", call)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise SkipExample("bad_tool_calls", "the tool name is missing or not a string",
                              field=f"{where}.function.name", expected="a string")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise SkipExample("bad_tool_calls", "a string that is not valid JSON",
                                  field=f"{where}.function.arguments",
                                  expected="an object or a JSON-encoded object") from None
        if not isinstance(arguments, dict):
            raise SkipExample("bad_tool_calls", f"found {_type_name(arguments)}",
                              field=f"{where}.function.arguments", expected="an object")
        entry: dict[str, Any] = {"type": call.get("type", "function"),
                                 "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        calls.append(entry)
    return json.dumps(calls, ensure_ascii=False)


def _message(value: Any, field: str, *, role_key: str = "role", content_key: str = "content",
             role_map: Mapping[str, str] | None = None) -> dict[str, str | None]:
    if not isinstance(value, dict):
        raise SkipExample("message_not_object", f"found {_type_name(value)}", field=field,
                          expected=f"an object with {role_key!r} and {content_key!r}")
    role = value.get(role_key)
    if not isinstance(role, str):
        raise SkipExample("unknown_role", f"found {_type_name(role)}", field=f"{field}.{role_key}",
                          expected=f"one of {', '.join(role_map or KNOWN_ROLES)}")
    if role_map is not None:
        if role not in role_map:
            raise SkipExample("unknown_role", f"unknown role {role!r}", field=f"{field}.{role_key}",
                              expected=f"one of {', '.join(role_map)}")
        role = role_map[role]
    tool_calls = _tool_calls(value.get("tool_calls"), f"{field}.tool_calls")
    content = value.get(content_key)
    if content is None and tool_calls is not None:
        content = ""  # an assistant turn that only calls tools (OpenAI sends content: null)
    message: dict[str, str | None] = {
        "role": role,
        "content": _string(content, f"{field}.{content_key}"),
        "tool_calls": tool_calls,
        "reasoning_content": _reasoning(value, field),
        **dict.fromkeys(OPTIONAL_STRINGS),
    }
    for optional in OPTIONAL_STRINGS:
        if value.get(optional) is not None:
            message[optional] = _string(value[optional], f"{field}.{optional}",
                                        reason="bad_field_type")
    return message


def _reasoning(value: Mapping[str, Any], field: str) -> str | None:
    key = next((k for k in REASONING_KEYS if value.get(k) is not None), None)
    if key is None:
        return None
    return _string(value[key], f"{field}.{key}", reason="bad_field_type")


def _message_list(value: Any, field: str, **message_options: Any) -> list[dict[str, str | None]]:
    value = _decoded(value)
    if not isinstance(value, list):
        raise SkipExample("not_a_message_list", f"found {_type_name(value)}", field=field,
                          expected="a list of messages")
    if not message_options:
        plain = [_plain_message(m) for m in value]
        if all(plain):  # the common case, without building a field name per message
            return plain  # type: ignore[return-value]
    return [_message(m, f"{field}[{i}]", **message_options) for i, m in enumerate(value)]


def _plain_message(value: Any) -> dict[str, str | None] | None:
    """``{"role": str, "content": str}`` and nothing else, canonical; ``None`` for anything else."""
    if type(value) is dict and len(value) == 2:
        role, content = value.get("role"), value.get("content")
        if type(role) is str and type(content) is str:
            return {"role": role, "content": content, "reasoning_content": None,
                    "tool_calls": None, **dict.fromkeys(OPTIONAL_STRINGS)}
    return None


def _tools(example: Mapping[str, Any]) -> str | None:
    tools = _decoded(example.get("tools"))
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise SkipExample("bad_tools", f"found {_type_name(tools)}", field="tools",
                          expected="a list of tool definitions (JSON schema objects)")
    return json.dumps(tools, ensure_ascii=False)


def _messages(example: Mapping[str, Any]) -> dict[str, Any]:
    return {"messages": _message_list(_require(example, "messages"), "messages"),
            "tools": _tools(example), "completion_index": None}


def _sharegpt(example: Mapping[str, Any]) -> dict[str, Any]:
    raw = _decoded(_require(example, "conversations"))
    uses_role_keys = (isinstance(raw, list) and bool(raw) and isinstance(raw[0], dict)
                      and "from" not in raw[0] and "role" in raw[0])
    options: dict[str, Any] = ({} if uses_role_keys else
                               {"role_key": "from", "content_key": "value",
                                "role_map": SHAREGPT_ROLES})
    return {"messages": _message_list(raw, "conversations", **options),
            "tools": _tools(example), "completion_index": None}


def _alpaca(example: Mapping[str, Any]) -> dict[str, Any]:
    instruction = _string(_require(example, "instruction"), "instruction")
    extra = example.get("input")
    if extra is not None and _string(extra, "input").strip():
        instruction = f"{instruction}\n\n{extra}"
    messages: list[dict[str, str | None]] = []
    system = example.get("system")
    if system is not None and _string(system, "system").strip():
        messages.append(_plain("system", system))
    messages.append(_plain("user", instruction))
    messages.append(_plain("assistant", _string(_require(example, "output"), "output")))
    return {"messages": messages, "tools": None, "completion_index": len(messages) - 1}


def _plain(role: str, content: str) -> dict[str, str | None]:
    return {"role": role, "content": content, "reasoning_content": None, "tool_calls": None,
            **dict.fromkeys(OPTIONAL_STRINGS)}


def _prompt_completion(example: Mapping[str, Any]) -> dict[str, Any]:
    prompt = _message_list(_require(example, "prompt"), "prompt")
    completion = _message_list(_require(example, "completion"), "completion")
    return {"messages": prompt + completion, "tools": _tools(example),
            "completion_index": len(prompt)}


def _prompt_completion_text(example: Mapping[str, Any]) -> dict[str, Any]:
    prompt = _string(_require(example, "prompt"), "prompt", reason="not_a_string")
    completion = _string(_require(example, "completion"), "completion", reason="not_a_string")
    if not completion.strip():
        raise SkipExample("empty_completion", "it is empty", field="completion",
                          expected="the text to train on")
    return {"text": prompt + completion, "completion_offset": len(prompt)}


def _text(example: Mapping[str, Any]) -> dict[str, Any]:
    text = _string(_require(example, "text"), "text", reason="not_a_string")
    if not text.strip():
        raise SkipExample("empty_text", "it is empty", field="text",
                          expected="the text to train on")
    return {"text": text, "completion_offset": None}


CANONICALISERS: dict[tuple[str, Kind], Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    ("messages", "conversation"): _messages,
    ("prompt_completion", "conversation"): _prompt_completion,
    ("prompt_completion", "text"): _prompt_completion_text,
    ("alpaca", "conversation"): _alpaca,
    ("sharegpt", "conversation"): _sharegpt,
    ("text", "text"): _text,
}


def message_field(format_name: str, index: int, completion_index: int | None) -> str:
    """How the user's file names the message at ``index`` of the canonical list."""
    if format_name == "prompt_completion" and completion_index is not None:
        if index < completion_index:
            return f"prompt[{index}]"
        return f"completion[{index - completion_index}]"
    column = "conversations" if format_name == "sharegpt" else "messages"
    return f"{column}[{index}]"


def check_conversation(format_name: str, messages: list[dict[str, str | None]],
                       completion_index: int | None) -> None:
    """The rules every conversation meets whatever its template: known roles, something to train.

    Something to train is an assistant turn (in the completion, for prompt/completion data)
    with non-empty content, at least one tool call, or OLMo's ``function_calls``.
    """
    if not messages:
        raise SkipExample("no_messages", "the conversation is empty", field="messages",
                          expected="at least one user and one assistant message")
    for i, message in enumerate(messages):
        if message["role"] not in KNOWN_ROLES:
            raise SkipExample("unknown_role", f"unknown role {message['role']!r}",
                              field=f"{message_field(format_name, i, completion_index)}.role",
                              expected=f"one of {', '.join(KNOWN_ROLES)}")
    if not any(map(trains_something, messages[completion_index or 0:])):
        where = {"prompt_completion": "completion", "alpaca": "output",
                 "sharegpt": "conversations"}.get(format_name, "messages")
        raise SkipExample("no_assistant_content",
                          "no assistant turn with non-empty content or tool calls", field=where,
                          expected="at least one assistant turn to train on")


def parse_column_map(text: str | None) -> dict[str, str]:
    """``"question=prompt,answer=completion"`` as ``{"question": "prompt", ...}``."""
    if not text:
        return {}
    pairs = [pair.split("=", 1) for pair in text.split(",") if pair.strip()]
    if any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
        raise DataError(f"--column_map {text!r}: expected source=target pairs separated by "
                        "commas, e.g. question=prompt,answer=completion")
    return {source.strip(): target.strip() for source, target in pairs}
