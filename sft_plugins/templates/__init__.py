"""Chat templates: how a conversation becomes text, and which characters of it are trained.

A :class:`ChatTemplate` renders a list of messages into the exact text ``transformers``'
``apply_chat_template(..., tokenize=False)`` produces with the same template and options, and
also says where each message landed (:class:`MessageSpan`) and which characters the loss is
computed on (an assistant turn's content plus its end-of-turn token, never its header). Masking
works from those character spans and the tokenizer's offsets instead of searching token ids
for a "response template", which breaks whenever the marker tokenizes differently in context.

Spans come from markers in the template (``{% generation %}``, ``{% message N %}``, see
:mod:`sft_plugins.templates._jinja`). A template without message markers (one read from a
tokenizer nobody recognises) gets its spans by rendering every prefix of the conversation and
diffing, which only works if each prefix renders as a prefix of the whole; otherwise the error
names the message where it stops being one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any, Literal

import jinja2

from sft_plugins.data.schema import REASONING_KEYS, reasoning_of
from sft_plugins.errors import ConversationError, TemplateError
from sft_plugins.templates import _jinja
from sft_plugins.templates._jinja import strip_message_markers

Check = Callable[[Sequence[Mapping[str, Any]], Any], None]
"""A family-specific rule: ``check(messages, tools)`` raises ``ConversationError`` or returns."""

TOOL_RESULT_ROLES = ("tool", "ipython")
"""Roles that carry a tool's output back (``ipython`` is Llama 3.1's name for it)."""
FUNCTION_FIELDS = ("functions", "function_calls")
"""OLMo 3's function calling: a function list on a system or user message, the calls an
assistant message makes (strings, written as they are)."""



def tokenizer_template_text(tokenizer: Any) -> str | None:
    """The chat template a tokenizer carries, or ``None``. A tokenizer may carry several named
    templates (a dict); the one used for chat is ``default``."""
    text = getattr(tokenizer, "chat_template", None)
    if isinstance(text, Mapping):
        text = text.get("default")
    return text if isinstance(text, str) and text.strip() else None


@dataclass(frozen=True)
class MessageSpan:
    """Where one input message landed in the rendered text (character offsets, end exclusive)."""

    index: int
    role: str
    start: int
    end: int
    trained: tuple[int, int] | None
    """For an assistant turn: its content plus end-of-turn token (not the header); else None."""


@dataclass(frozen=True)
class RenderedConversation:
    """The rendered text and the span of every message in it."""

    text: str
    messages: tuple[MessageSpan, ...]

    @property
    def trained_spans(self) -> tuple[tuple[int, int], ...]:
        """The trained character spans of the assistant turns, in order."""
        return tuple(m.trained for m in self.messages if m.trained is not None)


@dataclass(frozen=True)
class Fingerprint:
    """A published version of a family's template, recognised by the hash of its text."""

    sha256: str
    label: str
    bugs: tuple[str, ...] = ()
    """What is wrong with this version, in words (empty for a good one)."""


