"""The sandboxed jinja environment chat templates render in, and the markers that record spans.

A chat template is untrusted code (it comes from a tokenizer file or a plugin), so it renders in
jinja2's ``ImmutableSandboxedEnvironment`` with the same options, globals and filters that
``transformers`` gives it (``trim_blocks``, ``lstrip_blocks``, loop controls, ``raise_exception``,
``strftime_now``, a ``tojson`` that does not escape HTML, a ``namespace`` that refuses dunder
attributes). A template therefore renders byte for byte what ``apply_chat_template`` renders.

Two kinds of marker record where things land in the output:

``{% generation %}...{% endgeneration %}``
    What the assistant says (and its end-of-turn token): the characters the loss is computed on.
    ``transformers`` understands this tag too, so templates keep it when they are installed on a
    tokenizer.
``{% message m %}`` and ``{% endmessages %}``
    Where message ``m`` starts adding text (``m`` is one of the input message objects, found by
    identity, so templates that slice ``messages`` need no index bookkeeping; ``none`` marks
    nothing), and where the last message stops (before a generation prompt or a closing
    token). Only this package knows these tags, so :func:`strip_message_markers` removes them
    before a template is installed on a tokenizer, together with the whitespace that
    ``trim_blocks``/``lstrip_blocks`` would have eaten around them; write them without
    whitespace control (``{%-``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

_MESSAGE_MARKER = re.compile(r"\{%\s*(?:message\s+[^%]*?|endmessages)\s*%\}")
_MESSAGE_MARKER_TRIMMED = re.compile(
    r"(?:^[ \t]*)?\{%\s*(?:message\s+[^%]*?|endmessages)\s*%\}\n?", re.MULTILINE)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class Recording:
    """Positions collected during one render: output so far, message starts, generation spans."""

    positions: dict[int, int] = field(default_factory=dict)  # id(message) -> its index
    blocks: list[str] = field(default_factory=list)
    length: int = 0
    starts: list[tuple[int, int]] = field(default_factory=list)  # (message index, position)
    end: int | None = None
    generations: list[tuple[int, int]] = field(default_factory=list)


_RECORDING: ContextVar[Recording | None] = ContextVar("sft_plugins_template_recording",
                                                       default=None)


class SpanMarkers(jinja2.ext.Extension):
    """Implements ``{% generation %}``, ``{% message N %}`` and ``{% endmessages %}``.

    Positions are the length of the output already produced when the tag runs; that is exact
    because :func:`render` consumes the template's generator block by block, and holds only for
    markers written directly in the template body (not inside ``{% set %}`` blocks or macros,
    whose output is buffered).
    """

    tags = {"generation", "message", "endmessages"}  # noqa: RUF012 (jinja's own API)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        token = next(parser.stream)
        lineno = token.lineno
        if token.value == "generation":
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation"), [], [], body
                                          ).set_lineno(lineno)
        if token.value == "message":
            index = parser.parse_expression()
            return jinja2.nodes.Output([self.call_method("_message_start", [index])]
                                       ).set_lineno(lineno)
        return jinja2.nodes.Output([self.call_method("_messages_end")]).set_lineno(lineno)

    def _generation(self, caller: Any) -> str:
        body = caller()
        recording = _RECORDING.get()
        if recording is not None:
            recording.generations.append((recording.length, recording.length + len(body)))
        return body

    def _message_start(self, message: Any) -> str:
        recording = _RECORDING.get()
        if recording is not None and message is not None:
            index = recording.positions.get(id(message))
            if index is None:
                raise jinja2.exceptions.TemplateRuntimeError(
                    "{% message m %} needs one of the input message objects")
            recording.starts.append((index, recording.length))
        return ""

    def _messages_end(self) -> str:
        recording = _RECORDING.get()
        if recording is not None:
            recording.end = recording.length
        return ""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """jinja's own ``tojson`` escapes ``<``, ``>`` and ``&`` for HTML; chat templates must not."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict(...)`` for templates without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """A ``namespace()`` that refuses underscore-prefixed attributes (no route to internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes ({name!r})")


@lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    """The one sandboxed environment every template is compiled in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[SpanMarkers, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    return env


@lru_cache(maxsize=256)
def compile_template(source: str) -> jinja2.Template:
    """Compile ``source`` once (raises ``jinja2.TemplateSyntaxError``)."""
    return environment().from_string(source)


@lru_cache(maxsize=256)
def variables_read(source: str) -> frozenset[str]:
    """Every variable ``source`` reads without setting it (a syntax error raises
    ``jinja2.TemplateSyntaxError``)."""
    return frozenset(jinja2.meta.find_undeclared_variables(environment().parse(source)))


@contextmanager
def _recording(chat: list[Any]) -> Iterator[Recording]:
    recording = Recording(positions={id(m): i for i, m in enumerate(chat)})
    token = _RECORDING.set(recording)
    try:
        yield recording
    finally:
        _RECORDING.reset(token)


def render(source: str, variables: dict[str, Any]) -> Recording:
    """Render ``source`` with ``variables`` and return the text with every marker's position.

    Raises jinja2 errors unchanged; :class:`~sft_plugins.templates.ChatTemplate` turns them into
    ``TemplateError`` with the template's own message.
    """
    template = compile_template(source)
    with _recording(variables.get("messages") or []) as recording:
        for block in template.generate(**variables):
            recording.blocks.append(block)
            recording.length += len(block)
    return recording


def strip_message_markers(source: str) -> str:
    """``source`` without ``{% message %}``/``{% endmessages %}``, for ``transformers`` to run."""
    return _MESSAGE_MARKER_TRIMMED.sub("", source)


def has_message_markers(source: str) -> bool:
    return _MESSAGE_MARKER.search(source) is not None


def has_generation_markers(source: str) -> bool:
    return _GENERATION_TAG.search(source) is not None
