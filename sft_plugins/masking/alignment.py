"""From character spans to token ranges: which tokens of an encoded text touch each span.

A token touches a span when it shares at least one character with it. Three ways to find them,
from cheapest to most general:

- byte-level BPE tokenizers (Llama 3, Qwen, GPT-2 families): their tokens spell the text's UTF-8
  bytes, so a table of token byte lengths locates every span without offsets
  (:class:`ByteLevelSpans`, cached per tokenizer by :func:`byte_level_spans`);
- any other fast tokenizer: the encoding's offsets (:func:`token_ranges_fast`);
- slow tokenizers, which have no offsets: the text up to each span boundary encoded on its own
  (:func:`token_ranges_slow`, :func:`encode_slow`).

:func:`encode_batch` is the one batched call to the fast tokenizer's Rust backend.
"""

from __future__ import annotations

import copy
import json
import weakref
from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np
from tokenizers.pre_tokenizers import ByteLevel

from sft_plugins.errors import MaskingError
from sft_plugins.masking.rendering import RenderedExample, WeightedSpan

# ------------------------------------------------------------------------ offsets ----------


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


# --------------------------------------------------------------------- byte level ----------


class ByteLevelSpans:
    """Token ranges of byte-level BPE tokenizers (Llama 3, Qwen, GPT-2 families) without offsets.

    Their tokens spell the UTF-8 bytes of the text exactly, so each token's byte length (a
    table over the vocabulary) and a running sum give every token's byte range. Tokenizing
    without offsets (``encode_batch_fast``) and a binary search per span boundary is about a
    quarter cheaper than offsets and ``char_to_token``, and preparation is tokenizer-bound
    (:meth:`ranges_batch` does a whole batch in a few numpy calls). An example whose tokens do
    not add up to its byte length falls back to offsets.
    """

    def __init__(self, lengths: np.ndarray) -> None:
        self.lengths = lengths

    @classmethod
    def of(cls, tokenizer: Any) -> ByteLevelSpans | None:
        """The table for ``tokenizer``, or ``None`` if it is not a plain byte-level BPE."""
        backend = tokenizer.backend_tokenizer
        if not _is_plain_byte_level_bpe(json.loads(backend.to_str())):
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
        return self.ranges_batch([text], [ids], [spans])[0]

    def ranges_batch(self, texts: Sequence[str], ids: Sequence[list[int]],
                     spans: Sequence[Sequence[WeightedSpan]]
                     ) -> list[list[tuple[int, int]] | None]:
        """:meth:`ranges` of many examples at once: one running sum over every token of the
        batch and one binary search for every span boundary, rather than a few small numpy
        calls per example (whose overhead was most of their cost).

        Example ``i``'s tokens run from ``first[i]`` in the batch, its bytes from ``base[i]``;
        a boundary at byte ``b`` of the example is searched at ``base[i] + b`` among all the
        batch's tokens and counted back from ``first[i]``, capped at the example's token
        count: the tokens before the example all end (and, non-empty, start) before
        ``base[i]``, and those after it start at or past its last byte.
        """
        first = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)), out=first[1:])
        token_lengths = self.lengths[np.fromiter(chain.from_iterable(ids), dtype=np.int64,
                                                 count=int(first[-1]))]
        ends = np.zeros(len(token_lengths) + 1, dtype=np.int64)
        np.cumsum(token_lengths, out=ends[1:])
        base = ends[first]  # bytes before each example; base[i + 1] - base[i] are its own
        starts, ends = ends[:-1], ends[1:]
        sizes, firsts, bases = np.diff(base).tolist(), first.tolist(), base.tolist()
        # every span boundary of every example that spells its text: (example, byte in batch)
        opening: list[int] = []
        closing: list[int] = []
        spelt: list[bool] = []
        for i, (text, example_spans) in enumerate(zip(texts, spans, strict=True)):
            ascii_text = text.isascii()
            size = len(text) if ascii_text else len(text.encode("utf-8"))
            spelt.append(firsts[i + 1] > firsts[i] and size == sizes[i])
            if not spelt[-1]:
                continue
            for span in example_spans:
                opening.append(bases[i] + _byte(text, span.start, ascii_text))
                closing.append(bases[i] + _byte(text, span.end, ascii_text)
                               if span.end > span.start else -1)
        first_tokens = np.searchsorted(ends, opening, side="right").tolist()
        stop_tokens = np.searchsorted(starts, closing, side="left").tolist()
        out: list[list[tuple[int, int]] | None] = []
        k = 0
        for i, example_spans in enumerate(spans):
            if not spelt[i]:
                out.append(None)
                continue
            lead, n_tokens = firsts[i], firsts[i + 1] - firsts[i]
            ranges = []
            for _ in example_spans:
                a = min(first_tokens[k] - lead, n_tokens)
                # a span with no character gets no token: an empty range where it starts
                ranges.append((a, a) if closing[k] < 0 else
                              (a, min(stop_tokens[k] - lead, n_tokens)))
                k += 1
            out.append(ranges)
        return out


