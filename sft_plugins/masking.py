"""Which tokens carry loss, and with what weight: character spans + tokenizer offsets -> labels.

A chat template renders a conversation and says which characters each assistant turn produced
(its trained span). A :class:`MaskingCollator` turns an example into text plus weighted character
spans (:meth:`MaskingCollator.weigh`); one batched fast-tokenizer call and the encodings' offsets
(or, for byte-level BPE, the tokens' byte lengths) then give every token its weight:

- a token that touches a weighted span (shares at least one character with it) gets the span's
  weight (the largest one, if it touches two);
- every other real token gets the collator's ``background`` weight (0 for a plain mask);
- pads weigh 0.

So a token that straddles the prompt/completion boundary of plain text is trained: it produces
completion characters. Searching token ids for a marker is not needed, and a marker that
tokenizes differently in context cannot be missed.

The work is split the way it is cheap. :meth:`MaskingCollator.prepare` tokenizes and masks every
example once, batched, inside ``datasets.map`` (``num_proc`` and the ``datasets`` cache work); it
reports every example it skipped, and why, before training starts. Calling the collator on a
list of prepared rows only pads them. Labels are ``IGNORE_INDEX`` where the weight is 0; a float
``loss_weights`` column exists only when some weight is strictly between 0 and 1, so the plain
path stays plain.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import torch
from tokenizers.pre_tokenizers import ByteLevel

from sft_plugins.bad_examples import POLICIES, OnBadExample, count_skips, location_of
from sft_plugins.batching import pad_batch
from sft_plugins.errors import (
    DataError,
    MaskingError,
    PluginOptionError,
    SFTPluginsError,
    SkipExample,
)
from sft_plugins.literal_text import (
    SpecialText,
    plain_encoder,
    protect,
    restore,
    special_text,
    splice,
    token_ranges_from_offsets,
)
from sft_plugins.loss import IGNORE_INDEX, WEIGHTS_KEY
from sft_plugins.processes import tokenizers_parallelism_kept

if TYPE_CHECKING:
    import datasets

    from sft_plugins.templates import ChatTemplate

Truncation = Literal["keep_start", "keep_end", "drop"]
TRUNCATIONS: tuple[str, ...] = ("keep_start", "keep_end", "drop")

SKIP_COLUMN = "skip_reason"
"""Column of the mapped (not yet filtered) data set: why a row is skipped, null if kept."""
DETAIL_COLUMN = "skip_detail"

COLUMN_TYPES = {
    "input_ids": pa.list_(pa.int32()),
    "labels": pa.list_(pa.int32()),
    WEIGHTS_KEY: pa.list_(pa.float32()),
    SKIP_COLUMN: pa.string(),
    DETAIL_COLUMN: pa.string(),
}


# --------------------------------------------------------------------------- examples -------


@dataclass(frozen=True)
class WeightedSpan:
    """Characters ``[start, end)`` of an example's text and the loss weight of their tokens."""

    start: int
    end: int
    weight: float = 1.0


@dataclass(frozen=True)
class Turn:
    """One message of a rendered example, as the collators see it."""

    index: int
    role: str
    trained: tuple[int, int] | None
    """For assistant turns: the characters of the content and its end-of-turn token."""
    completion: bool = False
    """True for the messages of a prompt/completion example's completion."""


@dataclass(frozen=True)
class RenderedExample:
    """An example as text, with the character span of each turn the model should learn."""

    text: str
    turns: tuple[Turn, ...]
    has_completion: bool
    """True for prompt/completion data (the turns marked ``completion`` are the answer)."""
    add_special_tokens: bool
    """Let the tokenizer add its special tokens (plain text). Templated text carries its own
    (as with ``apply_chat_template``), so it is tokenized without."""

    @property
    def assistant_spans(self) -> list[tuple[int, int]]:
        """The trained character spans of every assistant turn, in order."""
        return [t.trained for t in self.turns if t.trained is not None]

    @property
    def completion_spans(self) -> list[tuple[int, int]]:
        """The trained character spans of the completion's assistant turns, in order."""
        return [t.trained for t in self.turns if t.trained is not None and t.completion]


@dataclass(frozen=True)
class Weighting:
    """What a collator decided for one example: weighted spans and the weight of the rest."""

    spans: tuple[WeightedSpan, ...]
    background: float = 0.0


def _decoded(value: Any) -> Any:
    """A JSON-text field (``tools``, ``tool_calls`` of canonical rows) as Python objects."""
    return json.loads(value) if isinstance(value, str) else value


