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
    open_generations: list[int] = field(default_factory=list)
    """Starts of the ``{% generation %}`` blocks being rendered."""


_RECORDING: ContextVar[Recording | None] = ContextVar("sft_plugins_template_recording",
                                                       default=None)


class SpanMarkers(jinja2.ext.Extension):
    """Implements ``{% generation %}``, ``{% message N %}`` and ``{% endmessages %}``.

    Positions are the length of the output already produced when the tag runs; that is exact
    because :func:`render` consumes the template's generator block by block, and holds only for
    markers written directly in the template body (not inside ``{% set %}`` blocks, macros or
    the inner levels of a recursive loop, whose output is buffered).

    The markers run once per message of every example prepared, so they compile to direct calls
    of private filters (:data:`_MARKERS`, under names no template can spell) rather than to
    extension method calls, which the sandbox routes through ``environment.call`` and its checks
    (a third of a render's time). A ``{% generation %}`` block in the template body, inside
    ``for`` and ``if`` blocks only, becomes its body between two such calls, in a scope of its
    own (as a call block's body has: what it sets stays inside); anywhere else (inside a macro,
    a call, filter or set block, or holding ``break``/``continue``) it keeps the call block
    that buffers its body, :meth:`_generation`.
    """

    tags = {"generation", "message", "endmessages"}  # noqa: RUF012 (jinja's own API)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        token = next(parser.stream)
        lineno = token.lineno
        if token.value == "generation":
            # the open tags, this one last (jinja's private state: without it, the buffered way)
            tags = getattr(parser, "_tag_stack", None)
            inline = tags is not None and set(tags[:-1]) <= _UNBUFFERED_TAGS
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            if not inline or any(
                    node.find((jinja2.nodes.Break, jinja2.nodes.Continue)) is not None
                    or isinstance(node, (jinja2.nodes.Break, jinja2.nodes.Continue))
                    for node in body):
                return jinja2.nodes.CallBlock(self.call_method("_generation"), [], [], body
                                              ).set_lineno(lineno)
            return jinja2.nodes.Scope([_marker(_GENERATION_START, lineno), *body,
                                       _marker(_GENERATION_END, lineno)]).set_lineno(lineno)
        if token.value == "message":
            return _marker(_MESSAGE_START, lineno, parser.parse_expression())
        return _marker(_MESSAGES_END, lineno)

    def _generation(self, caller: Any) -> str:
        """A ``{% generation %}`` block outside the template body: its body, buffered."""
        body = caller()
        recording = _RECORDING.get()
        if recording is not None:
            recording.generations.append((recording.length, recording.length + len(body)))
        return body


_UNBUFFERED_TAGS = frozenset({"for", "if"})
"""Tags whose body the template's generator yields as it goes (no buffer), so that the output
length at a marker is the marker's position."""


def _marker(name: str, lineno: int, argument: jinja2.nodes.Expr | None = None
            ) -> jinja2.nodes.Node:
    """A statement calling the marker filter ``name`` on ``argument`` (``none`` if absent)."""
    value = jinja2.nodes.Const(None) if argument is None else argument
    return jinja2.nodes.ExprStmt(jinja2.nodes.Filter(value, name, [], [], None, None)
                                 ).set_lineno(lineno)


# Each marker filter takes the template's context, unused: jinja would otherwise call a filter of
# a constant (``none``) once, at compile time, and fold the call away.


@jinja2.pass_context
def _message_start(_: Any, message: Any) -> None:
    recording = _RECORDING.get()
    if recording is not None and message is not None:
        index = recording.positions.get(id(message))
        if index is None:
            raise jinja2.exceptions.TemplateRuntimeError(
                "{% message m %} needs one of the input message objects")
        recording.starts.append((index, recording.length))


@jinja2.pass_context
def _messages_end(*_: Any) -> None:
    recording = _RECORDING.get()
    if recording is not None:
        recording.end = recording.length