def fingerprint(text: str) -> str:
    """The hash :class:`Fingerprint` stores: sha256 of the template text without outer blanks."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template provider: the jinja source with span markers, its tokens and its rules.

    ``source`` must render exactly what the family's official template renders (markers add no
    text). ``eos_token`` is what the template's ``eos_token`` variable holds; ``end_of_turn`` is the
    token that closes an assistant turn and is trained with it (the same token for most
    families); ``pad_token`` is the token to pad with in training, never the end-of-turn token, so
    that masking pads cannot mask the model's stop signal. ``variables`` are default template
    variables; ``render(**options)`` overrides them.

    Validation rules: ``roles`` accepted; ``system`` is ``"first"`` (one system message, first),
    ``"anywhere"`` or ``"none"``; ``alternate`` demands user/assistant alternation starting with a
    user turn; ``tools``, ``tool_calls``, ``reasoning`` (an assistant turn's
    ``reasoning_content``) and ``function_fields`` (OLMo 3's ``functions`` and ``function_calls``
    strings) say whether the family can express them; ``checks`` adds family-specific rules.
    """

    name: str
    source: str
    description: str = ""
    aliases: tuple[str, ...] = ()
    bos_token: str | None = None
    eos_token: str | None = None
    end_of_turn: str | None = None
    pad_token: str | None = None
    pad_fallbacks: tuple[str, ...] = ()
    stop_tokens: tuple[str, ...] = ()
    renders_bos: bool = False
    fingerprints: tuple[Fingerprint, ...] = ()
    fixes: tuple[str, ...] = ()
    variables: Mapping[str, Any] = field(default_factory=dict)
    roles: tuple[str, ...] = ("system", "user", "assistant")
    system: Literal["first", "anywhere", "none"] = "first"
    alternate: bool = False
    tools: bool = False
    tool_calls: bool = False
    reasoning: bool = False
    function_fields: bool = False
    checks: tuple[Check, ...] = ()

    def __hash__(self) -> int:
        """Templates are values (frozen); ``variables`` is a mapping, so hash what names one."""
        return hash((self.name, self.source))

    # ----------------------------------------------------------------- building

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, *, name: str = "tokenizer") -> ChatTemplate:
        """The template a tokenizer carries, taken as is (spans by prefix diffing)."""
        text = tokenizer_template_text(tokenizer)
        if text is None:
            raise TemplateError(
                f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                "name one (sft-plugins list shows them)")
        eos = getattr(tokenizer, "eos_token", None)
        return cls(name=name, source=text, description="the tokenizer's own chat template",
                   bos_token=getattr(tokenizer, "bos_token", None), eos_token=eos,
                   end_of_turn=eos, pad_token=getattr(tokenizer, "pad_token", None),
                   roles=("system", "user", "assistant", "tool", "ipython"),
                   system="anywhere", tools=True, tool_calls=True, reasoning=True)

    @property
    def tokenizer_source(self) -> str:
        """The source to install on a tokenizer: ``{% generation %}`` kept, message markers gone."""
        return strip_message_markers(self.source)

    def recognise(self, text: str | None) -> Fingerprint | None:
        """The published version of this family that ``text`` is (or this template's own
        :attr:`tokenizer_source`, as installed by :meth:`configure_tokenizer`), if any."""
        if not text:
            return None
        digest = fingerprint(text)
        if digest == fingerprint(self.tokenizer_source):
            return Fingerprint(digest, f"sft-plugins {self.name} (with generation markers)")
        return next((f for f in self.fingerprints if f.sha256 == digest), None)

    # --------------------------------------------------------------- validation

    def validate(self, messages: Any, *, tools: Any = None) -> None:
        """Raise :class:`ConversationError` naming the message and the rule it breaks."""
        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
            raise ConversationError(f"{self.name}: a conversation is a list of messages, got "
                                    f"{type(messages).__name__}", rule="not-a-list")
        if not messages:
            raise ConversationError(f"{self.name}: the conversation has no messages",
                                    rule="empty")
        if tools is not None and not self.tools:
            raise ConversationError(f"{self.name}: this template cannot express tools; drop "
                                    "`tools` or use a family that has them", rule="no-tools")
        for index, message in enumerate(messages):
            self._validate_message(index, message, messages)
        if self.alternate:
            self._validate_alternation(messages)
        for check in self.checks:
            check(messages, tools)

    def _fail(self, index: int, rule: str, what: str) -> ConversationError:
        return ConversationError(f"{self.name}: message {index}: {what}", message_index=index,
                                 rule=rule)

    def _validate_message(self, index: int, message: Any, messages: Sequence[Any]) -> None:
        if type(message) is not dict and not isinstance(message, Mapping):  # dict: cheaper
            raise self._fail(index, "not-an-object",
                             f"a message is an object with 'role' and 'content', got "
                             f"{type(message).__name__}")
        role = message.get("role")
        if role not in self.roles:
            raise self._fail(index, "unknown-role",
                             f"unknown role {role!r}; this template accepts "
                             f"{', '.join(self.roles)}")
        if role in TOOL_RESULT_ROLES:
            self._validate_tool_result(index, messages)
        calls = message.get("tool_calls")
        if calls is not None:
            if not self.tool_calls or role != "assistant":
                raise self._fail(index, "no-tool-calls",
                                 "tool_calls are only accepted on assistant messages of "
                                 "templates with tools" if self.tool_calls
                                 else "this template cannot express tool calls")
            _check_tool_calls(self, index, calls)
        self._validate_reasoning(index, message)
        if not self.function_fields and not message.keys().isdisjoint(FUNCTION_FIELDS):
            self._refuse_function_fields(index, message)
        content = message.get("content")
        if not isinstance(content, str) and not (calls is not None and content is None):
            raise self._fail(index, "content-not-string",
                             f"content must be a string, got {type(content).__name__}")
        if role == "system":
            if self.system == "none":
                raise self._fail(index, "no-system", "this template has no system role; "
                                 "fold the instructions into the first user message")
            if self.system == "first" and index != 0:
                raise self._fail(index, "system-not-first",
                                 "a system message is only accepted as the first message "
                                 "(and only once)")

    def _refuse_function_fields(self, index: int, message: Mapping[str, Any]) -> None:
        """OLMo 3's function calling, on a family whose template would drop it in silence."""
        name = next((k for k in FUNCTION_FIELDS if message.get(k) is not None), None)
        if name is not None:
            raise self._fail(index, "no-function-fields",
                             f"this template cannot express OLMo's {name!r} field, so it would "
                             "be dropped; remove it, or use the olmo-3 template")

    def _validate_tool_result(self, index: int, messages: Sequence[Any]) -> None:
        """A tool result answers a call: it follows the assistant message that made it (one
        with ``tool_calls`` where the family takes them) or another result of the same turn.
        A stray result would be rendered as an answer to nothing, and the model would learn to
        read tool output nobody asked for."""
        before = messages[index - 1] if index > 0 else None
        role = before.get("role") if isinstance(before, Mapping) else None
        if role in TOOL_RESULT_ROLES:
            return
        if role == "assistant" and (not self.tool_calls or before.get("tool_calls")):
            return
        raise self._fail(index, "tool-result-without-call",
                         f"a {messages[index].get('role')!r} message must follow the assistant "
                         "message whose tool call it answers"
                         + (" (one with 'tool_calls')" if self.tool_calls else "")
                         + "; add the call, or remove the result")

    def _validate_reasoning(self, index: int, message: Mapping[str, Any]) -> None:
        """Reasoning is refused where the family's template would drop it in silence."""
        if message.keys().isdisjoint(REASONING_KEYS):  # nearly every message: no such key
            return
        field = next((k for k in REASONING_KEYS if message.get(k) is not None), None)
        if field is None:
            return
        if message.get("role") != "assistant":
            raise self._fail(index, "reasoning-not-assistant",
                             f"only assistant messages carry reasoning ({field!r})")
        if not self.reasoning:
            raise self._fail(index, "no-reasoning",
                             f"this template cannot express reasoning ({field!r}), so it would "
                             "not be trained; remove it, or use a template of a reasoning "
                             "family")

    def _validate_alternation(self, messages: Sequence[Mapping[str, Any]]) -> None:
        offset = 1 if messages[0].get("role") == "system" else 0
        for index in range(offset, len(messages)):
            expected = "user" if (index - offset) % 2 == 0 else "assistant"
            if messages[index].get("role") != expected:
                raise self._fail(index, "alternation",
                                 f"roles must alternate user/assistant starting with user; "
                                 f"expected {expected!r}, got {messages[index].get('role')!r}")

    # ---------------------------------------------------------------- rendering

    def render(self, messages: Sequence[Mapping[str, Any]], *, tools: Any = None,
               add_generation_prompt: bool = False, **options: Any) -> RenderedConversation:
        """Render ``messages``: the same text as ``apply_chat_template(..., tokenize=False)``,
        plus every message's span. Raises :class:`TemplateError` (never a jinja traceback)."""
        chat, variables, recording = self._render(messages, tools, add_generation_prompt,
                                                  options)
        if _jinja.has_message_markers(self.source):
            spans = self._marked_spans(chat, recording)
        else:
            spans = self._diffed_spans(chat, variables, recording)
        return RenderedConversation("".join(recording.blocks), spans)

    def render_text(self, messages: Sequence[Mapping[str, Any]], *, tools: Any = None,
                    add_generation_prompt: bool = False, **options: Any) -> str:
        """Only the text of :meth:`render`: no spans, so it also works for templates whose
        spans cannot be found (one that ignores ``add_generation_prompt``, say)."""
        return "".join(self._render(messages, tools, add_generation_prompt, options)[2].blocks)

    def _render(self, messages: Sequence[Mapping[str, Any]], tools: Any,
                add_generation_prompt: bool, options: dict[str, Any]
                ) -> tuple[list[dict[str, Any]], dict[str, Any], _jinja.Recording]:
        if options:
            self.check_variables(options)
        self.validate(messages, tools=tools)
        chat = _normalise(messages)
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                     "pad_token": self.pad_token, **self.variables, **options,
                     "tools": _plain(tools), "documents": None,
                     "add_generation_prompt": add_generation_prompt}
        return chat, variables, self._run(chat, variables)

    def _run(self, chat: list[dict[str, Any]], variables: dict[str, Any]) -> _jinja.Recording:
        try:
            return _jinja.render(self.source, {**variables, "messages": chat})
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"chat template {self.name!r} is not valid jinja: {exc.message} "
                                f"(template line {exc.lineno})") from None
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template {self.name!r} refused the conversation: "
                                f"{exc.message or exc}") from None
        except Exception as exc:  # a template is code: whatever it raises is its own failure
            raise TemplateError(f"chat template {self.name!r} failed on the conversation"
                                f"{_template_line(exc)}: {type(exc).__name__}: {exc}") from None

    def _marked_spans(self, chat: list[dict[str, Any]],
                      recording: _jinja.Recording) -> tuple[MessageSpan, ...]:
        starts: dict[int, int] = {}
        for index, position in recording.starts:  # a message marked twice starts at the first
            starts.setdefault(index, position)
        missing = [i for i in range(len(chat)) if i not in starts]
        if missing:
            raise TemplateError(f"chat template {self.name!r} did not mark where message "
                                f"{missing[0]} starts ({{% message N %}}); this is a bug in the "
                                "template")
        text_end = recording.length if recording.end is None else recording.end
        # by start, ties by index (sorted is stable); each message ends where the next starts
        order = sorted(range(len(chat)), key=starts.__getitem__)
        ends = [text_end] * len(chat)
        for previous, following in pairwise(order):
            ends[previous] = starts[following]
        assistants = [i for i, m in enumerate(chat) if m["role"] == "assistant"]
        if len(recording.generations) != len(assistants):
            raise TemplateError(f"chat template {self.name!r} marked "
                                f"{len(recording.generations)} {{% generation %}} blocks for "
                                f"{len(assistants)} assistant messages; this is a bug in the "
                                "template")
        trained = dict(zip(assistants, recording.generations, strict=True))
        return tuple(MessageSpan(i, chat[i]["role"], starts[i], ends[i], trained.get(i))
                     for i in range(len(chat)))

    def _diffed_spans(self, chat: list[dict[str, Any]], variables: dict[str, Any],
                      recording: _jinja.Recording) -> tuple[MessageSpan, ...]:
        """Spans for a template without message markers: render each prefix and diff."""
        full = "".join(recording.blocks)
        bounds = [0]
        headers: dict[int, int] = {}
        for k in range(1, len(chat) + 1):
            prefix = self._render_prefix(chat, k, variables, False)
            if not full.startswith(prefix) or len(prefix) < bounds[-1]:
                raise TemplateError(
                    f"chat template {self.name!r}: message {k - 1}: the conversation up to this "
                    "message does not render as a prefix of the whole conversation, so its "
                    "spans cannot be found by diffing (the template rewrites earlier text, or "
                    "adds a generation prompt regardless of add_generation_prompt). Use a "
                    "registered template for this family (sft-plugins list)")
            if chat[k - 1]["role"] == "assistant" and k > 1:
                headers[k - 1] = self._header_end(chat, k, variables, prefix, bounds[-1])
            bounds.append(len(prefix))
        generations = iter(recording.generations)
        spans = []
        for i, message in enumerate(chat):
            start, end = bounds[i], bounds[i + 1]
            trained = None
            if message["role"] == "assistant":
                header = headers.get(i, start)
                trained = next(generations, None) if recording.generations else \
                    (header, self._turn_end(full, header, end))
            spans.append(MessageSpan(i, message["role"], start, end, trained))
        return tuple(spans)

    def _header_end(self, chat: list[dict[str, Any]], k: int, variables: dict[str, Any],
                    prefix: str, start: int) -> int:
        """Where assistant message ``k - 1``'s header ends: what the generation prompt adds
        after the previous messages. Some prompts add more than the header (DeepSeek-V3's
        ``<think>``); then the header is the part the message's own text agrees with, cut back
        to the last ``>`` or newline so that it never ends inside a special token."""
        prompted = self._render_prefix(chat, k - 1, variables, True)
        if not prompted.startswith(prefix[:start]):
            return start
        if prefix.startswith(prompted):
            return len(prompted)
        agreed = start
        while agreed < min(len(prompted), len(prefix)) and prompted[agreed] == prefix[agreed]:
            agreed += 1
        while agreed > start and prefix[agreed - 1] not in ">\n":
            agreed -= 1
        return agreed

    def _render_prefix(self, chat: list[dict[str, Any]], k: int, variables: dict[str, Any],
                       prompt: bool) -> str:
        try:
            recording = _jinja.render(self.source, {**variables, "messages": chat[:k],
                                                    "add_generation_prompt": prompt})
        except Exception as exc:
            raise TemplateError(f"chat template {self.name!r}: message {k - 1}: rendering the "
                                f"conversation up to this message failed ({exc}), so its spans "
                                "cannot be found by diffing") from None
        return "".join(recording.blocks)

    def _turn_end(self, text: str, start: int, end: int) -> int:
        """End of an assistant turn: just after its end-of-turn token when it has one."""
        if self.end_of_turn:
            found = text.rfind(self.end_of_turn, start, end)
            if found >= 0:
                return found + len(self.end_of_turn)
        return end

    # --------------------------------------------------------------- tokenizers

    def configure_tokenizer(self, tokenizer: Any, *, pad_token: str | None = None,
                            add_missing_tokens: bool = False) -> Any:
        """Install this template on ``tokenizer``, with its training pad token.

        Sets ``chat_template`` (markers for ``{% generation %}`` kept, so ``transformers``'
        ``return_assistant_tokens_mask`` works too) and ``pad_token`` (``pad_token`` argument, or
        the family's pad token, or a fallback, whichever the vocabulary has). The vocabulary
        only grows with ``add_missing_tokens=True``. Returns the tokenizer.
        """
        chosen = self.training_pad_token(tokenizer, pad_token,
                                         add_missing_tokens=add_missing_tokens)
        tokenizer.pad_token = chosen
        tokenizer.chat_template = self.tokenizer_source
        return tokenizer

    def training_pad_token(self, tokenizer: Any, pad_token: str | None = None, *,
                           add_missing_tokens: bool = False) -> str:
        """The token to pad with in training: ``pad_token`` if given, else the family's pad
        token, else its first fallback the vocabulary has, else the tokenizer's own.

        Never the end-of-turn token, which the model must learn to produce (masking pads would
        mask its stop signal). A pad equal to the end of *sequence* is accepted when that is not
        the end of turn (Phi-3.5 declares ``pad_token == eos_token == "<|endoftext|>"`` and ends
        turns with ``<|end|>``). With ``add_missing_tokens=True`` a missing first choice is added
        to the tokenizer's vocabulary (then resize the model's embeddings).
        """
        in_vocabulary = _in_vocabulary(tokenizer)
        candidates = [t for t in (pad_token, self.pad_token, *self.pad_fallbacks) if t]
        chosen = next((t for t in candidates if in_vocabulary(t)), None)
        if chosen is None and candidates and add_missing_tokens:
            tokenizer.add_special_tokens({"pad_token": candidates[0]})
            chosen = candidates[0]
        if chosen is None:
            current = tokenizer.pad_token
            if current is None or current == (self.end_of_turn or self.eos_token):
                raise TemplateError(
                    f"chat template {self.name!r}: none of the pad tokens "
                    f"{candidates or '(none declared)'} is in the tokenizer's vocabulary and its "
                    f"own pad token is {current!r}; pass pad_token=... or "
                    "add_missing_tokens=True (then resize the embeddings)")
            chosen = current
        if chosen == (self.end_of_turn or self.eos_token):
            raise TemplateError(f"chat template {self.name!r}: refusing to pad with the "
                                f"end-of-turn token {chosen!r}: masking pads would mask the "
                                "model's stop signal; pass pad_token=<an unused special token>")
        return chosen

    def check_tokens(self, tokenizer: Any) -> None:
        """Refuse a tokenizer that lacks one of this template's special tokens (the template of
        another family, most likely)."""
        vocabulary = tokenizer.get_vocab()
        missing = [t for t in self.special_tokens if t not in vocabulary]
        if missing:
            raise TemplateError(
                f"chat template {self.name!r} uses special tokens the tokenizer does not have: "
                f"{', '.join(missing)}. Pick the template of this model's family (--template), "
                "or a tokenizer that has them")

    @property
    def special_tokens(self) -> list[str]:
        """The special tokens this template names (BOS, EOS, end of turn, pad, stops), sorted:
        what the tokenizer must have, and what data should not hold by accident."""
        return sorted({self.bos_token, self.eos_token, self.end_of_turn, self.pad_token,
                       *self.stop_tokens} - {None, ""})

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids of the tokens generation should stop at (for ``GenerationConfig.eos_token_id``)."""
        vocab = tokenizer.get_vocab()
        return [vocab[t] for t in dict.fromkeys((self.end_of_turn, *self.stop_tokens))
                if t and t in vocab]

    def check_variables(self, names: Iterable[str]) -> None:
        """Refuse variable names the template never reads: a misspelt option (``enable_thinkin``)
        would otherwise change nothing, in silence."""
        try:
            read = _jinja.variables_read(self.source)
        except jinja2.TemplateSyntaxError:
            return  # rendering reports it, with the line
        unknown = sorted(set(names) - read)
        if unknown:
            own = sorted(read - _STANDARD_VARIABLES)
            raise TemplateError(
                f"chat template {self.name!r} reads no variable named "
                f"{', '.join(map(repr, unknown))}; the variables it reads are "
                f"{', '.join(own) if own else 'only the standard ones (messages, tools, ...)'}")

    def with_variables(self, variables: Mapping[str, Any]) -> ChatTemplate:
        """This template rendering with ``variables`` as default template variables (for example
        ``omit_knowledge_date=True`` or ``date_string`` for Llama 3.1); a name the template never
        reads is a :class:`TemplateError`."""
        if not variables:
            return self
        self.check_variables(variables)
        return self.with_options(variables={**self.variables, **variables})

    def with_options(self, **changes: Any) -> ChatTemplate:
        """A copy with some fields changed (for example other default ``variables``)."""
        return replace(self, **changes)


_STANDARD_VARIABLES = frozenset({
    "messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token",
    "pad_token", "raise_exception", "strftime_now", "namespace", "dict"})
"""What every template is given (or may call); not worth listing as a template's own."""