def _clean_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as plain dicts, without the ``None`` fields Arrow adds to unify schemas and
    with ``tool_calls`` stored as JSON text decoded."""
    cleaned = []
    for message in messages:
        plain = {k: v for k, v in message.items() if v is not None}
        if "tool_calls" in plain:
            plain["tool_calls"] = _decoded(plain["tool_calls"])
        cleaned.append(plain)
    return cleaned


def _with_eos(text: str, eos_text: str | None) -> str:
    return text if not eos_text or text.endswith(eos_text) else text + eos_text


def render_example(example: Mapping[str, Any], template: ChatTemplate | None,
                   eos_text: str | None) -> RenderedExample:
    """Turn one data set row into text and turns.

    Accepted rows (TRL's formats and the canonical rows of :mod:`sft_plugins.data`):

    - ``messages``, with an optional ``completion_index`` (the first message of the
      completion, for prompt/completion data) and ``tools``;
    - ``prompt`` + ``completion``, both message lists (rendered together) or both strings;
    - ``text``, with an optional ``completion_offset`` (the character where the completion
      starts).

    Plain text gets ``eos_text`` appended unless it already ends with it (as TRL does), so the
    model learns to stop; the completion span of plain prompt/completion covers the completion
    and that end-of-sequence text. Templated text is tokenized without the tokenizer's special
    tokens (the template writes its own), plain text with them.
    """
    tools = _decoded(example.get("tools")) or None
    if example.get("messages") is not None:
        first = example.get("completion_index")
        messages = _clean_messages(example["messages"])
        if first is None:
            return _render_messages([], messages, template, tools, completion=False)
        return _render_messages(messages[:first], messages[first:], template, tools)
    prompt, completion = example.get("prompt"), example.get("completion")
    if prompt is not None or completion is not None:
        if isinstance(prompt, str) and isinstance(completion, str):
            return _plain_completion(prompt, prompt + completion, eos_text)
        if isinstance(prompt, list) and isinstance(completion, list):
            return _render_messages(_clean_messages(prompt), _clean_messages(completion),
                                    template, tools)
        raise DataError("'prompt' and 'completion' must both be strings or both be message lists, "
                        f"got {type(prompt).__name__} and {type(completion).__name__}")
    if isinstance(example.get("text"), str):
        offset = example.get("completion_offset")
        if offset is not None:
            return _plain_completion(example["text"][:offset], example["text"], eos_text)
        return RenderedExample(text=_with_eos(example["text"], eos_text), turns=(),
                               has_completion=False, add_special_tokens=True)
    columns = ", ".join(sorted(example)) or "none"
    raise DataError(f"no 'messages', 'prompt'/'completion' or 'text' field (columns: {columns})")


def _plain_completion(prompt: str, text: str, eos_text: str | None) -> RenderedExample:
    if len(text) == len(prompt):
        raise DataError("the completion is empty; there is nothing to train on")
    text = _with_eos(text, eos_text)
    return RenderedExample(
        text=text,
        turns=(Turn(0, "user", None), Turn(1, "assistant", (len(prompt), len(text)), True)),
        has_completion=True, add_special_tokens=True)


def _render_messages(prompt: list[dict[str, Any]], rest: list[dict[str, Any]],
                     template: ChatTemplate | None, tools: Any, *,
                     completion: bool = True) -> RenderedExample:
    if template is None:
        raise MaskingError("conversational data needs a chat template; name one with "
                           "--chat_template or pass template= to prepare()")
    if completion and not any(m.get("content") or m.get("tool_calls") for m in rest):
        raise DataError("the completion has no message with content; nothing to train on")
    rendered = template.render([*prompt, *rest], tools=tools)
    first = len(prompt)
    turns = tuple(Turn(m.index, m.role, m.trained, completion and m.index >= first)
                  for m in rendered.messages)
    return RenderedExample(text=rendered.text, turns=turns, has_completion=completion,
                           add_special_tokens=False)


# ------------------------------------------------------------------- token weights ----------


def _first_token(encoding: Any, start: int, end: int) -> int | None:
    """The first token holding a character of ``[start, end)``, or ``None``."""
    for char in range(start, end):
        token = encoding.char_to_token(char)
        if token is not None:
            return token
    return None


def _last_token(encoding: Any, start: int, end: int, n_tokens: int) -> int:
    """The last token holding a character of ``[start, end)`` (one is known to exist).

    ``char_to_token`` returns the first token of a character; a byte-level tokenizer can split
    one character over several tokens, so walk on while the next token still starts inside.
    """
    for char in range(end - 1, start - 1, -1):
        token = encoding.char_to_token(char)
        if token is not None:
            break
    while token + 1 < n_tokens:
        following = encoding.token_to_chars(token + 1)
        if following is None or following[0] >= end:
            break
        token += 1
    return token


def token_ranges_fast(encoding: Any, spans: Sequence[WeightedSpan]) -> list[tuple[int, int]]:
    """Token index ranges ``[a, b)`` of the tokens touching each span, from a fast encoding.

    A span that no token touches (empty, or only characters the tokenizer dropped) gets an
    empty range at the position of the next token.
    """
    n_tokens = len(encoding)
    ranges: list[tuple[int, int]] = []
    for span in spans:
        first = _first_token(encoding, span.start, span.end)
        if first is None:
            ranges.append((n_tokens, n_tokens) if not ranges else (ranges[-1][1],) * 2)
            continue
        ranges.append((first, _last_token(encoding, span.start, span.end, n_tokens) + 1))
    return ranges


class ByteLevelSpans:
    """Token ranges of byte-level BPE tokenizers (Llama 3, Qwen, GPT-2 families) without offsets.

    Their tokens spell the UTF-8 bytes of the text exactly, so each token's byte length (a
    table over the vocabulary) and a running sum give every token's byte range. Tokenizing
    without offsets (``encode_batch_fast``) and a binary search per span boundary is about a
    quarter cheaper than offsets and ``char_to_token``, and preparation is tokenizer-bound. An
    example whose tokens do not add up to its byte length falls back to offsets.
    """

    def __init__(self, lengths: np.ndarray) -> None:
        self.lengths = lengths

    @classmethod
    def of(cls, tokenizer: Any) -> ByteLevelSpans | None:
        """The table for ``tokenizer``, or ``None`` if it is not a plain byte-level BPE."""
        backend = tokenizer.backend_tokenizer
        spec = json.loads(backend.to_str())
        decoder = spec.get("decoder") or {}
        if spec.get("normalizer") is not None or decoder.get("type") != "ByteLevel" \
                or (spec.get("model") or {}).get("type") != "BPE":
            return None
        alphabet = set(ByteLevel.alphabet())
        lengths = np.zeros(backend.get_vocab_size(with_added_tokens=True), dtype=np.int64)
        for token, token_id in backend.get_vocab(with_added_tokens=False).items():
            if not alphabet.issuperset(token):
                return None  # a vocabulary entry that does not spell bytes
            lengths[token_id] = len(token)  # one alphabet character per byte
        for token_id, added in backend.get_added_tokens_decoder().items():
            lengths[token_id] = len(added.content.encode("utf-8"))
        return cls(lengths)

    def ranges(self, text: str, ids: list[int], spans: Sequence[WeightedSpan]
               ) -> list[tuple[int, int]] | None:
        """Token ranges ``[a, b)`` touching each span, or ``None`` if the tokens do not spell
        the text byte for byte (then the caller uses offsets)."""
        if not ids:
            return None
        token_lengths = self.lengths[ids]
        ends = np.cumsum(token_lengths)
        ascii_text = text.isascii()
        if (len(text) if ascii_text else len(text.encode("utf-8"))) != ends[-1]:
            return None
        starts = ends - token_lengths

        def byte(char: int) -> int:
            return char if ascii_text else len(text[:char].encode("utf-8"))

        ranges = []
        for span in spans:
            first = int(np.searchsorted(ends, byte(span.start), side="right"))
            if span.end <= span.start:  # no character, no token
                ranges.append((first, first))
                continue
            stop = int(np.searchsorted(starts, byte(span.end), side="left"))
            ranges.append((first, stop))
        return ranges


def token_ranges_slow(tokenizer: Any, text: str, ids: Sequence[int],
                      spans: Sequence[WeightedSpan]) -> list[tuple[int, int]]:
    """Token ranges for a tokenizer without offsets: encode the text up to each span boundary.

    ``ids`` are the tokens of ``text`` without special tokens. The tokens of ``text[:b]`` must
    be a prefix of them, except possibly their last one (a token that straddles ``b``, which
    then counts as touching the span). Anything else means the tokenizer merges across the
    boundary in a way no prefix can reveal: an error that asks for a fast tokenizer.
    """

    def boundary(char: int, *, closing: bool) -> int:
        prefix = tokenizer.encode(text[:char], add_special_tokens=False)
        common = 0
        for a, b in zip(prefix, ids, strict=False):
            if a != b:
                break
            common += 1
        if common == len(prefix):
            return common
        if common == len(prefix) - 1:  # the last token straddles the boundary
            return common + 1 if closing else common
        raise MaskingError(
            f"the slow tokenizer {type(tokenizer).__name__} tokenizes the text before character "
            f"{char} differently from the whole text, so its mask cannot be found; "
            "use a fast tokenizer (use_fast=True)")

    return [(boundary(s.start, closing=False), boundary(s.end, closing=True)) for s in spans]


def encode_slow(tokenizer: Any, text: str, spans: Sequence[WeightedSpan],
                add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and span token ranges with a slow tokenizer (see :func:`token_ranges_slow`)."""
    core = list(tokenizer.encode(text, add_special_tokens=False))
    ranges = token_ranges_slow(tokenizer, text, core, spans)
    if not add_special_tokens:
        return core, ranges
    sentinel = -1  # where the text's tokens go among the special tokens the tokenizer adds
    lead = list(tokenizer.build_inputs_with_special_tokens([sentinel])).index(sentinel)
    ids = list(tokenizer.build_inputs_with_special_tokens(core))
    return ids, [(a + lead, b + lead) for a, b in ranges]