@jinja2.pass_context
def _generation_start(*_: Any) -> None:
    recording = _RECORDING.get()
    if recording is not None:
        recording.open_generations.append(recording.length)


@jinja2.pass_context
def _generation_end(*_: Any) -> None:
    recording = _RECORDING.get()
    if recording is not None:
        recording.generations.append((recording.open_generations.pop(), recording.length))


# Filter names with a dot and a dash: the template language cannot spell them, so only the
# markers call these.
_MESSAGE_START = "sft-plugins.message"
_MESSAGES_END = "sft-plugins.endmessages"
_GENERATION_START = "sft-plugins.generation"
_GENERATION_END = "sft-plugins.endgeneration"
_MARKERS = {_MESSAGE_START: _message_start, _MESSAGES_END: _messages_end,
            _GENERATION_START: _generation_start, _GENERATION_END: _generation_end}


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


_DICT_ATTRIBUTES = frozenset(dir(dict))
"""Every attribute a plain ``dict`` has (its methods and ``object``'s): the only names
``getattr`` can find on one, since a ``dict`` has no instance attributes."""


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, with ``message.role`` on a plain ``dict`` (every message,
    several times per message) read as the key it is at once: the sandbox's ``getattr`` tries
    the attribute first and reads the key only after catching the ``AttributeError``, and
    raising it was a tenth of a render. Same answers: a name that is not an attribute of
    ``dict`` raises there, and everything else still goes the sandbox's way."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)


@lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    """The one sandboxed environment every template is compiled in."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                   extensions=[SpanMarkers, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    env.filters.update(_MARKERS)
    return env


@lru_cache(maxsize=256)
def compile_template(source: str) -> jinja2.Template:
    """Compile ``source`` once (raises ``jinja2.TemplateSyntaxError``)."""
    return environment().from_string(source)


@lru_cache(maxsize=256)
def _flat_globals(template: jinja2.Template) -> dict[str, Any]:
    """The template's globals as one dict: what ``Template.new_context`` builds from its chain
    of globals on every call (the environment's never change after :func:`environment`)."""
    return dict(template.globals)


@lru_cache(maxsize=256)
def variables_read(source: str) -> frozenset[str]:
    """Every variable ``source`` reads without setting it (a syntax error raises
    ``jinja2.TemplateSyntaxError``)."""
    return frozenset(jinja2.meta.find_undeclared_variables(environment().parse(source)))


def render(source: str, variables: dict[str, Any]) -> Recording:
    """Render ``source`` with ``variables`` and return the text with every marker's position.

    Raises jinja2 errors unchanged (with the template's line numbers in the traceback, as
    ``Template.generate`` leaves them); :class:`~sft_plugins.templates.ChatTemplate` turns them
    into ``TemplateError`` with the template's own message. This is ``Template.generate`` less
    its wrapping generator and its context built from scratch: preparation renders every
    example.
    """
    template = compile_template(source)
    flat = _flat_globals(template)
    context = template.environment.context_class(  # it only takes the names of the globals
        template.environment, {**flat, **variables}, template.name, template.blocks,
        globals=flat)
    recording = Recording(positions={id(m): i for i, m in
                                     enumerate(variables.get("messages") or [])})
    blocks = recording.blocks
    token = _RECORDING.set(recording)
    try:
        for block in template.root_render_func(context):
            blocks.append(block)
            recording.length += len(block)
    except Exception:
        template.environment.handle_exception()
    finally:
        _RECORDING.reset(token)
    return recording


def strip_message_markers(source: str) -> str:
    """``source`` without ``{% message %}``/``{% endmessages %}``, for ``transformers`` to run."""
    return _MESSAGE_MARKER_TRIMMED.sub("", source)


@lru_cache(maxsize=256)
def has_message_markers(source: str) -> bool:
    """Whether ``source`` marks where messages start (asked once per render, so cached)."""
    return _MESSAGE_MARKER.search(source) is not None


def has_generation_markers(source: str) -> bool:
    return _GENERATION_TAG.search(source) is not None