def _template_line(exc: BaseException) -> str:
    """`` (template line N)`` for the template line that was running when ``exc`` was raised
    (jinja compiles a template to code whose frames carry the template's line numbers)."""
    line = None
    traceback = exc.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == "<template>":
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return "" if line is None else f" (template line {line})"


def _in_vocabulary(tokenizer: Any) -> Callable[[str], bool]:
    """``token in tokenizer.get_vocab()``, for a few tokens. A fast tokenizer with the stock
    ``get_vocab`` (its backend's vocabulary, added tokens included) is asked token by token,
    which is the same answer without building the dictionary of its whole vocabulary: 128 256
    entries for Llama 3, a tenth of a second on every preparation (it picks the pad token)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    stock = getattr(type(tokenizer).get_vocab, "__module__", None) == _STOCK_GET_VOCAB
    if backend is not None and stock:
        return lambda token: backend.token_to_id(token) is not None
    return tokenizer.get_vocab().__contains__


_STOCK_GET_VOCAB = "transformers.tokenization_utils_tokenizers"
"""Where transformers' fast tokenizers define ``get_vocab`` (the backend's, with added tokens)."""


def _check_tool_calls(template: ChatTemplate, index: int, calls: Any) -> None:
    if not isinstance(calls, list) or not calls:
        raise template._fail(index, "tool-calls", "tool_calls must be a non-empty list")
    for call in calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise template._fail(index, "tool-calls",
                                 "each tool call needs a 'function' object with a string 'name'")


def _plain(value: Any) -> Any:
    """A fresh copy made of plain JSON types, so the template never sees (or edits) ours."""
    if isinstance(value, str):  # most values, and a cheaper test than Mapping's
        return value
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _normalise(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What ``apply_chat_template`` hands the template: ``None`` fields dropped, reasoning
    copied to ``reasoning_content`` and ``thinking``."""
    chat = []
    for message in messages:
        plain = {key: _plain(value) for key, value in message.items() if value is not None}
        reasoning = None if plain.keys().isdisjoint(REASONING_KEYS) else reasoning_of(plain)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        chat.append(plain)
    return chat


__all__ = [
    "ChatTemplate",
    "Check",
    "Fingerprint",
    "MessageSpan",
    "RenderedConversation",
    "fingerprint",
    "strip_message_markers",
    "tokenizer_template_text",
]