def token_weights(n_tokens: int, ranges: Sequence[tuple[int, int]],
                  spans: Sequence[WeightedSpan], background: float) -> list[float]:
    """Per-token weights: the span's weight for tokens touching a span (the largest, for a
    token shared by two), ``background`` for the rest."""
    weights = [background] * n_tokens
    previous_end, previous_weight = -1, 0.0
    for (a, b), span in zip(ranges, spans, strict=True):
        if a >= b:
            continue
        weights[a:b] = [span.weight] * (b - a)
        if a == previous_end - 1:  # this token also touches the previous span
            weights[a] = max(weights[a], previous_weight)
        previous_end, previous_weight = b, span.weight
    return weights


def _check_spans(spans: Sequence[WeightedSpan], text_length: int) -> None:
    previous = 0
    for span in spans:
        if not 0 <= span.start <= span.end <= text_length:
            raise MaskingError(f"span [{span.start}, {span.end}) falls outside the text "
                               f"(length {text_length})")
        if span.start < previous:
            raise MaskingError("weighted spans must be sorted and must not overlap")
        if not 0.0 <= span.weight <= 1.0 or math.isnan(span.weight):
            raise MaskingError(f"span weight {span.weight} is not in [0, 1]")
        previous = span.end


# ---------------------------------------------------------------------- the report ---------