def _byte(text: str, char: int, ascii_text: bool) -> int:
    """The UTF-8 byte offset of character ``char`` of ``text``."""
    return char if ascii_text else len(text[:char].encode("utf-8"))


def _is_plain_byte_level_bpe(spec: dict[str, Any]) -> bool:
    """A ``tokenizer.json`` with a BPE model, a byte-level decoder and no normalizer."""
    decoder = spec.get("decoder") or {}
    return (spec.get("normalizer") is None and decoder.get("type") == "ByteLevel"
            and (spec.get("model") or {}).get("type") == "BPE")


_BYTE_LEVEL: weakref.WeakKeyDictionary[Any, tuple[int, ByteLevelSpans | None]] = \
    weakref.WeakKeyDictionary()


def byte_level_spans(tokenizer: Any) -> ByteLevelSpans | None:
    """:meth:`ByteLevelSpans.of`, computed once per tokenizer object and vocabulary size (a
    token added later gets a new table)."""
    size = len(tokenizer)
    cached = _BYTE_LEVEL.get(tokenizer)
    if cached is None or cached[0] != size:
        cached = _BYTE_LEVEL[tokenizer] = (size, ByteLevelSpans.of(tokenizer))
    return cached[1]


# ------------------------------------------------------------------ fast encoding ----------


def encode_batch(rendered: Sequence[RenderedExample], backend: Any, *,
                 offsets: bool = True) -> list[Any]:
    """Encodings for a batch, in one call to the fast tokenizer's backend (from
    :func:`unpadded_backend`) per value of ``add_special_tokens`` (its Rust ``encode_batch``
    gives offsets without converting them to Python; with ``offsets=False``,
    ``encode_batch_fast`` skips them where it can)."""
    out: list[Any] = [None] * len(rendered)
    for flag in (False, True):
        positions = [i for i, r in enumerate(rendered) if r.add_special_tokens is flag]
        if not positions:
            continue
        encode = backend.encode_batch
        if not offsets and not flag:
            encode = getattr(backend, "encode_batch_fast", encode)
        encodings = encode([rendered[i].text for i in positions], add_special_tokens=flag)
        for i, encoding in zip(positions, encodings, strict=True):
            out[i] = encoding
    return out


def unpadded_backend(tokenizer: Any) -> Any:
    """The fast tokenizer's Rust backend, or a copy of it with padding and truncation switched
    off (found once per labelling call: the copy is the whole vocabulary).

    A batched ``tokenizer(..., padding=True)`` call leaves padding switched on in the shared
    backend (and ``save_pretrained`` writes it to tokenizer.json); encoding with it would pad
    every example to its batch's longest with unmasked pad tokens.
    """
    backend = tokenizer.backend_tokenizer
    if backend.padding is None and backend.truncation is None:
        return backend
    backend = copy.deepcopy(backend)
    backend.no_padding()
    backend.no_truncation()
    return backend


# ------------------------------------------------------------------ slow tokenizers --------


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
        common = _common_prefix(prefix, ids)
        if common == len(prefix):
            return common
        if common == len(prefix) - 1:  # the last token straddles the boundary
            return common + 1 if closing else common
        raise MaskingError(
            f"the slow tokenizer {type(tokenizer).__name__} tokenizes the text before character "
            f"{char} differently from the whole text, so its mask cannot be found; "
            "use a fast tokenizer (use_fast=True)")

    return [(boundary(s.start, closing=False), boundary(s.end, closing=True)) for s in spans]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    common = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        common += 1
    return common


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


__all__ = ["ByteLevelSpans", "byte_level_spans", "encode_batch", "encode_slow",
           "token_ranges_fast", "token_ranges_slow"]