@dataclass
class PreparationReport:
    """What preparation did: how many examples it kept, and every skip, counted by reason."""

    total: int
    kept: int
    skipped: dict[str, int] = field(default_factory=dict)
    first_skips: list[str] = field(default_factory=list)
    """The messages of the first skipped examples (index, source, what was wrong)."""

    def skip_counts(self) -> str:
        """``"2 too_long, 1 invalid"``: the skipped examples counted by reason."""
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))

    def summary(self) -> str:
        """One paragraph for the log, printed before training starts."""
        line = f"prepared {self.kept} of {self.total} examples"
        if not self.skipped:
            return line + "; none skipped"
        return "\n  ".join([f"{line}; skipped {self.total - self.kept}: {self.skip_counts()}",
                            *self.first_skips])


@dataclass
class PreparedDataset:
    """A prepared data set (``input_ids``, ``labels``, maybe ``loss_weights``) and its report."""

    dataset: datasets.Dataset
    report: PreparationReport


# -------------------------------------------------------------------- the collator ---------


class MaskingCollator:
    """Base class of every masking collator: prepares examples once, then pads batches.

    Subclasses set ``name``, ``aliases``, ``description`` and implement :meth:`weigh`. The
    constructor's keyword arguments are the collator's options (subclasses add their own and
    pass these on):

    ``max_length``: longest sequence kept, in tokens (``None``: no limit).
    ``truncation``: what to do with a longer example: ``keep_start`` (cut the end), ``keep_end``
    (cut the start) or ``drop`` (skip it, counted). An example left with no trained token is
    skipped and counted (``strict=True``: raised).
    ``pad_to_multiple_of``: round the padded length up to a multiple of this.
    ``padding_side``: ``right`` (default) or ``left``.
    ``pad_token``: the padding token; default the template's, else the tokenizer's. Never the
    end-of-sequence token, which a model must learn to produce.
    ``on_bad_example``: ``error`` (default) or ``skip`` (counted and reported) for an example
    that cannot be masked: no assistant turn, empty completion, a span outside the text... (the
    policy and words of :mod:`sft_plugins.bad_examples`).
    ``literal_special_tokens``: special-token strings inside the data (``<|eot_id|>`` quoted
    in an answer) are tokenized as the text they are (default, with a fast tokenizer), not as
    the special tokens; ``False`` gives ``apply_chat_template``'s behaviour
    (:mod:`sft_plugins.literal_text`).
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give a subclass its docstring as ``description``, and, when its ``__init__`` takes
        its own keyword options plus ``**options`` for the base, a signature that lists both,
        so the registry validates every option and the command line can offer them."""
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("description") and cls.__doc__:
            cls.description = inspect.cleandoc(cls.__doc__)
        own = inspect.signature(cls.__init__).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own):
            base = inspect.signature(MaskingCollator.__init__).parameters.values()
            merged = [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD]
            names = {p.name for p in merged}
            merged += [p for p in base if p.name not in names and p.name != "self"]
            cls.__signature__ = inspect.Signature(merged[1:])  # type: ignore[attr-defined]

    def __init__(self, *, max_length: int | None = None, truncation: Truncation = "keep_start",
                 strict: bool = False, pad_to_multiple_of: int | None = None,
                 padding_side: Literal["right", "left"] = "right", pad_token: str | None = None,
                 on_bad_example: OnBadExample = "error",
                 literal_special_tokens: bool = True) -> None:
        if max_length is not None and max_length < 1:
            raise self._option_error("max_length", max_length, "a positive number of tokens")
        if truncation not in TRUNCATIONS:
            raise self._option_error("truncation", truncation, " or ".join(TRUNCATIONS))
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise self._option_error("pad_to_multiple_of", pad_to_multiple_of, "a positive int")
        if padding_side not in ("right", "left"):
            raise self._option_error("padding_side", padding_side, "right or left")
        if on_bad_example not in POLICIES:
            raise self._option_error("on_bad_example", on_bad_example, " or ".join(POLICIES))
        self.max_length = max_length
        self.truncation = truncation
        self.strict = strict
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side
        self.pad_token = pad_token
        self.on_bad_example = on_bad_example
        self.literal_special_tokens = literal_special_tokens
        self.pad_token_id: int | None = None
        """Set by :meth:`prepare` (or by hand when only padding is needed)."""

    def _option_error(self, option: str, value: object, expected: str) -> Exception:
        return PluginOptionError(f"collator {self.name!r}: option {option}={value!r} is invalid; "
                                 f"expected {expected}")

    # -- what subclasses decide ---------------------------------------------------------

    def weigh(self, example: RenderedExample) -> Weighting:
        """The weighted character spans of one rendered example (and the weight of the rest).

        Raise :class:`~sft_plugins.errors.SkipExample` (or a :class:`DataError`) for an example
        this collator cannot train on; preparation counts it or raises it, as
        ``on_bad_example`` says.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement weigh()")

    @property
    def weighted(self) -> bool:
        """True when this collator can give a token a weight strictly between 0 and 1 (then
        preparation writes a ``loss_weights`` column). Subclasses with fractional weights
        override it."""
        return False

    # -- preparation --------------------------------------------------------------------

    def resolve_pad_token_id(self, tokenizer: Any, template: ChatTemplate | None) -> int:
        """The pad token id: the option, else the template's pad token, else the tokenizer's.

        An error if there is none, or if it is the token that ends a trained turn (the
        template's end of turn; without a template, the tokenizer's end of sequence): labels
        here follow positions, but any code that masks labels by pad id would then hide the
        stop token. A pad equal to an end of sequence that is not the end of turn is accepted
        (Phi-3.5 ships ``pad_token == eos_token == "<|endoftext|>"``), as
        :meth:`ChatTemplate.configure_tokenizer` accepts it.
        """
        token = self.pad_token or (template.pad_token if template is not None else None)
        token = token or tokenizer.pad_token
        if token is None:
            raise MaskingError(f"collator {self.name!r}: no pad token (the template and the "
                               "tokenizer have none); pass pad_token=<an unused special token>")
        end = ((getattr(template, "end_of_turn", None) or getattr(template, "eos_token", None))
               if template is not None else tokenizer.eos_token)
        if token == end:
            raise MaskingError(f"collator {self.name!r}: the pad token {token!r} ends a trained "
                               "turn (the end-of-turn/end-of-sequence token the model must "
                               "learn to produce); pass pad_token=<an unused special token>")
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == getattr(tokenizer, "unk_token_id", object()):
            raise MaskingError(f"collator {self.name!r}: pad token {token!r} is not in the "
                               "tokenizer's vocabulary")
        return int(token_id)

    def bind(self, tokenizer: Any, template: ChatTemplate | None) -> None:
        """Learn what preparation and padding need from the tokenizer and template (the pad
        token id). Subclasses that need more (a marker's text) extend it."""
        self.pad_token_id = self.resolve_pad_token_id(tokenizer, template)

    def prepare(self, dataset: datasets.Dataset, tokenizer: Any,
                template: ChatTemplate | None = None, *, num_proc: int | None = None,
                batch_size: int = 1000,
                load_from_cache_file: bool | None = None,
                desc: str | None = "Tokenizing and masking") -> PreparedDataset:
        """Tokenize and mask every example once (``datasets.map``, batched, cacheable).

        Returns a data set with ``input_ids``, ``labels`` (and ``loss_weights`` when
        :attr:`weighted`) and a report of every skipped example. Errors name the example's
        file and line when the rows carry ``source_file``/``source_line`` (as
        :mod:`sft_plugins.data` writes them), else its index. An invalid example raises
        (:class:`MaskingError`, :class:`DataError`, :class:`TemplateError`) unless
        ``on_bad_example="skip"``.
        """
        self.bind(tokenizer, template)
        eos_text = template.eos_token if template is not None else tokenizer.eos_token
        with tokenizers_parallelism_kept():
            return self._prepare(dataset, tokenizer, template, eos_text, num_proc=num_proc,
                                 batch_size=batch_size,
                                 load_from_cache_file=load_from_cache_file, desc=desc)

    def _prepare(self, dataset: datasets.Dataset, tokenizer: Any, template: ChatTemplate | None,
                 eos_text: str | None, *, num_proc: int | None, batch_size: int,
                 load_from_cache_file: bool | None, desc: str | None) -> PreparedDataset:
        mapped = dataset.map(
            _prepare_batch, batched=True, batch_size=batch_size, with_indices=True,
            num_proc=num_proc, remove_columns=dataset.column_names,
            load_from_cache_file=load_from_cache_file, desc=desc,
            fn_kwargs={"collator": self, "tokenizer": tokenizer, "template": template,
                       "eos_text": eos_text,
                       "special": special_text(tokenizer)
                       if self.literal_special_tokens and getattr(tokenizer, "is_fast", False)
                       else None})
        total = len(mapped)
        # Count in Arrow: a million kept rows never become a million Python strings.
        bad = count_skips(mapped.data.column(SKIP_COLUMN))
        first_skips: list[str] = []
        if bad.total:
            first_skips = mapped.data.column(DETAIL_COLUMN).take(bad.positions[:5]).to_pylist()
            mapped = mapped.filter(lambda rs: [r is None for r in rs], input_columns=SKIP_COLUMN,
                                   batched=True, num_proc=num_proc)
        mapped = mapped.remove_columns([SKIP_COLUMN, DETAIL_COLUMN])
        report = PreparationReport(total=total, kept=len(mapped), skipped=bad.counts,
                                   first_skips=first_skips)
        return PreparedDataset(mapped, report)

    def encode_batch(self, rendered: Sequence[RenderedExample], tokenizer: Any, *,
                     offsets: bool = True) -> list[Any]:
        """Encodings for a batch, in one call to the fast tokenizer's backend (its Rust
        ``encode_batch`` gives offsets without converting them to Python; with
        ``offsets=False``, ``encode_batch_fast`` skips them)."""
        backend = tokenizer.backend_tokenizer
        if backend.padding is not None or backend.truncation is not None:
            # A batched `tokenizer(..., padding=True)` call leaves padding switched on in the
            # shared backend (and save_pretrained writes it to tokenizer.json); encoding with it
            # would pad every example to its map batch's longest with unmasked pad tokens.
            backend = copy.deepcopy(backend)
            backend.no_padding()
            backend.no_truncation()
        out: list[Any] = [None] * len(rendered)
        for flag in (False, True):
            positions = [i for i, r in enumerate(rendered) if r.add_special_tokens is flag]
            if positions:
                encode = backend.encode_batch
                if not offsets and not flag:
                    encode = getattr(backend, "encode_batch_fast", encode)
                encodings = encode([rendered[i].text for i in positions],
                                   add_special_tokens=flag)
                for i, encoding in zip(positions, encodings, strict=True):
                    out[i] = encoding
        return out

    def mask_one(self, index: int, weighting: Weighting,
                 ids: list[int], ranges: Sequence[tuple[int, int]]) -> dict[str, Any]:
        """Labels (and weights) of one tokenized example, truncated as configured."""
        n_tokens = len(ids)
        trained = [(a, b) for (a, b), s in zip(ranges, weighting.spans, strict=True)
                   if s.weight > 0 and a < b]
        weights: list[float] | None = None
        if self.weighted or weighting.background or len(trained) < len(ranges):
            weights = token_weights(n_tokens, ranges, weighting.spans, weighting.background)
            labels = [t if w > 0 else IGNORE_INDEX for t, w in zip(ids, weights, strict=True)]
        else:  # the plain mask: copy the trained slices, no per-token Python
            labels = [IGNORE_INDEX] * n_tokens
            for a, b in trained:
                labels[a:b] = ids[a:b]
        lo, hi = 0, n_tokens
        if self.max_length is not None and n_tokens > self.max_length:
            if self.truncation == "drop":
                raise SkipExample("too_long", f"has {n_tokens} tokens, more than max_length="
                                  f"{self.max_length} (truncation='drop')")
            lo, hi = (0, self.max_length) if self.truncation == "keep_start" else \
                (n_tokens - self.max_length, n_tokens)
            ids, labels = ids[lo:hi], labels[lo:hi]
            weights = None if weights is None else weights[lo:hi]
        if not any(a < hi and b > lo for a, b in trained):
            if (lo, hi) == (0, n_tokens):
                raise SkipExample("no_trained_token", "has no token to train on")
            raise SkipExample("truncated_away", f"has no trained token left after truncation "
                                                f"to max_length={self.max_length} "
                                                f"({self.truncation})")
        row: dict[str, Any] = {"input_ids": ids, "labels": labels}
        if self.weighted:
            row[WEIGHTS_KEY] = weights
        return row

    # -- padding ------------------------------------------------------------------------

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad prepared rows into a batch: ``input_ids``, ``attention_mask``, ``labels`` and,
        when any row has them, ``loss_weights`` (rows without get 1 where labelled). Pads are
        the pad token, label ``IGNORE_INDEX``, weight 0."""
        if self.pad_token_id is None:
            raise MaskingError(f"collator {self.name!r} has no pad token id: prepare the data "
                               "with collator.prepare(...) first, or set collator.pad_token_id")
        batch, rows = pad_batch(features, self.pad_token_id,
                                pad_to_multiple_of=self.pad_to_multiple_of,
                                padding_side=self.padding_side)
        attention = torch.zeros_like(batch["input_ids"])
        for row, cols in enumerate(rows):
            attention[row, cols] = 1
        batch["attention_mask"] = attention
        return batch


_BYTE_LEVEL: weakref.WeakKeyDictionary[Any, tuple[int, ByteLevelSpans | None]] = \
    weakref.WeakKeyDictionary()


def _byte_level(tokenizer: Any) -> ByteLevelSpans | None:
    """:meth:`ByteLevelSpans.of`, computed once per tokenizer object and vocabulary size (a
    token added later gets a new table)."""
    size = len(tokenizer)
    cached = _BYTE_LEVEL.get(tokenizer)
    if cached is None or cached[0] != size:
        cached = _BYTE_LEVEL[tokenizer] = (size, ByteLevelSpans.of(tokenizer))
    return cached[1]


def _prepare_batch(batch: dict[str, list[Any]], indices: list[int], *,
                   collator: MaskingCollator, tokenizer: Any,
                   template: ChatTemplate | None, eos_text: str | None,
                   special: SpecialText | None = None) -> pa.Table:
    """The ``datasets.map`` function: render, tokenize in one call, mask, truncate.

    It returns an Arrow table with explicit column types: ``datasets`` would otherwise scan
    every Python list to infer them, which costs as much as the masking itself."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], SKIP_COLUMN: [],
                                 DETAIL_COLUMN: []}
    if collator.weighted:
        out[WEIGHTS_KEY] = []

    def skip(index: int, row: Mapping[str, Any], error: SFTPluginsError, reason: str,
             always_count: bool) -> None:
        where = location_of(row, index)
        if reason == "truncated_away" and collator.strict:
            raise MaskingError(f"{where}: {error} (strict mode)") from error
        if not always_count and collator.on_bad_example == "error":
            kind = MaskingError if isinstance(error, SkipExample) else type(error)
            raise kind(f"{where}: {error}. Fix the example, or skip such examples "
                       f"with on_bad_example='skip'") from error
        out["input_ids"].append([])
        out["labels"].append([])
        if WEIGHTS_KEY in out:
            out[WEIGHTS_KEY].append([])
        out[SKIP_COLUMN].append(reason)
        out[DETAIL_COLUMN].append(f"{where}: {reason}: {error}")

    pending: list[tuple[int, RenderedExample, Weighting]] = []
    results: dict[int, Any] = {}
    literal: dict[int, list[tuple[int, int]]] = {}  # example -> special-token text it holds
    for index, row in zip(indices, rows, strict=True):
        try:
            originals: list[str] = []
            if special is not None:
                row, originals = protect(row, special)
            rendered = render_example(row, template, eos_text)
            if originals:
                text, literal[index] = restore(rendered.text, originals)
                rendered = replace(rendered, text=text)
            weighting = collator.weigh(rendered)
            _check_spans(weighting.spans, len(rendered.text))
        except SkipExample as error:
            results[index] = (error, error.reason)
            continue
        except SFTPluginsError as error:  # DataError, TemplateError, MaskingError...
            results[index] = (error, getattr(error, "rule", None) or "invalid")
            continue
        pending.append((index, rendered, weighting))

    fast = getattr(tokenizer, "is_fast", False)
    byte_level = _byte_level(tokenizer) if fast else None
    encodings = collator.encode_batch([p[1] for p in pending], tokenizer,
                                      offsets=byte_level is None) if fast else []
    encoder = plain_encoder(tokenizer) if literal and fast else None
    for k, (index, rendered, weighting) in enumerate(pending):
        if index in literal and fast:  # special-token text from the data: as plain text
            encoding = collator.encode_batch([rendered], tokenizer)[0]
            ids, offsets = splice(encoding.ids, encoding.offsets, rendered.text,
                                  literal[index], special, encoder)  # type: ignore[arg-type]
            ranges = token_ranges_from_offsets(offsets, weighting.spans)
        elif fast:
            ids = encodings[k].ids
            ranges = None
            if byte_level is not None and not rendered.add_special_tokens:
                ranges = byte_level.ranges(rendered.text, ids, weighting.spans)
            if ranges is None:
                if byte_level is not None:  # tokenized without offsets: once more with them
                    encodings[k] = collator.encode_batch([rendered], tokenizer)[0]
                    ids = encodings[k].ids
                ranges = token_ranges_fast(encodings[k], weighting.spans)
        else:
            try:
                ids, ranges = encode_slow(tokenizer, rendered.text, weighting.spans,
                                          rendered.add_special_tokens)
            except MaskingError as error:
                results[index] = (error, "invalid")
                continue
        try:
            results[index] = collator.mask_one(index, weighting, ids, ranges)
        except SkipExample as error:
            results[index] = (error, error.reason)

    for index, row in zip(indices, rows, strict=True):
        result = results[index]
        if isinstance(result, tuple):
            error, reason = result
            counted_only = reason in ("too_long", "truncated_away")
            skip(index, row, error, reason, counted_only)
            continue
        for key in ("input_ids", "labels", WEIGHTS_KEY):
            if key in out:
                out[key].append(result[key])
        out[SKIP_COLUMN].append(None)
        out[DETAIL_COLUMN].append(None)
    return pa.table({key: pa.array(values, type=COLUMN_TYPES[key]) for key, values in out.items()})


__all__ = [
    "IGNORE_INDEX",
    "ByteLevelSpans",
    "MaskingCollator",
    "PreparationReport",
    "PreparedDataset",
    "RenderedExample",
    "SkipExample",
    "Turn",
    "WeightedSpan",
    "Weighting",
    "encode_slow",
    "pad_batch",
    "render_example",
    "token_ranges_fast",
    "token_ranges_slow",
    "token_weights",
]
